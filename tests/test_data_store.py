"""The prepared token store (llama4_jax/data/store.py): prepare is idempotent, resumable after a
kill -9 and reports what changed; malformed inputs fail in one line; training batches read from
the store equal the in-memory pipeline's over the same documents, resume exactly at any step on
another process layout, and each process reads only the records of its own rows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama4_jax.cli import main
from llama4_jax.data import ByteTokenizer, DataError, Source, build_mixture
from llama4_jax.data import store
from llama4_jax.data.pipeline import TokenizedDocs

TOK = ByteTokenizer()
SEED = 3
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "source_ids")


def _text(rng, n_lines):
    words = np.array("the quick brown fox jumps over lazy dogs and cats again é ü 中".split())
    return "".join(" ".join(rng.choice(words, rng.integers(1, 12))) + "\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three sources: a folder of text files (one document per line), a JSONL file, a Parquet
    file; small enough that shards hold a few records of CHUNK_TOKENS ids each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "lines").mkdir()
    for k in range(5):
        (root / "lines" / f"part{k}.txt").write_text(_text(rng, 300 + 40 * k))
    (root / "docs.jsonl").write_text("".join(
        json.dumps({"text": _text(rng, int(rng.integers(1, 30)))}) + "\n" for _ in range(120)))
    pq.write_table(pa.table({"body": [_text(rng, int(rng.integers(1, 50))) for _ in range(60)]}),
                   root / "rows.parquet")
    sources = {
        "lines": Source(kind="text", path=str(root / "lines"), split="line", eval_fraction=0.1),
        "docs": Source(kind="jsonl", path=str(root / "docs.jsonl"), eval_fraction=0.1),
        "rows": Source(kind="parquet", path=str(root / "rows.parquet"), field="body", eval_fraction=0.1),
    }
    return root, sources


def _files(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under a store (but its lock) → (mtime_ns, content)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    _, sources = corpus
    out = tmp_path_factory.mktemp("store")
    reports = store.prepare_store(sources, TOK, out, log=None)
    assert [r.status for r in reports] == ["prepared"] * 3
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for key in KEYS:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def test_prepare_twice_writes_nothing_and_keeps_the_counts(corpus, prepared):
    _, sources = corpus
    before = _files(prepared)
    reports = store.prepare_store(sources, TOK, prepared, log=None)
    assert [r.status for r in reports] == ["current"] * 3 and all(r.shards_written == 0 for r in reports)
    assert _files(prepared) == before  # not one byte nor one mtime
    manifest = json.loads((prepared / "lines" / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and len(manifest["inputs"]) == 5
    assert {"path", "size", "mtime_ns"} <= set(manifest["inputs"][0])
    # counts: every line of every file is a document, on exactly one side of the split
    lines = [l for k in range(5) for l in (corpus[0] / "lines" / f"part{k}.txt").read_text().split("\n") if l.strip()]
    split = manifest["splits"]
    assert split["train"]["docs"] + split["eval"]["docs"] == len(lines)
    assert 0 < split["eval"]["docs"] < len(lines) * 0.2
    assert split["train"]["tokens"] + split["eval"]["tokens"] == sum(len(l.encode()) + 1 for l in lines)


def test_store_batches_equal_the_in_memory_pipeline(corpus, prepared):
    """Same documents, same packing: the store is a storage change, not a data change."""
    _, sources = corpus
    args = dict(seed=SEED, seq_len=48, global_batch=6, weights={"lines": 2, "docs": 1, "rows": 1}, prefetch=0)
    on_disk = build_mixture(sources, TOK, store_dir=prepared, log=None, **args)
    in_ram = build_mixture(sources, TOK, **args)
    # 120 steps: several epochs of the small sources (a fresh permutation each)
    _assert_same(_take(on_disk, 120), _take(in_ram, 120))
    for name in on_disk.eval_source_names:
        _assert_same(list(on_disk.eval_batches(name)), list(in_ram.eval_batches(name)))
    assert isinstance(in_ram._streams[0].docs, TokenizedDocs)
    assert isinstance(on_disk._streams[0].docs, store.StoreDocs)
    # a data state saved by the in-memory pipeline (checkpoints from before the store) resumes
    # on the store at the same position
    state = json.loads(json.dumps(in_ram.get_state()))
    resumed = build_mixture(sources, TOK, store_dir=prepared, log=None, **args)
    resumed.set_state(state)
    _assert_same(_take(resumed, 10), _take(in_ram, 10))


@pytest.mark.parametrize("how", ["prepared", "auto-prepared"])
def test_resume_at_a_random_step_on_another_process_layout(corpus, prepared, tmp_path, how):
    _, sources = corpus
    store_dir = prepared if how == "prepared" else tmp_path / "cache"
    args = dict(seed=SEED, seq_len=40, global_batch=8, store_dir=store_dir, log=None)
    full = _take(build_mixture(sources, TOK, **args), 30)
    k = int(np.random.default_rng().integers(1, 29))
    first = build_mixture(sources, TOK, **args)
    _take(first, k)
    state = json.loads(json.dumps(first.get_state()))  # as a checkpoint stores it
    halves = [build_mixture(sources, TOK, process_index=p, process_count=2, **args) for p in (0, 1)]
    for it in halves:
        it.set_state(state)
    for step in range(k, 30):
        got = [next(it) for it in halves]
        merged = {key: np.concatenate([g[key] for g in got]) for key in KEYS}
        _assert_same([merged], [full[step]])


def test_each_process_reads_only_the_records_of_its_rows(corpus, prepared):
    """Rows are built one read call each: process p makes as many calls as it holds rows, and
    the two processes' record reads add up to one process's reads of the whole batch."""
    _, sources = corpus
    args = dict(seed=SEED, seq_len=64, global_batch=8, store_dir=prepared, log=None, prefetch=0)
    steps = 12

    def run(p, n):
        it = build_mixture(sources, TOK, process_index=p, process_count=n, **args)
        _take(it, steps)
        calls = sum(s.docs.calls for s in it._streams)
        return calls, it.read_stats()

    one = run(0, 1)
    two = [run(p, 2) for p in (0, 1)]
    assert one[0] == one[1]["rows"] == steps * 8
    for calls, stats in two:
        assert calls == stats["rows"] == steps * 4
    assert two[0][1]["records"] + two[1][1]["records"] == one[1]["records"]
    assert 0 < two[0][1]["records"] < one[1]["records"]


def test_changed_input_and_tokenizer_are_reported_in_one_line(corpus, tmp_path):
    root, _ = corpus
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        (folder / f"f{k}.txt").write_text((root / "lines" / f"part{k}.txt").read_text())
    spec = Source(kind="text", path=str(folder), split="line", eval_fraction=0.1)
    out = tmp_path / "store" / "s"
    store.prepare_source("s", spec, TOK, out)
    lines = []
    target = folder / "f1.txt"
    target.write_text(target.read_text() + "one more line\n")
    report = store.prepare_source("s", spec, TOK, out, log=lines.append)
    assert report.status == "prepared" and report.shards_written == 1  # only that file's shard
    assert len(lines) == 1 and f"{target} changed (size" in lines[0] and "\n" not in lines[0], lines

    class OtherTokenizer(ByteTokenizer):
        fingerprint = "other-v1"

    lines.clear()
    report = store.prepare_source("s", spec, OtherTokenizer(), out, log=lines.append)
    assert report.shards_written == 3
    assert lines == ["data: source 's': tokenizer changed (fingerprint: byte-v1 → other-v1); preparing again"]
    assert store.source_status(out, spec, TOK)[0] == "stale"


KILL_SCRIPT = r"""
import sys, time
from llama4_jax.data import ByteTokenizer, Source, store

