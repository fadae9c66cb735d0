"""The prepared token store: sources tokenized once, on disk, read by random access.

`prepare_source` streams a source file by file through the tokenizer into ArrayRecord shards;
`open_source` gives training a `StoreDocs` (the in-RAM `TokenizedDocs`' interface) whose reads
touch only the records that hold the asked tokens. `ensure_prepared` prepares what is missing or
stale and opens it: the same code serves `llama4-jax data prepare` and training's auto-prepare.

Layout of a store directory (one sub-directory per source):

    STORE/manifest.json                  summary of every source (written by `prepare_store`)
    STORE/<source>/manifest.json         the source is complete iff this exists (written last)
    STORE/<source>/index.<split>.npy     int64 [docs + 1]: document d is tokens [s[d], s[d+1])
    STORE/<source>/shards/<k>.json       shard k (input file k) is complete iff this exists
    STORE/<source>/shards/<k>.<split>.array_record   records of CHUNK_TOKENS token ids
    STORE/<source>/shards/<k>.<split>.lengths.npy    int64 token count of each document

A split's token stream is its documents in source order (files sorted, documents in file order),
each document `[bos] + ids + [eos]`, exactly as `pipeline.tokenize_documents` lays them out, so a
store and an in-RAM tokenization of the same documents give the same packed rows. Records hold
CHUNK_TOKENS ids of that stream (the last of a shard fewer) as little-endian `dtype` (the
narrowest unsigned type that holds the vocabulary), written with group_size 1 so each record is
one independently compressed chunk: a random read costs one seek and one small decompression.

Held-out split: a document is eval iff `sources.is_eval_document` (a hash of its text), so the
split is decided at prepare time, by document, and is the same on every rerun and process count.

Crash safety: every file is written to a temporary name and renamed; a shard's `.json` is
renamed last, the source's `manifest.json` after the indexes, and a stale source's manifest is
removed before any of its files changes. A kill -9 at any point leaves nothing a reader takes for
complete; the next run removes the debris and redoes only the unfinished shards. Shards are
deterministic (same input, same bytes), so concurrent preparers of one store (two processes of a
run on one host) cannot corrupt it either; a lock file makes the second one wait and reuse.

Reuse: a shard is reused iff its input file has the same path, size and mtime and the source
key (tokenizer identity, the source's reading options, the format) is unchanged; a rerun on
unchanged inputs writes nothing. A change is reported in one line naming what changed.

Memory: preparing holds ~1 MB of text per worker (text split by line or paragraph is streamed in
4 M-character chunks; a whole-file document, a JSONL line or a Parquet batch is held whole).
Training holds, per source, the memory-mapped document index and each epoch's document
permutation and offsets (16 bytes per document, as the in-RAM pipeline did), never the tokens.

Parallelism: `workers` processes over input files (spawned: the caller may be a training process
with JAX's threads), or an Apache Beam pipeline (`beam_runner.py`) running the same per-file
transform, `prepare_shard`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import DataError
from . import beam_runner, corpus
from .sources import (MEDIA_KINDS, _BLANK_LINES, _KIND_SUFFIXES, _READERS, BUILTIN_PREFIX, Source, _input_files,
                      _open_text, _split_record, is_eval_document)
from .tokenizer import Tokenizer

FORMAT = "llama4-jax-token-store"
FORMAT_VERSION = 1
CHUNK_TOKENS = 4096  # ids per record: a row of short documents reads few, small records
SPLITS = ("train", "eval")
# snappy: ~1/3 the size of raw byte-level ids, the cheapest to decode; max_parallelism 1 because
# prepare already runs one writer per worker process.
_WRITER_OPTIONS = "group_size:1,snappy,max_parallelism:1"
_ENCODE_BATCH_CHARS = 1 << 20  # text handed to the tokenizer per call (bounds memory)


# ----------------------------------------------------------------------------- identity


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ids [0, vocab_size)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def tokenizer_identity(tokenizer: Tokenizer, add_bos: bool) -> dict:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no fingerprint: a token store "
                        "cannot tell whether it was prepared with it")
    return {"fingerprint": fingerprint, "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id), "bos_id": int(tokenizer.bos_id),
            "pad_id": int(tokenizer.pad_id), "add_bos": bool(add_bos)}


def _reading_options(spec: Source) -> dict:
    # The path is not part of the key: inputs are compared file by file (a moved corpus with the
    # same files and stamps is the same corpus).
    return {"kind": spec.resolved_kind, "field": spec.field, "split": spec.split,
            "eval_fraction": spec.eval_fraction}


def _source_key(spec: Source, tok_id: dict) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, "chunk": CHUNK_TOKENS, "writer": _WRITER_OPTIONS,
                          "reading": _reading_options(spec), "tokenizer": tok_id}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _builtin_name(spec: Source) -> str:
    return spec.path[len(BUILTIN_PREFIX):] if spec.path.startswith(BUILTIN_PREFIX) else spec.path


def list_inputs(spec: Source) -> list[dict]:
    """One identity per input file of a source (path, size, mtime_ns), in reading order."""
    if spec.resolved_kind == "builtin":
        return [{"path": BUILTIN_PREFIX + _builtin_name(spec), **corpus.builtin_stamp()}]
    out = []
    for path in _input_files(spec.path, _KIND_SUFFIXES.get(spec.resolved_kind)):
        st = path.stat()
        out.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


# ----------------------------------------------------------------------------- atomic files


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` then rename onto `path`; the temporary file never survives an error."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    _atomic_write(path, write)


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _atomic_write(path, write)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- one shard


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to turn input file `index` of a source into its shard."""

    source: str
    spec: Source
    index: int
    input: dict
    out_dir: str
    key: str
    tokenizer: Tokenizer
    add_bos: bool


