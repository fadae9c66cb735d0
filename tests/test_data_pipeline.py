"""Packing, mixing, exact resume, process sharding and eval batches of the data pipeline."""

import collections
import json
import math

import grain
import numpy as np
import pytest
from source_helpers import load_docs, named
from etils import epath

from llama4_jax.data import ByteTokenizer, DataError, build_mixture
from llama4_jax.data import pipeline
from llama4_jax.data.pipeline import PackedStream, row_dataset, tokenize_documents

TOK = ByteTokenizer()
SEED = 7
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "source_ids")


def random_docs(rng, n, max_len):
    letters = np.array(list("abcdefghij klmnop"))
    return ["".join(rng.choice(letters, rng.integers(1, max_len))) for _ in range(n)]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    out = []
    for name, n, max_len in (("a", 60, 90), ("b", 40, 40), ("c", 15, 200)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in random_docs(rng, n, max_len)))
        out.append(named(name, str(path), eval_fraction=0.2))
    return out


def make(specs, **kw):
    args = dict(seed=SEED, seq_len=16, global_batch=8) | kw
    return build_mixture({s.name: s.source for s in specs}, TOK, **args)


def train_stream(spec):
    docs = tokenize_documents(load_docs(spec)[0], TOK)
    return docs, PackedStream(docs, seed=SEED, name=spec.name, shuffle=True, pad_id=TOK.pad_id)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert set(x) == set(KEYS)
        for key in KEYS:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


# ----------------------------------------------------------------------------- packing


def split_into_documents(rows):
    """Documents (token lists) of consecutive rows, cut where positions restart at 0."""
    inputs = np.concatenate([r["inputs"] for r in rows])
    positions = np.concatenate([r["positions"] for r in rows])
    cuts = np.flatnonzero(positions == 0)
    return [inputs[s:e].tolist() for s, e in zip(cuts, cuts[1:])]


def test_rows_reconstruct_each_epoch_as_a_permutation_of_the_documents(specs):
    docs, stream = train_stream(specs[0])
    seq_len = 16
    num_rows = 3 * docs.num_tokens // seq_len  # a bit under three epochs
    rows = [row_dataset(stream, seq_len)[i] for i in range(num_rows)]

    # The stream continues across rows: each row's last target is the next row's first input.
    for r, nxt in zip(rows, rows[1:]):
        assert np.array_equal(r["targets"][:-1], r["inputs"][1:])
        assert r["targets"][-1] == nxt["inputs"][0]

    # Documents cut out of the rows are the tokenized documents (eos appended), each exactly
    # once per epoch, in an order that differs between epochs.
    pieces = split_into_documents(rows)
    expected = sorted(docs.document(d).tolist() for d in range(docs.num_docs))
    assert all(p[-1] == TOK.eos_id for p in pieces)
    epoch0, epoch1 = pieces[: docs.num_docs], pieces[docs.num_docs: 2 * docs.num_docs]
    assert sorted(epoch0) == expected and sorted(epoch1) == expected
    assert epoch0 != epoch1


def test_segment_ids_positions_and_loss_mask_follow_document_boundaries(specs):
    _, stream = train_stream(specs[2])
    seq_len = 32
    rows = [row_dataset(stream, seq_len)[i] for i in range(200)]
    for r, nxt in zip(rows, rows[1:]):
        starts = r["positions"] == 0
        next_positions = np.append(r["positions"][1:], nxt["positions"][0])
        # A new segment exactly where a document starts (and at the row start).
        expected_segments = np.cumsum(np.append(True, starts[1:]))
        assert np.array_equal(r["segment_ids"], expected_segments)
        # Positions count up by one inside a document.
        steps = np.diff(r["positions"])[~starts[1:]]
        assert np.all(steps == 1)
        # The loss is masked exactly where the target opens another document, after an eos.
        boundary = next_positions == 0
        assert np.array_equal(r["loss_mask"] == 0, boundary)
        assert np.all(r["inputs"][boundary] == TOK.eos_id)
        assert r["loss_mask"].dtype == np.float32 and r["segment_ids"].min() == 1