class SlowBytes(ByteTokenizer):  # the same identity, slowed down so the kill lands mid-run
    def encode_array(self, text):
        time.sleep(0.002)
        return super().encode_array(text)

spec = Source(kind="text", path=sys.argv[1], split="paragraph", eval_fraction=0.1)
store.prepare_source("s", spec, SlowBytes(), sys.argv[2])
"""


def test_kill_9_midway_then_resume_gives_the_same_store(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(24):  # 24 files x 40 documents x 2 ms: ~2 s of preparing
        (folder / f"f{k:02d}.txt").write_text("\n\n".join(_text(rng, 3) for _ in range(40)))
    spec = Source(kind="text", path=str(folder), split="paragraph", eval_fraction=0.1)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(folder), str(killed)], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list((killed / "shards").glob("*.json"))) < 4:
            assert proc.poll() is None, "prepare finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list((killed / "shards").glob("*.json")))
    assert 4 <= done < 24
    # nothing training would read as complete
    assert not (killed / "manifest.json").exists()
    assert store.source_status(killed, spec, TOK)[0] == "missing"
    with pytest.raises(DataError, match="no token store manifest"):
        store.open_source(killed)
    report = store.prepare_source("s", spec, TOK, killed)
    assert report.shards_written == 24 - done
    fresh = tmp_path / "fresh"
    store.prepare_source("s", spec, TOK, fresh)
    assert {k: v[1] for k, v in _files(killed).items()} == {k: v[1] for k, v in _files(fresh).items()}


def _write_experiment(tmp_path, source_yaml) -> Path:
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"""\
model: {{preset: tiny, overrides: {{vocab_size: 264}}}}
data:
  store_dir: store
  sources:
    s: {source_yaml}
curriculum:
  stages:
    - {{name: base, steps: 2, seq_len: 16, batch_size: 2, mixture: {{s: 1.0}}}}
