"""One in-process run of tests/data/tiny_experiment.yaml shared by the trainer tests
(test_train_curriculum.py, test_train_logging.py): compiling the tiny model dominates their time,
so the run happens once per session, with everything any of them reads switched on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax

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
