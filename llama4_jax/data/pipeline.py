"""Data pipeline: documents → tokens → packed rows (Grain MapDataset) → mixture → process batches.

The design makes the global batch sequence a function of the step alone (not of the process or
device count) and makes the iterator state small and exact.

1. Tokenize. Each source's train and eval documents are tokenized once into one flat token
   stream (`eos` appended to every document, optionally `bos` prepended) plus document start
   offsets. Training reads them from the prepared token store (`store.py`: ArrayRecord shards on
   disk, read by random access, prepared automatically when missing): a `store.StoreDocs`.
   Without a store (`build_mixture(store_dir=None)`: held-out perplexity, the reference in
   tests) they are tokenized into RAM (`TokenizedDocs`; with a `cache_dir` kept as .npz files
   keyed by a hash of the documents and the tokenizer fingerprint). Both give the same rows.

2. Pack. Epoch e of a source is its train documents concatenated in the order of a
   permutation drawn from rng([seed, hash(name), e]); epochs follow each other into one endless
   token stream. The row of length L starting at stream offset t holds tokens [t, t + L + 1):
       inputs       the first L tokens        targets   the last L tokens
       segment_ids  1, 2, 3 ... per document occurrence within the row (0 = padding)
       positions    offset within the document; a document begun in an earlier row continues
       loss_mask    1.0 where the target belongs to the input's document, else 0.0, so the
                    first token of a document is never predicted from the previous one's eos.
   Train rows never need padding; eval rows pad the end of the held-out stream. Rows are a
   Grain `MapDataset.range(base, 2**62, L).map(pack)`: random access by row index. A row is one
   read of the store (the records holding its document pieces), and a pure function of
   (source, start offset): Grain's IterDataset packers (and `mp_prefetch`) would decide which
   tokens land in which row from the iteration history, which is exactly what must not happen
   for resume on any process count to stay exact, so packing is our own.

3. Mix. At step s the sources of the B rows of the global batch are drawn with
   rng([seed, stage_index, s]).choice(p=weights), s counting every batch since step 0. Each
   source keeps a cursor (in tokens): a row drawn from it starts at the cursor, which then moves
   by L, so every token of a source is used once before any is repeated, whatever the mixture.
   Process p of P builds only rows [p*B/P, (p+1)*B/P) but advances every cursor, so all
   processes hold the same state and any process's state restores any other (or another P).

4. Stages. `set_stage` changes the stage index, L and B. Cursors and the step persist: the next
   stage continues each source exactly where the previous one stopped.

State (JSON-able, the same on every process; `get_state` / `set_state`, Grain's checkpoint
handler and Orbax save it):
    {"version": 1, "seed": int, "step": int, "stage_index": int, "seq_len": int,
     "global_batch": int, "weights": {source: float}, "cursors": {source: int}}

Batch (numpy, b = global_batch / process_count rows of this process):
    inputs, targets, segment_ids, positions  int32 [b, L];  loss_mask float32 [b, L];
    source_ids int32 [b], the index of each row's source in `source_names`.

Images (image_text sources, `image_text.py`): such a source is packed exactly as text (its
documents are Llama 4 prompts whose images became `<|patch|>` runs, T = tokens per tile each) and
its rows carry the tiles they touch. A batch holding at least one such row adds
    pixel_values  float32 [b, K, 3, S, S]: row r's tiles in order of appearance (K = L // T + 2
                  bounds the tiles a row can touch; unused slots and text rows are zeros)
    image_index   int32 [b, L]: for a `<|patch|>` input, the index of its feature in the row's
                  flattened tile features (slot·T + offset in the tile), else −1
so a row that begins inside an image (a document cut by the previous row) takes exactly the rest
of that image's features. Targets that are image tokens (`<|image_start|>` ... `<|image_end|>`)
get loss_mask 0: the model is never asked to predict an image. A batch with no image row has
neither field and is exactly the text pipeline's batch. Rows stay a pure function of (source,
start offset), so determinism and resume are unchanged.

Audio (audio_text sources, `audio_text.py`) works the same way with clips for tiles (one
`MediaStream` class serves both; `MediaKind` names each modality's fields): its documents hold
`<|audio|>` runs of tokens_per_clip placeholders, and a batch with at least one audio row adds
    audio_values  float32 [b, K, clip_samples]: row r's clips (waveforms) in order of appearance
    audio_index   int32 [b, L]: for an `<|audio|>` input, its feature in the row's clip features
with `<|audio_start|>` ... `<|audio_end|>` targets carrying no loss. A batch may carry images,
audio, both or neither; each field pair is present only when some row has that modality.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import grain
import numpy as np

from ..errors import DataError
from . import store
from .audio import AUDIO, AUDIO_TOKENS, ClipConfig
from .audio_text import load_audio_documents
from .image_text import load_image_documents
from .images import IMAGE_TOKENS, PATCH, ImageConfig
from .sources import Source, load_documents
from .tokenizer import Tokenizer, single_token_id

STATE_VERSION = 1
_ENDLESS = 2**62  # row datasets are endless; Grain only needs a length
_ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; shuffles must agree across processes and runs.
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------- tokenize


@dataclasses.dataclass(frozen=True)
class TokenizedDocs(store.DocIndex):
    tokens: np.ndarray  # int32 [T]: documents back to back, each ending with eos
    starts: np.ndarray  # int64 [n_docs + 1]: document d is tokens[starts[d]:starts[d + 1]]

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.starts[d]:self.starts[d + 1]]

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Tokens [a, b) of each range; `store.StoreDocs` reads the same from disk."""
        return [self.tokens[a:b] for a, b in ranges]