def _records(spec: Source, path: str) -> Iterator[str]:
    kind = spec.resolved_kind
    if kind == "builtin":
        return iter(corpus.load_builtin(path[len(BUILTIN_PREFIX):]))
    return _READERS[kind]([Path(path)], spec.field)


_STREAM_CHARS = 1 << 22


def _stream_split_text(path: str, split: str) -> Iterator[str]:
    """The documents of a text file split by line or paragraph, read 4 M characters at a time:
    the same documents `_split_record` gives for the whole text (a separator is found by its
    start alone, so cutting after the last one found and rescanning the rest with the next
    chunk finds the same ones), in memory bounded by the chunk plus one document."""
    pattern = _BLANK_LINES if split == "paragraph" else re.compile("\n")
    rest = ""
    with _open_text(Path(path)) as f:
        while True:
            chunk = f.read(_STREAM_CHARS)
            text = rest + chunk
            if not chunk:
                break
            cut = 0
            for m in pattern.finditer(text):
                if text[cut:m.start()].strip():
                    yield text[cut:m.start()]
                cut = m.end()
            rest = text[cut:]
    if rest.strip():
        yield rest


def _documents(spec: Source, path: str) -> Iterator[str]:
    try:
        if spec.resolved_kind == "text" and spec.split != "file":
            yield from _stream_split_text(path, spec.split)
            return
        for record in _records(spec, path):
            yield from _split_record(record, spec.split)
    except DataError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # pyarrow / array_record / gzip on a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read ({msg})") from e


class _SplitWriter:
    """Appends documents' ids to one split of a shard: fixed-size records, document lengths."""

    def __init__(self, path: Path, lengths_path: Path, dtype: np.dtype):
        self.path, self.lengths_path, self.dtype = path, lengths_path, dtype
        self.tmp = None
        self.writer = None
        self.buf = np.empty(CHUNK_TOKENS, dtype)
        self.fill = 0
        self.lengths: list[int] = []
        self.records = 0

    def _flush(self) -> None:
        if self.writer is None:
            from array_record.python import array_record_module

            fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                            suffix=".tmp")
            os.close(fd)
            self.writer = array_record_module.ArrayRecordWriter(self.tmp, _WRITER_OPTIONS)
        self.writer.write(self.buf[:self.fill].astype("<" + self.dtype.str[1:]).tobytes())
        self.records += 1
        self.fill = 0

    def add(self, ids: np.ndarray, lengths: list[int]) -> None:
        """Appends documents whose ids are `ids` back to back, of `lengths` each."""
        self.lengths.extend(lengths)
        pos = 0
        while pos < len(ids):
            n = min(CHUNK_TOKENS - self.fill, len(ids) - pos)
            self.buf[self.fill:self.fill + n] = ids[pos:pos + n]
            self.fill += n
            pos += n
            if self.fill == CHUNK_TOKENS:
                self._flush()

    def finish(self) -> dict:
        if self.fill:
            self._flush()
        size = 0
        if self.writer is not None:
            self.writer.close()
            size = os.path.getsize(self.tmp)
            os.replace(self.tmp, self.path)
        lengths = np.asarray(self.lengths, np.int64)
        _write_npy(self.lengths_path, lengths)
        return {"docs": len(lengths), "tokens": int(lengths.sum()), "records": self.records,
                "bytes": size}

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


