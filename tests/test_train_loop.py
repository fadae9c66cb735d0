"""The loop's own duties on a small two-layer run: throughput that counts training only (eval and
checkpoint time logged apart), the non-finite stop checked every step, and out-of-memory as a
one-line user error that leaves the checkpoints whole."""

import time

import pytest
from jax.errors import JaxRuntimeError

from llama4_jax.cli import main
from llama4_jax.train.checkpoint import Checkpointer
from llama4_jax.train.loop import Trainer
from train_fixtures import train_rows, write_small_experiment

SLEEP = 5.0  # seconds added to every eval and every checkpoint save: far above a tiny step, even on a
# loaded 2-core host running two test workers (a tiny step there took up to 2.2 s once)


def _train(tmp_path, *sets) -> tuple[int, object]:
    exp = write_small_experiment(tmp_path, "{data: -1}")
    workdir = tmp_path / "run"
    argv = ["train", str(exp), "--workdir", str(workdir)]
    for s in sets:
        argv += ["--set", s]
    return main(argv), workdir


def test_tokens_per_s_counts_train_steps_only(tmp_path, monkeypatch):
    evaluate, save = Trainer.evaluate, Trainer.save
    monkeypatch.setattr(Trainer, "evaluate", lambda self, plan: (time.sleep(SLEEP), evaluate(self, plan))[1])
    monkeypatch.setattr(Trainer, "save", lambda self, step, plan: (time.sleep(SLEEP), save(self, step, plan))[1])
    rc, workdir = _train(tmp_path, "curriculum.stages[0].steps=8", "eval.every_steps=4", "checkpoint.every_steps=3")
    assert rc == 0
    rows = {r["step"]: r for r in train_rows(workdir)}
    tokens = 32 * 8
    # Eval at 4 and 8 (its row); saves at 3 and 6 (reported in the next row, 4 and 7) and at 8.
    for step in (4, 8):
        assert rows[step]["time/eval_s"] >= SLEEP, rows[step]
    for step in (4, 7):
        assert rows[step]["time/checkpoint_s"] >= SLEEP, rows[step]
    for step in (2, 3, 5, 6):
        assert "time/eval_s" not in rows[step] and "time/checkpoint_s" not in rows[step], rows[step]
    for step in range(2, 9):
        # The training time behind tokens_per_s: one tiny step, never an eval or a save.
        assert tokens / rows[step]["tokens_per_s"] < SLEEP / 2, (step, rows[step]["tokens_per_s"])


def test_non_finite_stop_is_checked_every_step(tmp_path, capsys):
    """lr 1e30 blows the weights up: every step after the first few is non-finite. Rows are logged
    every 100 steps, yet the run stops within a step of reaching max_bad_steps = 2."""
    rc, workdir = _train(tmp_path, "optimizer.lr=1e30", "optimizer.max_bad_steps=2", "logging.every_steps=100",
                         "curriculum.stages[0].steps=30")
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "2 consecutive non-finite steps" in err, err
    last = train_rows(workdir)[-1]
    assert last["skipped_steps"] >= 2, last
    assert last["step"] <= last["step"] - last["skipped_steps"] + 3, last  # good steps + 2 bad + at most 1 late


def test_out_of_memory_is_a_one_line_user_error_and_keeps_checkpoints(tmp_path, capsys, monkeypatch):
    setup = Trainer.setup

    def setup_then_fail_third_step(self):
        setup(self)
        calls = []

        def failing(real):
            def step(state, batch):
                calls.append(1)
                if len(calls) == 3:
                    raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes.")
                return real(state, batch)
            return step

        self.train_steps = {n: failing(f) for n, f in self.train_steps.items()}

    monkeypatch.setattr(Trainer, "setup", setup_then_fail_third_step)
    capsys.readouterr()
    rc, workdir = _train(tmp_path, "checkpoint.every_steps=2")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2, err
    assert last.startswith("llama4-jax: error: out of device memory"), err
    for part in ("stage base", "batch 8 × seq_len 32", "32.0 GiB", "model.runtime.remat=full",
                 "curriculum.stages[0].microbatches", "curriculum.stages[0].batch_size", "checkpoints are intact"):
        assert part in last, (part, last)
    assert Checkpointer(workdir / "checkpoints", keep_last=1).steps() == [2]
    assert [r["step"] for r in train_rows(workdir)] == [1, 2]