def _encode_all(tokenizer: Tokenizer, docs: Sequence[str]) -> list[list[int]]:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:
        return list(encode_batch(docs))
    return [tokenizer.encode(doc) for doc in docs]


def _cache_key(docs: Sequence[str], tokenizer: Tokenizer, add_bos: bool) -> str | None:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None:
        return None
    h = hashlib.sha256(f"{fingerprint}|{tokenizer.eos_id}|{tokenizer.bos_id}|{add_bos}".encode())
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def _save_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _tokenize(docs: Sequence[str], tokenizer: Tokenizer, add_bos: bool) -> TokenizedDocs:
    ids = _encode_all(tokenizer, docs)
    prefix = [tokenizer.bos_id] if add_bos else []
    lengths = np.array([len(x) + len(prefix) + 1 for x in ids], dtype=np.int64)
    flat = itertools.chain.from_iterable(itertools.chain(prefix, x, (tokenizer.eos_id,)) for x in ids)
    tokens = np.fromiter(flat, dtype=np.int32, count=int(lengths.sum()))
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise DataError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
    return TokenizedDocs(tokens, np.concatenate([[0], np.cumsum(lengths)]))


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer, *, add_bos: bool = False,
                       cache_dir: str | os.PathLike | None = None, name: str = "docs") -> TokenizedDocs:
    """Tokenizes documents into one flat array; reuses `cache_dir/tokens-<name>-<key>.npz`."""
    key = _cache_key(docs, tokenizer, add_bos) if cache_dir else None
    safe_name = re.sub(r"[^\w.-]", "_", name)
    path = Path(cache_dir) / f"tokens-{safe_name}-{key}.npz" if key else None
    if path is not None and path.exists():
        with np.load(path) as cached:
            return TokenizedDocs(cached["tokens"], cached["starts"])
    result = _tokenize(docs, tokenizer, add_bos)
    if path is not None:
        _save_npz_atomic(path, tokens=result.tokens, starts=result.starts)
    return result


# ----------------------------------------------------------------------------- pack