def _shard_paths(out_dir: Path, index: int) -> dict[str, Path]:
    base = out_dir / "shards"
    paths = {"meta": base / f"{index:05d}.json"}
    for split in SPLITS:
        paths[split] = base / f"{index:05d}.{split}.array_record"
        paths[f"{split}.lengths"] = base / f"{index:05d}.{split}.lengths.npy"
    return paths


def _encode_batch(tokenizer: Tokenizer, docs: list[str]) -> list:
    as_array = getattr(tokenizer, "encode_array", None)  # ByteTokenizer: no Python int lists
    if as_array is not None:
        return [as_array(d) for d in docs]
    batch = getattr(tokenizer, "encode_batch", None)
    return list(batch(docs)) if batch is not None else [tokenizer.encode(d) for d in docs]


def prepare_shard(job: ShardJob, progress: Callable[[int], None] | None = None) -> dict:
    """Tokenizes input file `job.index` into its shard files; returns (and writes) its meta.

    Memory: one batch of documents (~1 MB of text) and one record buffer per split.
    """
    tok = job.tokenizer
    dtype = token_dtype(tok.vocab_size)
    paths = _shard_paths(Path(job.out_dir), job.index)
    paths["meta"].parent.mkdir(parents=True, exist_ok=True)
    writers = {split: _SplitWriter(paths[split], paths[f"{split}.lengths"], dtype) for split in SPLITS}
    prefix = [tok.bos_id] if job.add_bos else []
    vocab = tok.vocab_size

    prefix_arr = np.asarray(prefix, np.int64)
    eos_arr = np.asarray([tok.eos_id], np.int64)

    def emit(docs: list[str]) -> None:
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
        for doc, ids in zip(docs, _encode_batch(tok, docs)):
            split = "eval" if is_eval_document(doc, job.spec.eval_fraction) else "train"
            parts[split] += [prefix_arr, np.asarray(ids, np.int64), eos_arr]
            lengths[split].append(len(prefix) + len(ids) + 1)
        for split in SPLITS:
            if not parts[split]:
                continue
            flat = np.concatenate(parts[split])
            if flat.min() < 0 or flat.max() >= vocab:  # once per batch of documents
                raise DataError(f"{job.input['path']}: tokenizer produced ids outside [0, {vocab})")
            writers[split].add(flat, lengths[split])
            if progress is not None:
                progress(flat.size)

    try:
        batch: list[str] = []
        chars = 0
        for doc in _documents(job.spec, job.input["path"]):
            batch.append(doc)
            chars += len(doc)
            if chars >= _ENCODE_BATCH_CHARS:
                emit(batch)
                batch, chars = [], 0
        if batch:
            emit(batch)
        splits = {split: w.finish() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    meta = {"input": job.input, "key": job.key, "dtype": dtype.name, **splits}
    _write_json(paths["meta"], meta)
    return meta


def _run_job(job: ShardJob) -> tuple[int, dict]:
    return job.index, prepare_shard(job)


# ----------------------------------------------------------------------------- a source


def _describe_change(old: dict, key: str, tok_id: dict, spec: Source, inputs: list[dict]) -> str | None:
    """One line saying why a prepared source is stale, or None if it is current."""
    if old.get("key") == key and old.get("inputs") == inputs:
        return None
    for what, was, now in (("tokenizer", old.get("tokenizer") or {}, tok_id),
                           ("reading options", old.get("reading") or {}, _reading_options(spec))):
        diff = [f"{k}: {was.get(k)} → {now.get(k)}" for k in now if was.get(k) != now.get(k)]
        if diff:
            return f"{what} changed ({', '.join(diff)})"
    if old.get("key") != key:
        return "store format changed"
    before = {i["path"]: i for i in old.get("inputs", [])}
    now = {i["path"]: i for i in inputs}
    for path, ident in now.items():
        if path not in before:
            return f"{path} is new"
        if before[path] != ident:
            was = before[path]
            return (f"{path} changed (size {was.get('size')} → {ident.get('size')} bytes, "
                    f"mtime {_fmt_ns(was.get('mtime_ns'))} → {_fmt_ns(ident.get('mtime_ns'))})")
    gone = sorted(set(before) - set(now))
    return f"{gone[0]} was removed" if gone else "input list changed"


def _fmt_ns(ns) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) if isinstance(ns, int) else str(ns)


