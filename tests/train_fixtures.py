"""One in-process run of tests/data/tiny_experiment.yaml shared by the trainer tests
(test_train_curriculum.py, test_train_logging.py): compiling the tiny model dominates their time,
so the run happens once per session, with everything any of them reads switched on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import pytest

from llama4_jax.cli import main

TINY = Path(__file__).resolve().parent / "data" / "tiny_experiment.yaml"
EVAL_EVERY = 5  # plus every stage end

_RUNS: dict[str, tuple[Path, list[str]]] = {}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def train(exp: Path, workdir: Path, *overrides: str) -> list[str]:
    """`llama4-jax train` in this process (must exit 0); returns JAX's compile log lines."""
    sets = [a for o in overrides for a in ("--set", o)]
    handler, jax_log = _Collect(), logging.getLogger("jax")
    jax_log.addHandler(handler)
    jax_log.propagate = False  # the compile log is long: keep it out of pytest's report
    try:
        with jax.log_compiles(True):
            rc = main(["train", str(exp), "--workdir", str(workdir), *sets])
    finally:
        jax_log.removeHandler(handler)
        jax_log.propagate = True
    assert rc == 0
    return handler.messages


def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """(workdir, compile log) of the shared tiny run (logging every step, eval every 5 steps)."""
    if "tiny" not in _RUNS:
        workdir = tmp_path_factory.mktemp("tiny") / "run"
        _RUNS["tiny"] = workdir, train(TINY, workdir, f"eval.every_steps={EVAL_EVERY}")
    return _RUNS["tiny"]


def read_rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def train_rows(workdir: Path) -> list[dict]:
    """The rows written for training steps (eval results have their own rows, without `loss`)."""
    return [r for r in read_rows(workdir) if "loss" in r]


# A two-layer tiny model on a generated one-file corpus: the multi-device and multi-process tests
# (test_parallel_mesh.py, test_multihost.py) train it in subprocesses, each with its own mesh.
_SMALL_EXPERIMENT = """\
seed: 0
model: {preset: tiny, overrides: {vocab_size: 264, num_layers: 2}}
mesh: MESH
precision: {param_dtype: float32, compute_dtype: float32}
optimizer: {lr: 3.0e-3, weight_decay: 0.1, grad_clip: 1.0, schedule: {type: stages}}
data:
  tokenizer: {type: byte}
  sources:
    prose: {kind: text, path: corpus.txt, split: line}
curriculum:
  stages:
    - {name: base, steps: 5, seq_len: 32, batch_size: 8, mixture: {prose: 1.0}}
checkpoint: {every_steps: 1000, keep_last: 1, async_save: false}
logging: {every_steps: 1, tensorboard: false, progress: false}
eval: {every_steps: 0}
"""


def write_small_experiment(tmp: Path, mesh: str) -> Path:
    """corpus.txt and exp.yaml (with `mesh:` set to `mesh`) in tmp → the experiment's path."""
    (tmp / "corpus.txt").write_text("".join(
        f"line {i}: the {['quick', 'slow', 'red'][i % 3]} fox jumps over {i * 7 % 13} lazy dogs.\n"
        for i in range(400)))
    exp = tmp / "exp.yaml"
    exp.write_text(_SMALL_EXPERIMENT.replace("MESH", mesh))
    return exp


@pytest.fixture(scope="module", autouse=True)
def xla_cache(request):
    """The session's persistent XLA cache (autouse in every module that imports it): the runs of a file (and the shared tiny run) train
    the same programs, so only the first compiles them."""
    from test_checkpoint_resume import use_xla_cache

    undo = use_xla_cache(request.config)
    yield
    undo()