def test_token_cache_is_written_and_reused(specs, tmp_path, monkeypatch):
    docs = load_docs(specs[1])[0]
    first = tokenize_documents(docs, TOK, cache_dir=tmp_path, name="b")
    assert len(list(tmp_path.glob("tokens-b-*.npz"))) == 1

    def must_not_tokenize(*args):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(pipeline, "_tokenize", must_not_tokenize)
    again = tokenize_documents(docs, TOK, cache_dir=tmp_path, name="b")
    assert np.array_equal(again.tokens, first.tokens) and np.array_equal(again.starts, first.starts)
    with pytest.raises(AssertionError):  # other documents, other key
        tokenize_documents(docs[1:], TOK, cache_dir=tmp_path, name="b")


# ----------------------------------------------------------------------------- mixing


def test_mixture_proportions_and_each_token_used_once(specs):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    it = make(specs, weights=weights, seq_len=8, global_batch=16)
    batches = take(it, 1000)
    ids = np.concatenate([b["source_ids"] for b in batches])
    n = ids.size
    for index, name in enumerate(it.source_names):
        p = weights[name]
        # 4 binomial standard errors (~0.016 here): fails by chance about once in 16,000 runs.
        assert abs(np.mean(ids == index) - p) < 4 * math.sqrt(p * (1 - p) / n), name

    # Per source, the rows taken in order tile its stream: every token once before any repeat.
    for index, spec in enumerate(specs):
        inputs = np.concatenate([b["inputs"][b["source_ids"] == index] for b in batches]).ravel()
        _, stream = train_stream(spec)
        assert np.array_equal(inputs, stream.read(0, inputs.size)[0])
        assert it.get_state()["cursors"][spec.name] == inputs.size
    it.close()


def test_batch_layout(specs):
    it = make(specs, seq_len=12, global_batch=6)
    batch = next(it)
    dtypes = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
              "positions": np.int32, "loss_mask": np.float32, "source_ids": np.int32}
    for key, dtype in dtypes.items():
        assert batch[key].dtype == dtype
        assert batch[key].shape == ((6,) if key == "source_ids" else (6, 12))
    it.close()


def drive(it, steps, events):
    """Batches of `steps` steps, applying {step: callable(it)} before the batch of that step."""
    out = []
    for s in range(it.step, it.step + steps):
        if s in events:
            events[s](it)
        out.append(next(it))
    return out


EVENTS = {
    3: lambda it: it.set_weights({"a": 0.1, "c": 0.9}),
    9: lambda it: it.set_stage(1, 24, 4),
    12: lambda it: it.set_weights({"a": 1.0, "b": 1.0, "c": 1.0}),
}


@pytest.mark.parametrize("resume_at", [2, 6, 10])
def test_restored_state_continues_bit_identically(specs, resume_at):
    reference = make(specs)
    expected = drive(reference, 16, EVENTS)

    first = make(specs)
    drive(first, resume_at, EVENTS)
    state = json.loads(json.dumps(first.get_state()))  # must survive a JSON checkpoint
    first.close()

    resumed = make(specs, seq_len=99, global_batch=2)  # the state, not the arguments, decides
    resumed.set_state(state)
    assert_batches_equal(drive(resumed, 16 - resume_at, EVENTS), expected[resume_at:])
    assert resumed.get_state() == reference.get_state()
    reference.close()
    resumed.close()


def test_state_survives_grain_checkpoint_handler(specs, tmp_path):
    it = make(specs)
    take(it, 5)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = take(it, 4)

    restored = make(specs, prefetch=False)
    handler.restore(epath.Path(tmp_path), item=restored)
    assert restored.step == 5
    assert_batches_equal(take(restored, 4), expected)