def source_status(out_dir: str | os.PathLike, spec: Source, tokenizer: Tokenizer,
                  add_bos: bool = False) -> tuple[str, str | None]:
    """("current" | "missing" | "stale", one-line reason for stale)."""
    tok_id = tokenizer_identity(tokenizer, add_bos)
    old = _read_json(Path(out_dir) / "manifest.json")
    if old is None:
        return "missing", None
    change = _describe_change(old, _source_key(spec, tok_id), tok_id, spec, list_inputs(spec))
    return ("current", None) if change is None else ("stale", change)


def _damage(out_dir: Path, manifest: dict) -> str | None:
    """One line naming a shard whose size is not the one recorded (a stat per shard), or None."""
    for k, shard in enumerate(manifest.get("shards", [])):
        for split in SPLITS:
            if shard[split]["records"]:
                path = _shard_paths(out_dir, k)[split]
                size = path.stat().st_size if path.is_file() else None
                if size != shard[split]["bytes"]:
                    return f"{path} damaged ({size} bytes, expected {shard[split]['bytes']})"
    return None


def _clean_debris(out_dir: Path, keep: int) -> None:
    """Removes temporary files and the shards past `keep` inputs (from a longer input list)."""
    shards = out_dir / "shards"
    if not shards.is_dir():
        return
    for p in shards.iterdir():
        stem = p.name.split(".")[0]
        if p.name.endswith(".tmp") or (stem.isdigit() and int(stem) >= keep):
            p.unlink()
    for p in out_dir.iterdir():
        if p.name.endswith(".tmp"):
            p.unlink()


def _shard_current(out_dir: Path, index: int, ident: dict, key: str) -> dict | None:
    paths = _shard_paths(out_dir, index)
    meta = _read_json(paths["meta"])
    if meta is None or meta.get("input") != ident or meta.get("key") != key:
        return None
    for split in SPLITS:
        if not paths[f"{split}.lengths"].is_file():
            return None
        if meta[split]["records"] and (not paths[split].is_file()
                                       or paths[split].stat().st_size != meta[split]["bytes"]):
            return None
    return meta


def _write_index(out_dir: Path, metas: list[dict], split: str) -> None:
    total = sum(m[split]["docs"] for m in metas)

    def write(tmp):
        index = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(total + 1,))
        index[0] = 0
        pos, base = 1, 0
        for k, m in enumerate(metas):
            n = m[split]["docs"]
            if n:
                lengths = np.load(_shard_paths(out_dir, k)[f"{split}.lengths"])
                index[pos:pos + n] = base + np.cumsum(lengths)
                base += int(lengths.sum())
                pos += n
        index.flush()
        del index
    _atomic_write(out_dir / f"index.{split}.npy", write)


@dataclasses.dataclass
class PrepareReport:
    source: str
    status: str  # "current" (nothing written) | "prepared"
    reason: str | None  # why it was (re)prepared: None (new) or the one-line change
    shards_written: int
    manifest: dict