class PackedStream:
    """One source's token stream, readable at any offset.

    shuffle=True: an endless sequence of epochs, each a fresh permutation of the documents.
    shuffle=False: the documents once, in order; offsets past the end read as padding.
    """

    def __init__(self, docs: "TokenizedDocs | store.StoreDocs", *, seed: int, name: str, shuffle: bool, pad_id: int):
        self.docs = docs
        self.shuffle = shuffle
        self.pad_id = pad_id
        self._seed_key = [seed, _stable_hash(name)]
        # Rows read one or two epochs at a time; a few cached layouts cover wrap-around.
        self._layout = functools.lru_cache(maxsize=4)(self._compute_layout)

    @property
    def num_tokens(self) -> int:
        return self.docs.num_tokens

    def _compute_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, stream offset of each document in that order + total) of an epoch."""
        n = self.docs.num_docs
        if self.shuffle:
            order = np.random.default_rng([*self._seed_key, epoch]).permutation(n)
        else:
            order = np.arange(n)
        lengths = np.diff(self.docs.starts)[order]
        return order, np.concatenate([[0], np.cumsum(lengths)])

    def read(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, document key, position in document) of stream offsets [start, start+count).

        The key identifies a document occurrence (epoch * num_docs + rank in the epoch), -1 for
        padding, so the same document in two epochs counts as two documents. The tokens come
        from one `docs.read_ranges` call (one batched read of a store's records per row).
        """
        tokens = np.full(count, self.pad_id, np.int32)
        keys = np.full(count, -1, np.int64)
        positions = np.zeros(count, np.int64)
        total = self.docs.num_tokens
        pieces = []  # (offset in the row, length, first store token)
        g, end = start, start + count
        while g < end:
            epoch = g // total
            if epoch > 0 and not self.shuffle:
                break
            order, doc_offsets = self._layout(epoch)
            offset = g - epoch * total
            rank = int(np.searchsorted(doc_offsets, offset, side="right")) - 1
            pos = offset - int(doc_offsets[rank])
            n = min(int(doc_offsets[rank + 1]) - offset, end - g)
            lo = g - start
            keys[lo:lo + n] = epoch * self.docs.num_docs + rank
            positions[lo:lo + n] = np.arange(pos, pos + n)
            pieces.append((lo, n, int(self.docs.starts[order[rank]]) + pos))
            g += n
        for (lo, n, _), piece in zip(pieces, self.docs.read_ranges([(a, a + n) for _, n, a in pieces])):
            tokens[lo:lo + n] = piece
        return tokens, keys, positions


@dataclasses.dataclass(frozen=True)
class MediaKind:
    """One modality of the batch: its two fields, its placeholder token and what an item is."""

    values_field: str  # [b, K, *item shape]: each row's items in order of appearance
    index_field: str  # [b, L]: which feature of the row's flattened items each placeholder takes
    placeholder: str
    item: str


IMAGES = MediaKind("pixel_values", "image_index", PATCH, "tile")
AUDIO_CLIPS = MediaKind("audio_values", "audio_index", AUDIO, "clip")
MEDIA = (IMAGES, AUDIO_CLIPS)