def test_process_slices_concatenate_to_the_global_batch(specs):
    single = make(specs, global_batch=8)
    shards = [make(specs, global_batch=8, process_index=p, process_count=2) for p in range(2)]
    events = {4: lambda it: it.set_stage(1, 20, 4), 6: lambda it: it.set_weights({"b": 1.0})}
    expected = drive(single, 8, events)
    parts = [drive(shard, 8, events) for shard in shards]
    for step, batch in enumerate(expected):
        merged = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in KEYS}
        assert_batches_equal([merged], [batch])
    assert shards[0].get_state() == shards[1].get_state() == single.get_state()


def test_stage_change_continues_each_source_where_it_stopped(specs):
    it = make(specs, weights={"c": 1.0}, seq_len=16, global_batch=4)
    before = take(it, 3)
    it.set_stage(1, 40, 2)
    after = take(it, 3)
    consumed = np.concatenate([b["inputs"].ravel() for b in before + after])
    _, stream = train_stream(specs[2])
    assert np.array_equal(consumed, stream.read(0, consumed.size)[0])


# ----------------------------------------------------------------------------- eval


def test_eval_batches_are_fixed_padded_and_cover_the_held_out_split(specs):
    it = make(specs, seq_len=16, global_batch=4)
    first = list(it.eval_batches("c"))
    assert_batches_equal(list(it.eval_batches("c")), first)
    take(it, 3)  # training does not move eval
    assert_batches_equal(list(it.eval_batches("c")), first)

    held_out = tokenize_documents(load_docs(specs[2])[1], TOK)
    stream = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in first])
    assert np.array_equal(stream, held_out.tokens)
    # Every token except a document's first is predicted exactly once.
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in first])
    not_first = np.ones(held_out.num_tokens, bool)
    not_first[held_out.starts[:-1]] = False
    assert np.array_equal(targets, held_out.tokens[not_first])
    last = first[-1]
    assert np.all(last["inputs"][last["segment_ids"] == 0] == TOK.pad_id)
    assert np.all(last["loss_mask"][last["segment_ids"] == 0] == 0)
    assert all(b["inputs"].shape == (4, 16) for b in first)
    assert np.all(np.concatenate([b["source_ids"] for b in first]) == 2)

    sharded = [make(specs, seq_len=16, global_batch=4, process_index=p, process_count=2)
               for p in range(2)]
    halves = [list(s.eval_batches("c")) for s in sharded]
    for k, batch in enumerate(first):
        assert np.array_equal(np.concatenate([halves[0][k]["targets"], halves[1][k]["targets"]]),
                              batch["targets"])


def test_train_and_eval_documents_do_not_overlap(specs):
    for spec in specs:
        train, held_out = load_docs(spec)
        assert held_out and not set(train) & set(held_out)


# ----------------------------------------------------------------------------- errors


def test_errors_are_data_errors_with_clear_messages(specs, tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        make([named("x", str(tmp_path / "nope.jsonl"))])
    (tmp_path / "empty.jsonl").write_text('{"text": null}\n')
    with pytest.raises(DataError, match="'empty' .*no training documents"):
        make([named("empty", str(tmp_path / "empty.jsonl"))])
    with pytest.raises(DataError, match="unknown source.*: zzz"):
        make(specs, weights={"a": 1.0, "zzz": 1.0})
    with pytest.raises(DataError, match="not divisible by the process count 3"):
        make(specs, global_batch=8, process_count=3)
    it = make(specs)
    with pytest.raises(DataError, match="not divisible"):
        make(specs, process_count=2).set_stage(1, 16, 3)
    with pytest.raises(DataError, match="all 0"):
        it.set_weights({"a": 0.0})
    with pytest.raises(DataError, match="seed"):
        make(specs, seed=SEED + 1).set_state(it.get_state())
    with pytest.raises(DataError, match="unknown source 'zzz'"):
        next(it.eval_batches("zzz"))


def test_same_arguments_give_the_same_batches_and_seed_changes_them(specs):
    counts = collections.Counter()
    a, b, c = make(specs), make(specs), make(specs, seed=SEED + 1)
    xs, ys, zs = take(a, 5), take(b, 5), take(c, 5)
    assert_batches_equal(xs, ys)
    counts["differs"] = sum(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(xs, zs))
    assert counts["differs"] == 5