def prepare_source(name: str, spec: Source, tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                   add_bos: bool = False, workers: int = 1, progress=None,
                   log: Callable[[str], None] | None = None, runner: str = "local",
                   beam_args: Sequence[str] = ()) -> PrepareReport:
    """Prepares one source into `out_dir` (resuming, reusing current shards); see module doc.

    `workers` > 1 tokenizes that many input files at once in spawned processes. `progress`
    (optional) is called as progress(tokens=n, files=..., done_files=..., done_bytes=...).
    `runner="beam"` runs the shards as an Apache Beam pipeline instead (`beam_runner.py`;
    `beam_args` are Beam's pipeline options); the store is the same.
    """
    if runner not in ("local", "beam"):
        raise DataError(f"unknown prepare runner {runner!r}; expected local or beam")
    out = Path(out_dir)
    tok_id = tokenizer_identity(tokenizer, add_bos)
    key = _source_key(spec, tok_id)
    inputs = list_inputs(spec)
    with _locked(out):
        old = _read_json(out / "manifest.json")
        if old is not None:
            reason = _describe_change(old, key, tok_id, spec, inputs) or _damage(out, old)
            if reason is None:
                return PrepareReport(name, "current", None, 0, old)
            if log:
                log(f"data: source {name!r}: {reason}; preparing again")
            # Before anything changes: a reader must never take a half-updated store as complete.
            (out / "manifest.json").unlink()
        else:
            reason = None
        _clean_debris(out, len(inputs))
        (out / "shards").mkdir(parents=True, exist_ok=True)
        metas: dict[int, dict] = {}
        todo = []
        for k, ident in enumerate(inputs):
            meta = _shard_current(out, k, ident, key)
            if meta is not None:
                metas[k] = meta
            else:
                todo.append(ShardJob(name, spec, k, ident, str(out), key, tokenizer, add_bos))
        if progress is not None:
            progress(files=len(inputs), done_files=len(metas),
                     done_bytes=sum(inputs[k].get("size", 0) for k in metas))
        if runner == "beam" and todo:
            beam_runner.run_with_beam(todo, beam_args, prepare_shard)
            for job in todo:
                meta = _shard_current(out, job.index, job.input, key)
                if meta is None:
                    raise DataError(f"{_shard_paths(out, job.index)['meta']}: the Beam pipeline "
                                    "finished without writing this shard (is the store directory "
                                    "shared with the workers?)")
                metas[job.index] = meta
        else:
            _run_jobs(todo, workers, metas, progress, inputs)
        ordered = [metas[k] for k in range(len(inputs))]
        splits = {s: {"docs": sum(m[s]["docs"] for m in ordered),
                      "tokens": sum(m[s]["tokens"] for m in ordered)} for s in SPLITS}
        if splits["train"]["docs"] + splits["eval"]["docs"] == 0:
            raise DataError(f"source {name!r} ({spec.path}) has no documents")
        if splits["train"]["docs"] == 0:
            raise DataError(f"source {name!r} ({spec.path}) has no training documents")
        for s in SPLITS:
            _write_index(out, ordered, s)
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "source": name, "key": key,
            "path": spec.path, "reading": _reading_options(spec), "tokenizer": tok_id,
            "dtype": token_dtype(tokenizer.vocab_size).name, "chunk_tokens": CHUNK_TOKENS,
            "inputs": inputs,
            "shards": [{s: m[s] for s in SPLITS} for m in ordered],
            "splits": splits,
        }
        _write_json(out / "manifest.json", manifest)
    return PrepareReport(name, "prepared", reason, len(todo), manifest)


def _run_jobs(todo: list[ShardJob], workers: int, metas: dict, progress, inputs) -> None:
    def done(k, meta):
        metas[k] = meta
        if progress is not None:
            progress(done_files=1, done_bytes=inputs[k].get("size", 0), tokens=0)

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            meta = prepare_shard(job, (lambda n: progress(tokens=n)) if progress else None)
            done(job.index, meta)
        return
    # spawn, not fork: the caller may hold JAX's threads (training's auto-prepare).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(todo))) as pool:
        for k, meta in pool.imap_unordered(_run_job, todo):
            if progress is not None:
                progress(tokens=sum(meta[s]["tokens"] for s in SPLITS))
            done(k, meta)


# ----------------------------------------------------------------------------- the whole store


