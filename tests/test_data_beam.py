"""`llama4-jax data prepare --runner beam`: the Beam pipeline (in-process FnApiRunner) writes a
store byte-identical to the local runner's, and a bad input is still one line.

apache-beam 2.77 moves protobuf, pyarrow and Pillow pins, so it is not in the project venv. Where
it is missing, the Beam test builds its own environment once (README, "Beam"): a venv at
$LLAMA4_JAX_BEAM_VENV (default ~/.cache/llama4_jax/beamvenv) that sees this venv's packages
through a .pth file behind its own, with `apache-beam==2.77.*` installed, and runs itself there.
The error a user gets without Beam is tested in this venv.
"""

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

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


BEAM = "apache-beam==2.77.*"


def _beam_python() -> str:
    """A Python that imports apache_beam and this project: this one, or the Beam venv (made once)."""
    venv = Path(os.environ.get("LLAMA4_JAX_BEAM_VENV", Path.home() / ".cache" / "llama4_jax" / "beamvenv"))
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import apache_beam, llama4_jax"], capture_output=True).returncode == 0:
        return str(py)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    Path(site, "main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after Beam's own packages
    r = subprocess.run([py, "-m", "pip", "install", "-q", BEAM], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(py)


def test_beam_and_local_write_byte_identical_stores(tmp_path):
    if not HAVE_BEAM:  # run this test in the Beam venv
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        r = subprocess.run([_beam_python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                            __file__, "-k", "byte_identical", "--basetemp", str(tmp_path / "beam_run")],
                           capture_output=True, text=True, env=env, timeout=1200)
        assert r.returncode == 0 and "1 passed" in r.stdout, (r.stdout + r.stderr)[-3000:]
        return
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