class MediaStream(PackedStream):
    """A `PackedStream` over an image-text or audio-text source: it also knows each document's
    items (tiles / clips, each of `tokens_per_item` placeholders) and where its placeholders
    are (module doc, "Images")."""

    def __init__(self, docs: TokenizedDocs, items: np.ndarray, item_starts: np.ndarray, *, kind: MediaKind,
                 placeholder_id: int, media_ids: Sequence[int], tokens_per_item: int, seed: int, name: str,
                 shuffle: bool, pad_id: int):
        super().__init__(docs, seed=seed, name=name, shuffle=shuffle, pad_id=pad_id)
        self.kind, self.items, self.item_starts = kind, items, item_starts
        self.placeholder_id, self.media_ids = placeholder_id, np.asarray(sorted(media_ids), np.int32)
        self.tokens_per_item = tokens_per_item
        is_placeholder = docs.tokens == placeholder_id
        # placeholder_cum[t]: placeholders among stream tokens [0, t)
        self.placeholder_cum = np.concatenate([[0], np.cumsum(is_placeholder, dtype=np.int64)])
        per_doc = self.placeholder_cum[docs.starts[1:]] - self.placeholder_cum[docs.starts[:-1]]
        bad = np.flatnonzero(per_doc != np.diff(self.item_starts) * tokens_per_item)
        if bad.size:
            d, p = int(bad[0]), kind.placeholder
            raise DataError(f"source {name!r}: document {d} has {int(per_doc[d])} {p} tokens for "
                            f"{int(np.diff(self.item_starts)[d])} {kind.item}s of {tokens_per_item} (does the "
                            f"tokenizer encode {p} as one id?)")

        # Bound on the items a row can touch (`max_items`); build_mixture makes every stream of
        # a kind share the loosest one, so all its rows of a batch have the same shape.
        self.item_density = float(np.max(np.diff(self.item_starts) / np.diff(docs.starts)))
        self.max_doc_items = int(np.max(np.diff(self.item_starts)))

    def max_items(self, seq_len: int) -> int:
        """Items a row of seq_len inputs can touch: at most seq_len // T + 2 (whole items plus
        one cut at each end), and at most density·seq_len + 2·(most items of a document) (the
        documents a row covers whole, plus the two it cuts), density = max items per token."""
        by_density = math.ceil(self.item_density * seq_len) + 2 * self.max_doc_items
        return max(1, min(seq_len // self.tokens_per_item + 2, by_density))

    def media_fields(self, tokens, keys, positions, seq_len: int) -> dict[str, np.ndarray]:
        T = self.tokens_per_item
        values = np.zeros((self.max_items(seq_len), *self.items.shape[1:]), np.float32)
        index = np.full(seq_len, -1, np.int32)
        at = np.flatnonzero(tokens[:seq_len] == self.placeholder_id)
        if at.size:
            key = keys[at]
            epoch, rank = np.divmod(key, self.docs.num_docs)
            doc = np.empty_like(rank)
            for e in np.unique(epoch):
                doc[epoch == e] = self._layout(int(e))[0][rank[epoch == e]]
            first = self.docs.starts[doc]
            before = self.placeholder_cum[first + positions[at]] - self.placeholder_cum[first]
            item = self.item_starts[doc] + before // T
            new = np.ones(at.size, bool)
            new[1:] = (key[1:] != key[:-1]) | (item[1:] != item[:-1])
            slot = np.cumsum(new) - 1
            values[:slot[-1] + 1] = self.items[item[new]].astype(np.float32)
            index[at] = slot * T + before % T
        return {self.kind.values_field: values, self.kind.index_field: index}


def pack_row(stream: PackedStream, start: int, seq_len: int) -> dict[str, np.ndarray]:
    """The packed row of `seq_len` inputs starting at stream offset `start` (see module doc)."""
    tokens, keys, positions = stream.read(start, seq_len + 1)
    in_doc = keys[:-1] >= 0
    new_segment = np.ones(seq_len, bool)
    new_segment[1:] = keys[1:-1] != keys[:-2]
    row = {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": (np.cumsum(new_segment) * in_doc).astype(np.int32),
        "positions": (positions[:-1] * in_doc).astype(np.int32),
        "loss_mask": ((keys[1:] == keys[:-1]) & in_doc).astype(np.float32),
    }
    if isinstance(stream, MediaStream):
        row["loss_mask"] *= ~np.isin(row["targets"], stream.media_ids)
        row.update(stream.media_fields(tokens, keys, positions, seq_len))
    return row


def row_dataset(stream: PackedStream, seq_len: int, base: int = 0, stop: int = _ENDLESS):
    """Grain MapDataset whose element i is the row starting at offset base + i * seq_len."""
    return grain.MapDataset.range(base, stop, seq_len).map(
        functools.partial(pack_row, stream, seq_len=seq_len))


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], source_ids: Sequence[int]) -> dict:
    batch = {key: np.stack([row[key] for row in rows]) for key in _ROW_KEYS}
    batch["source_ids"] = np.asarray(source_ids, np.int32)
    for kind in MEDIA:
        with_media = [row for row in rows if kind.values_field in row]
        if with_media:  # the other rows of a mixed batch: no items, no placeholders
            blank = {kind.values_field: np.zeros_like(with_media[0][kind.values_field]),
                     kind.index_field: np.full_like(with_media[0][kind.index_field], -1)}
            for key in blank:
                batch[key] = np.stack([row.get(key, blank[key]) for row in rows])
    return batch