def _progress_bar():
    """A rich bar over input bytes (the one size known before reading) with tokens/s and ETA."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TextColumn("{task.fields[files]}"), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def prepare_store(sources: Mapping[str, Source], tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                  add_bos: bool = False, workers: int = 1, show_progress: bool = False,
                  log: Callable[[str], None] | None = print, runner: str = "local",
                  beam_args: Sequence[str] = ()) -> list[PrepareReport]:
    """Prepares every source into out_dir/<name> and writes out_dir/manifest.json (image_text
    and audio_text sources are not in the store: training reads them into memory,
    `image_text.py` / `audio_text.py`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name, spec in sources.items():
        if spec.resolved_kind in MEDIA_KINDS:
            if log:
                log(f"data: source {name!r} is {spec.resolved_kind}: read at training start, not stored")
            continue
        if show_progress and runner == "local":
            reports.append(_with_bar(name, spec, tokenizer, out / name, add_bos, workers, log))
        else:
            reports.append(prepare_source(name, spec, tokenizer, out / name, add_bos=add_bos,
                                          workers=workers, log=log, runner=runner, beam_args=beam_args))
    summary = {"format": FORMAT, "version": FORMAT_VERSION,
               "tokenizer": tokenizer_identity(tokenizer, add_bos),
               "sources": {r.source: {"dir": r.source, "key": r.manifest["key"], "path": r.manifest["path"],
                                      "inputs": len(r.manifest["inputs"]), "splits": r.manifest["splits"]}
                           for r in reports}}
    if _read_json(out / "manifest.json") != json.loads(json.dumps(summary)):
        with _locked(out):
            _write_json(out / "manifest.json", summary)
    return reports


def _with_bar(name, spec, tokenizer, out, add_bos, workers, log) -> PrepareReport:
    bar = _progress_bar()
    state = {"tokens": 0, "files": 0, "done": 0, "t0": time.monotonic(), "task": None}
    total_bytes = sum(i.get("size", 0) for i in list_inputs(spec)) or 1

    def progress(tokens=0, files=None, done_files=0, done_bytes=0):
        if files is not None:
            state["files"] = files
        state["tokens"] += tokens
        state["done"] += done_files
        rate = state["tokens"] / max(time.monotonic() - state["t0"], 1e-9)
        bar.update(state["task"], advance=done_bytes,
                   files=f"{state['done']}/{state['files']} files",
                   rate=f"{rate / 1e6:.2f} M tok/s")

    with bar:
        state["task"] = bar.add_task(f"prepare {name}", total=total_bytes, files="", rate="")
        return prepare_source(name, spec, tokenizer, out, add_bos=add_bos, workers=workers,
                              progress=progress, log=log)


# ----------------------------------------------------------------------------- reading


class DocIndex:
    """Counts from a document start table `starts` [n_docs + 1] (token offsets, starts[0] = 0)."""

    starts: np.ndarray

    @property
    def num_docs(self) -> int:
        return len(self.starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])


