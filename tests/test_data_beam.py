"""`llama4-jax data prepare --runner beam`: the Beam pipeline (in-process FnApiRunner) writes a
store byte-identical to the local runner's, and a bad input is still one line.

apache-beam 2.77 moves protobuf, pyarrow and Pillow pins, so it is not in the project venv: this
test runs in its own environment (see README, "Beam"):
    python -m venv /tmp/beamvenv && echo "$(/path/to/.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')" \
        > /tmp/beamvenv/lib/python3.11/site-packages/main_venv.pth && /tmp/beamvenv/bin/pip install 'apache-beam==2.77.*'
    PYTHONPATH=$PWD /tmp/beamvenv/bin/python -m pytest -q tests/test_data_beam.py
In the project venv (no apache_beam) it is skipped, and the error a user gets without Beam is tested.
"""

import importlib.util

import numpy as np
import pytest

from llama4_jax.data import ByteTokenizer, DataError, Source
from llama4_jax.data import store

TOK = ByteTokenizer()
HAVE_BEAM = importlib.util.find_spec("apache_beam") is not None


def _corpus(folder, n_files=4):
    rng = np.random.default_rng(0)
    words = np.array("alpha beta gamma delta epsilon zeta eta theta".split())
    folder.mkdir()
    for k in range(n_files):
        (folder / f"f{k}.txt").write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(2, 40)))
                                                       for _ in range(200)))
    return Source(kind="text", path=str(folder), split="paragraph", eval_fraction=0.1)


def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.skipif(not HAVE_BEAM, reason="apache-beam is not installed in this environment (see the module doc)")
def test_beam_and_local_write_byte_identical_stores(tmp_path):
    spec = _corpus(tmp_path / "in")
    store.prepare_source("s", spec, TOK, tmp_path / "local")
    report = store.prepare_source("s", spec, TOK, tmp_path / "beam", runner="beam")
    assert report.shards_written == 4
    local, beam = _files(tmp_path / "local"), _files(tmp_path / "beam")
    assert local == beam and len(local) == 4 * 5 + 3
    # a broken input: one line naming the file and line, as locally
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=f"^{bad}:2: invalid JSON"):
        store.prepare_source("b", Source(kind="jsonl", path=str(bad)), TOK, tmp_path / "b", runner="beam")


@pytest.mark.skipif(HAVE_BEAM, reason="checks the message users get without the extra")
def test_beam_runner_without_beam_is_one_line(tmp_path):
    spec = _corpus(tmp_path / "in", n_files=1)
    with pytest.raises(DataError, match=r"--runner beam needs Apache Beam: pip install 'llama4-jax\[beam\]'"):
        store.prepare_source("s", spec, TOK, tmp_path / "out", runner="beam")