# ----------------------------------------------------------------------------- mix


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one step reads: this process's (source, start offset) rows and the cursors after."""

    rows: tuple[tuple[int, int], ...]
    seq_len: int
    cursors: tuple[int, ...]


def _weight_vector(names: Sequence[str], weights: Mapping[str, float]) -> list[float]:
    """Weights in `names` order (absent names get 0); DataError on unknown names or bad values."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise DataError(f"unknown source(s) in mixture weights: {', '.join(unknown)} "
                        f"(sources: {', '.join(names)})")
    values = [float(weights.get(name, 0.0)) for name in names]
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"mixture weights must be finite, >= 0 and not all 0: {dict(weights)}")
    return values


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, {process_count})")


def _check_batch_shape(seq_len: int, global_batch: int, process_count: int) -> None:
    if seq_len <= 0 or global_batch <= 0:
        raise DataError(f"seq_len and global_batch must be positive, got {seq_len}, {global_batch}")
    if global_batch % process_count:
        raise DataError(f"global_batch {global_batch} is not divisible by the process count "
                        f"{process_count}")


class MixtureIterator(grain.DatasetIterator):
    """Endless iterator of per-process batches drawn from a weighted mixture of sources."""

    def __init__(self, train: Mapping[str, PackedStream], evals: Mapping[str, PackedStream], *,
                 seed: int, seq_len: int, global_batch: int,
                 weights: Mapping[str, float] | None = None, stage_index: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int | bool = 1):
        super().__init__()
        _check_process(process_index, process_count)
        self.source_names = tuple(train)
        self._streams = [train[name] for name in self.source_names]
        self._evals = dict(evals)
        self._seed = seed
        self._process_index = process_index
        self._process_count = process_count
        self._step = 0
        self._cursors = [0] * len(self._streams)
        self._weights = _weight_vector(self.source_names,
                                       weights or {n: 1.0 for n in self.source_names})
        self._set_shape(stage_index, seq_len, global_batch)
        # Batches built ahead in one background thread (the train step releases the GIL).
        # Grain's IterDataset prefetch (`mp_prefetch`, thread prefetch) would own the order of
        # elements; here the next batches are *planned* from (seed, stage, step, cursors) and only
        # their assembly runs ahead, so a batch stays a function of (step, row) and a stage,
        # weight or state change simply discards the plans that no longer match.
        self._prefetch = int(prefetch)
        self._executor = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data")
                          if self._prefetch > 0 else None)
        self._pending: list[tuple[tuple, concurrent.futures.Future]] = []
        self._rows_built = 0

    # --- configuration

    @property
    def step(self) -> int:
        return self._step

    @property
    def stage_index(self) -> int:
        return self._stage_index

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def global_batch(self) -> int:
        return self._global_batch

    @property
    def local_batch(self) -> int:
        return self._global_batch // self._process_count

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.source_names, self._weights))

    @property
    def eval_source_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.source_names if n in self._evals)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """New mixture weights from the next batch on; sources left out get weight 0."""
        self._weights = _weight_vector(self.source_names, weights)

    def _set_shape(self, stage_index: int, seq_len: int, global_batch: int) -> None:
        _check_batch_shape(seq_len, global_batch, self._process_count)
        self._stage_index, self._seq_len, self._global_batch = stage_index, seq_len, global_batch
        # Rows are a pure function of (start, L), so any base congruent to the cursor works.
        bases = [cursor % seq_len for cursor in self._cursors]
        self._row_sets = [(row_dataset(s, seq_len, b), b) for s, b in zip(self._streams, bases)]

    def set_stage(self, stage_index: int, seq_len: int, global_batch: int) -> None:
        """Moves to another curriculum stage; source cursors and the step carry over."""
        self._set_shape(stage_index, seq_len, global_batch)

    # --- iteration

    def _plan(self, step: int | None = None, cursors: Sequence[int] | None = None) -> _Plan:
        """The rows of `step` (default: the next) given the cursors before it."""
        step = self._step if step is None else step
        rng = np.random.default_rng([self._seed, self._stage_index, step])
        p = np.asarray(self._weights) / sum(self._weights)
        source_B = rng.choice(len(self._streams), size=self._global_batch, p=p)
        start_B = np.empty(self._global_batch, np.int64)
        cursors = list(self._cursors if cursors is None else cursors)
        for i in range(len(self._streams)):
            rows = np.flatnonzero(source_B == i)
            start_B[rows] = cursors[i] + self._seq_len * np.arange(len(rows))
            cursors[i] += self._seq_len * len(rows)
        lo = self._process_index * self.local_batch
        local = zip(source_B[lo:lo + self.local_batch].tolist(),
                    start_B[lo:lo + self.local_batch].tolist())
        return _Plan(tuple(local), self._seq_len, tuple(cursors))

    def _assemble(self, plan: _Plan, row_sets) -> dict[str, np.ndarray]:
        self._rows_built += len(plan.rows)
        rows = []
        for source, start in plan.rows:
            dataset, base = row_sets[source]
            rows.append(dataset[(start - base) // plan.seq_len])
        return _stack_rows(rows, [source for source, _ in plan.rows])

    def _prefetch_ahead(self, plan: _Plan) -> None:
        # A batch depends only on (rows, L), so a prefetched batch whose plan still matches is
        # exactly what the synchronous path would build, whatever changed in between.
        if self._executor is None:
            return
        self._pending = self._pending[:self._prefetch]
        step, cursors = self._step + len(self._pending), plan.cursors
        if self._pending:
            cursors = self._pending[-1][2]
        while len(self._pending) < self._prefetch:
            ahead = self._plan(step, cursors)
            future = self._executor.submit(self._assemble, ahead, self._row_sets)
            self._pending.append(((ahead.rows, ahead.seq_len), future, ahead.cursors))
            step, cursors = step + 1, ahead.cursors

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        plan = self._plan()
        batch = None
        if self._pending:
            key, future, _ = self._pending.pop(0)
            if key == (plan.rows, plan.seq_len):
                batch = future.result()
            else:  # weights, stage or state changed since: every plan ahead is stale
                self._pending = []
        if batch is None:
            batch = self._assemble(plan, self._row_sets)
        self._cursors = list(plan.cursors)
        self._step += 1
        self._prefetch_ahead(plan)
        return batch

    def read_stats(self) -> dict[str, int]:
        """Training rows this process built and store records it read (train and eval), so far."""
        streams = [*self._streams, *self._evals.values()]
        return {"rows": self._rows_built,
                "records": sum(getattr(s.docs, "reads", 0) for s in streams)}

    # --- state

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self._seed,
            "step": self._step,
            "stage_index": self._stage_index,
            "seq_len": self._seq_len,
            "global_batch": self._global_batch,
            "weights": self.weights,
            "cursors": dict(zip(self.source_names, self._cursors)),
        }

    def set_state(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')} is not "
                            f"{STATE_VERSION}")
        if state["seed"] != self._seed:
            raise DataError(f"data iterator state has seed {state['seed']}, pipeline has "
                            f"{self._seed}")
        if set(state["cursors"]) != set(self.source_names):
            raise DataError(f"data iterator state has sources {sorted(state['cursors'])}, "
                            f"pipeline has {sorted(self.source_names)}")
        self._weights = _weight_vector(self.source_names, state["weights"])
        self._cursors = [int(state["cursors"][name]) for name in self.source_names]
        self._step = int(state["step"])
        self._pending = []
        self._set_shape(int(state["stage_index"]), int(state["seq_len"]),
                        int(state["global_batch"]))

    def close(self) -> None:
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is not None:
            # At most one batch is in flight; cancel_futures would need module globals that are
            # gone when __del__ runs at interpreter exit.
            executor.shutdown(wait=False)
        super().close()

    # --- eval

    def eval_batches(self, source: str, *, seq_len: int | None = None,
                     global_batch: int | None = None,
                     max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Fixed batches over a source's held-out documents, in document order, padded at the end.

        Every call yields the same batches; this process gets its slice of each global batch.
        """
        if source not in self._evals:
            raise DataError(f"source {source!r} has no held-out documents"
                            if source in self.source_names else f"unknown source {source!r}")
        seq_len, global_batch = seq_len or self._seq_len, global_batch or self._global_batch
        _check_batch_shape(seq_len, global_batch, self._process_count)
        stream = self._evals[source]
        num_rows = max(1, math.ceil((stream.num_tokens - 1) / seq_len))
        num_batches = math.ceil(num_rows / global_batch)
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        rows = row_dataset(stream, seq_len, stop=num_batches * global_batch * seq_len)
        local = global_batch // self._process_count
        source_id = self.source_names.index(source)
        for k in range(num_batches):
            first = k * global_batch + self._process_index * local
            yield _stack_rows([rows[first + j] for j in range(local)], [source_id] * local)