class StoreDocs(DocIndex):
    """One split of a prepared source: the `TokenizedDocs` interface, read from disk.

    `starts` is memory-mapped; tokens are read by `read_ranges`, one batched random read of
    ArrayRecord records per shard touched. `reads` counts the records fetched and `calls` the
    read calls (the multi-process test counts them per process).

    The readers are array_record's own, opened lazily per shard (so a process opens only the
    shards its rows touch). Grain's `ArrayRecordDataSource` wraps the same readers, but its batched
    read (`__getitems__`) starts a thread pool on every call: ~2 ms per call here, 15x the cost of
    the packing itself, and a row is one call.
    """

    def __init__(self, directory: str | os.PathLike, split: str, manifest: dict):
        self.directory = Path(directory)
        self.split = split
        self.starts = np.load(self.directory / f"index.{split}.npy", mmap_mode="r")
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.chunk = int(manifest["chunk_tokens"])
        shards = [(k, s[split]) for k, s in enumerate(manifest["shards"]) if s[split]["records"]]
        self._paths = [_shard_paths(self.directory, k)[split] for k, _ in shards]
        for path, (_, meta) in zip(self._paths, shards):  # a stat each: damage shows at start
            if not path.is_file():
                raise DataError(f"{path}: shard missing from a prepared store; prepare it again")
            if path.stat().st_size != meta["bytes"]:
                raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                                f"{meta['bytes']}; prepare it again")
        self._token_starts = np.cumsum([0] + [s["tokens"] for _, s in shards])
        self._record_counts = [s["records"] for _, s in shards]
        self._readers: dict[int, object] = {}
        self._lock = threading.Lock()
        self.reads = 0
        self.calls = 0

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            from array_record.python import array_record_module

            path = self._paths[shard]
            try:
                reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
            except Exception as e:  # array_record raises plain errors on a damaged file
                raise DataError(f"{path}: cannot open token shard ({e}); prepare it again") from e
            if reader.num_records() != self._record_counts[shard]:
                raise DataError(f"{path}: {reader.num_records()} records, the manifest says "
                                f"{self._record_counts[shard]}; prepare it again")
            self._readers[shard] = reader
        return reader

    def _records(self, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """{(shard, record): ids} of the wanted records, one read call per shard."""
        by_shard: dict[int, list[int]] = {}
        for shard, rec in wanted:
            by_shard.setdefault(shard, []).append(rec)
        out = {}
        with self._lock:
            self.calls += 1
            self.reads += len(wanted)
            for shard, recs in by_shard.items():
                try:
                    raw = self._reader(shard).read(recs)
                except DataError:
                    raise
                except Exception as e:
                    raise DataError(f"{self._paths[shard]}: cannot read records {recs[:3]}... ({e}); "
                                    "prepare it again") from e
                out.update({(shard, r): np.frombuffer(b, self.dtype) for r, b in zip(recs, raw)})
        return out

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Tokens [a, b) of each range (int32), fetching every record needed in one read."""
        pieces = []  # per range: [((shard, record), lo, hi)]
        needed = set()
        for a, b in ranges:
            parts = []
            t = a
            while t < b:
                shard = int(np.searchsorted(self._token_starts, t, side="right")) - 1
                local = t - int(self._token_starts[shard])
                rec, first = local // self.chunk, t - local % self.chunk
                end = min(first + self.chunk, int(self._token_starts[shard + 1]), b)
                parts.append(((shard, rec), t - first, end - first))
                needed.add((shard, rec))
                t = end
            pieces.append(parts)
        records = self._records(sorted(needed)) if needed else {}
        out = []
        for parts in pieces:
            arrays = [records[key][lo:hi] for key, lo, hi in parts]
            out.append(np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32))
        return out


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "manifest.json"
    manifest = _read_json(path)
    if manifest is None:
        raise DataError(f"{path}: no token store manifest (run llama4-jax data prepare)")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a version-{FORMAT_VERSION} token store "
                        f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def open_source(directory: str | os.PathLike) -> dict[str, StoreDocs]:
    """{split: StoreDocs} of a prepared source's non-empty splits."""
    manifest = read_manifest(directory)
    return {s: StoreDocs(directory, s, manifest) for s in SPLITS if manifest["splits"][s]["docs"]}


def ensure_prepared(store_dir: str | os.PathLike, name: str, spec: Source, tokenizer: Tokenizer, *,
                    add_bos: bool = False, workers: int = 1,
                    log: Callable[[str], None] | None = print) -> dict[str, StoreDocs]:
    """Opens source `name` of the store, preparing it first if it is missing or stale."""
    out = Path(store_dir) / name
    status, _ = source_status(out, spec, tokenizer, add_bos)
    if status != "current":
        if log and status == "missing":
            log(f"data: preparing source {name!r} into {out}")
        prepare_source(name, spec, tokenizer, out, add_bos=add_bos, workers=workers, log=log)
    return open_source(out)


def open_store_sources(store_dir: str | os.PathLike) -> dict[str, dict]:
    """{source name: its manifest} of every prepared source under a store directory."""
    root = Path(store_dir)
    if not root.is_dir():
        raise DataError(f"token store not found: {root}")
    found = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / "manifest.json").is_file():
            found[sub.name] = read_manifest(sub)
    if not found and (root / "shards").is_dir():
        raise DataError(f"{root}: source is not completely prepared (no manifest.json)")
    if not found:
        raise DataError(f"{root}: no prepared sources (run llama4-jax data prepare)")
    return found



# ----------------------------------------------------------------------------- reporting


def describe_report(report: PrepareReport) -> str:
    m = report.manifest
    tr, ev = m["splits"]["train"], m["splits"]["eval"]
    what = ("unchanged, nothing written" if report.status == "current"
            else f"{report.shards_written} of {len(m['inputs'])} shard(s) written")
    return (f"{report.source}: {tr['docs'] + ev['docs']:,} documents ({tr['docs']:,} train, {ev['docs']:,} eval), "
            f"{tr['tokens']:,} + {ev['tokens']:,} tokens, {m['dtype']}; {what}")