""")
    return exp


def _broken_array_record(path):
    from array_record.python import array_record_module

    w = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for i in range(50):
        w.write(f"record {i} ".encode() * 20)
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # truncated: the footer and index are gone


def _bad_input(kind, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "jsonl":
        p = tmp_path / "in.jsonl"
        p.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "broken\n')
        return "{kind: jsonl, path: in.jsonl}", f"{p}:3: invalid JSON"
    if kind == "parquet":
        p = tmp_path / "in.parquet"
        pq.write_table(pa.table({"body": ["a", "b"]}), p)
        return "{kind: parquet, path: in.parquet}", f"{p}: no column 'text' (columns: body)"
    if kind == "parquet-type":
        p = tmp_path / "in.parquet"
        pq.write_table(pa.table({"text": ["a", "b", "c"]}), p)
        pq.write_table(pa.table({"text": [1, 2, 3]}), p)
        return "{kind: parquet, path: in.parquet}", f"{p}: row 0: column 'text' is int, not a string"
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "a.txt").write_text("\n\n  \n")
        return "{kind: text, path: empty}", f"source 's' ({tmp_path / 'empty'}) has no documents"
    p = tmp_path / "in.array_record"
    _broken_array_record(p)
    return "{kind: array_record, path: in.array_record}", f"{p}: cannot read"


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "parquet-type", "empty", "array_record"])
def test_malformed_input_is_one_line_exit_2_and_nothing_complete(tmp_path, capsys, kind):
    source_yaml, expected = _bad_input(kind, tmp_path)
    exp = _write_experiment(tmp_path, source_yaml)
    assert main(["data", "prepare", str(exp)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama4-jax: error: ") and expected in err and "\n" not in err, err
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.name != ".lock"]
    assert not [p for p in leftovers if p.name == "manifest.json" or p.name.endswith(".tmp")], leftovers


def test_a_damaged_store_shard_is_one_line(corpus, tmp_path):
    _, sources = corpus
    out = tmp_path / "store"
    store.prepare_store({"docs": sources["docs"]}, TOK, out, log=None)
    shard = out / "docs" / "shards" / "00000.train.array_record"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=f"{shard}: 100 bytes, the manifest says .*; prepare it again"):
        build_mixture({"docs": sources["docs"]}, TOK, seed=0, seq_len=16, global_batch=2,
                      store_dir=out, prefetch=0, log=None)
    lines = []  # prepare notices the damage (a stat per shard) and redoes that shard
    report, = store.prepare_store({"docs": sources["docs"]}, TOK, out, log=lines.append)
    assert report.shards_written == 1 and lines == [f"data: source 'docs': {shard} damaged "
                                                    f"(100 bytes, expected {report.manifest['shards'][0]['train']['bytes']}); preparing again"]
    # damage a stat cannot see (same size): the read names the shard
    data = bytearray(shard.read_bytes())
    data[:len(data) // 2] = bytes(len(data) // 2)
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard}: .*prepare it again"):
        it = build_mixture({"docs": sources["docs"]}, TOK, seed=0, seq_len=16, global_batch=2,
                           store_dir=out, prefetch=0, log=None)
        for _ in range(50):
            next(it)


def test_cli_prepare_and_inspect(corpus, tmp_path, capsys):
    root, _ = corpus
    exp = _write_experiment(tmp_path, f"{{kind: jsonl, path: {root / 'docs.jsonl'}}}")
    assert main(["data", "prepare", str(exp), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "s: 120 documents" in out and "1 of 1 shard(s) written" in out
    assert main(["data", "prepare", str(exp)]) == 0
    assert "unchanged, nothing written" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "store"), "--rows", "1", "--seq-len", "40"]) == 0
    shown = capsys.readouterr().out
    assert "uint16" in shown and "s row 0" in shown
    sample = shown[shown.index("s row 0"):].split("\n", 1)[1].strip()
    words = set("the quick brown fox jumps over lazy dogs and cats again é ü 中".split())
    assert sample and set(sample.split()[1:-1]) <= words, sample  # decoded text (ends may be cut)


def test_two_worker_processes_write_the_same_store(corpus, prepared, tmp_path):
    """workers=2 (spawned processes over the input files) gives the bytes workers=1 gave."""
    _, sources = corpus
    out = tmp_path / "lines"
    report = store.prepare_source("lines", sources["lines"], TOK, out, workers=2, log=None)
    assert report.shards_written == 5
    assert ({k: v[1] for k, v in _files(out).items()}
            == {k: v[1] for k, v in _files(prepared / "lines").items()})


def test_streamed_text_splitting_equals_splitting_the_whole_file(tmp_path, monkeypatch):
    """Text files are read in chunks at prepare time; chunk edges must not move documents."""
    from llama4_jax.data.sources import _split_record

    rng = np.random.default_rng(0)
    alphabet = list("ab \n\t\r")
    for trial in range(200):
        path = tmp_path / f"t{trial}.txt"
        path.write_text("".join(rng.choice(alphabet, int(rng.integers(0, 120)), p=[.3, .3, .1, .2, .05, .05])),
                        newline="")
        for split in ("line", "paragraph"):
            monkeypatch.setattr(store, "_STREAM_CHARS", int(rng.integers(1, 9)))
            assert list(store._stream_split_text(str(path), split)) == list(_split_record(path.read_text(), split))