# ----------------------------------------------------------------------------- build


def build_mixture(sources: Mapping[str, Source], tokenizer: Tokenizer, *, seed: int, seq_len: int,
                  global_batch: int, weights: Mapping[str, float] | None = None,
                  stage_index: int = 0, process_index: int = 0, process_count: int = 1,
                  cache_dir: str | os.PathLike | None = None, add_bos: bool = False,
                  prefetch: int | bool = 1, store_dir: str | os.PathLike | None = None,
                  prepare_workers: int = 1, image_config: ImageConfig | None = None,
                  audio_config: ClipConfig | None = None, log=print) -> MixtureIterator:
    """The training mixture iterator over `sources`; weights default to uniform.

    With `store_dir`, documents are read by random access from the prepared token store there
    (`store.py`); sources not prepared yet (or stale) are prepared into it first, with
    `prepare_workers` processes. Without it, every source is read and tokenized into RAM (the
    in-memory reference; `cache_dir` then keeps the token arrays as .npz).
    Both give the same batches for the same documents.

    `image_text` sources (which need `image_config`, the vision tower's tiling) are always read
    and tokenized into RAM, with their tiles (module doc, "Images"); `audio_text` sources (which
    need `audio_config`, the audio encoder's clip) likewise, with their clips.
    """
    if not sources:
        raise DataError("no data sources given")
    names = list(sources)
    # Fail on configuration mistakes before the (possibly slow) reading and tokenizing.
    _check_process(process_index, process_count)
    _check_batch_shape(seq_len, global_batch, process_count)
    if weights:
        _weight_vector(names, weights)
    train, evals = {}, {}
    for name, spec in sources.items():
        if spec.resolved_kind == "image_text":
            _add_image_source(name, spec, tokenizer, image_config, train, evals, seed=seed, add_bos=add_bos)
            continue
        if spec.resolved_kind == "audio_text":
            _add_audio_source(name, spec, tokenizer, audio_config, train, evals, seed=seed, add_bos=add_bos)
            continue
        if store_dir is not None:
            splits = store.ensure_prepared(store_dir, name, spec, tokenizer, add_bos=add_bos,
                                           workers=prepare_workers, log=log)
        else:
            splits = {}
            train_docs, eval_docs = load_documents(name, spec)
            for split, docs in (("train", train_docs), ("eval", eval_docs)):
                if docs:
                    splits[split] = tokenize_documents(docs, tokenizer, add_bos=add_bos,
                                                       cache_dir=cache_dir, name=f"{name}-{split}")
        for split, out, shuffle in (("train", train, True), ("eval", evals, False)):
            if split in splits:
                out[name] = PackedStream(splits[split], seed=seed, name=name, shuffle=shuffle,
                                         pad_id=tokenizer.pad_id)
    for kind in MEDIA:
        streams = [s for s in (*train.values(), *evals.values()) if isinstance(s, MediaStream) and s.kind == kind]
        for s in streams:
            s.item_density = max(x.item_density for x in streams)
            s.max_doc_items = max(x.max_doc_items for x in streams)
    return MixtureIterator(train, evals, seed=seed, seq_len=seq_len, global_batch=global_batch,
                           weights=weights, stage_index=stage_index, process_index=process_index,
                           process_count=process_count, prefetch=prefetch)


def image_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's one-id encodings of the Llama 4 image tokens; DataError if `<|patch|>`,
    `<|image_start|>` or `<|image_end|>` is not a single id."""
    ids = {tok: single_token_id(tokenizer, tok) for tok in IMAGE_TOKENS}
    missing = [t for t in IMAGE_TOKENS[:2] + (PATCH,) if ids[t] is None]
    if missing:
        raise DataError(f"the tokenizer does not encode {', '.join(missing)} as single tokens: image-text "
                        "sources need one with Llama 4's image tokens (e.g. data.tokenizer.type: byte_image)")
    return {t: i for t, i in ids.items() if i is not None}


def _add_media_source(name, tokenizer, train, evals, *, kind: MediaKind, ids: dict[str, int], splits,
                      tokens_per_item: int, seed: int, add_bos: bool) -> None:
    """The train and eval MediaStreams of an image-text or audio-text source; `splits` is its
    (train, eval) documents as (texts, items, item_starts)."""
    for (texts, items, starts), out, shuffle in zip(splits, (train, evals), (True, False)):
        if texts:
            docs = tokenize_documents(texts, tokenizer, add_bos=add_bos)
            out[name] = MediaStream(docs, items, starts, kind=kind, placeholder_id=ids[kind.placeholder],
                                    media_ids=ids.values(), tokens_per_item=tokens_per_item, seed=seed, name=name,
                                    shuffle=shuffle, pad_id=tokenizer.pad_id)


def _add_image_source(name, spec, tokenizer, image_config, train, evals, *, seed, add_bos) -> None:
    if image_config is None:
        raise DataError(f"source {name!r} is image_text but the model has no vision tower (model.vision)")
    ids = image_token_ids(tokenizer)
    splits = [(d.texts, d.tiles, d.tile_starts) for d in load_image_documents(name, spec, image_config)]
    _add_media_source(name, tokenizer, train, evals, kind=IMAGES, ids=ids, splits=splits,
                      tokens_per_item=image_config.tokens_per_tile, seed=seed, add_bos=add_bos)


def audio_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's one-id encodings of the audio tokens; DataError if any is not a single id."""
    ids = {tok: single_token_id(tokenizer, tok) for tok in AUDIO_TOKENS}
    missing = [t for t in AUDIO_TOKENS if ids[t] is None]
    if missing:
        raise DataError(f"the tokenizer does not encode {', '.join(missing)} as single tokens: audio-text "
                        "sources need one with the audio tokens (e.g. data.tokenizer.type: byte_mm)")
    return ids


def _add_audio_source(name, spec, tokenizer, audio_config, train, evals, *, seed, add_bos) -> None:
    if audio_config is None:
        raise DataError(f"source {name!r} is audio_text but the model has no audio encoder (audio:)")
    ids = audio_token_ids(tokenizer)
    splits = [(d.texts, d.clips, d.clip_starts) for d in load_audio_documents(name, spec, audio_config)]
    _add_media_source(name, tokenizer, train, evals, kind=AUDIO_CLIPS, ids=ids, splits=splits,
                      tokens_per_item=audio_config.tokens_per_clip, seed=seed, add_bos=add_bos)
