"""Faults around checkpoints: `kill -9` at random moments (one of them mid-save) and SIGTERM never
leave a run that cannot continue exactly; a second SIGINT aborts at once; a truncated latest
checkpoint is skipped with a warning naming it; an incompatible model config is exit 2 naming
the parameter. The kill tests run `llama4-jax train` in real processes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_checkpoint_resume import (TOTAL, assert_same_state, experiment, metrics, step_dirs, train,
                                    use_xla_cache, xla_cache_env)

REPO = Path(__file__).resolve().parent.parent
# `llama4-jax train EXP --workdir RUN` in a real process, minus the peak-FLOP/s measurement
# (seconds of matmuls that only feed the MFU column).
TRAIN_SCRIPT = ("import sys\n"
                "from llama4_jax.train import loop\n"
                "loop.device_peak_flops = lambda *a, **kw: (1e12, 'test')\n"
                "from llama4_jax.cli import main\n"
                "sys.exit(main(['train', sys.argv[1], '--workdir', sys.argv[2]]))\n")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request):
    undo = use_xla_cache(request.config)
    root = tmp_path_factory.mktemp("reference")
    exp = experiment(root)
    assert train(exp, root / "run")[0] == 0
    yield exp, root / "run"
    undo()


def copy_run(ref: Path, dst: Path) -> Path:
    shutil.copytree(ref, dst)
    return dst


# --- damaged and incompatible checkpoints ----------------------------------------------------------
def _largest_state_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("victim", ["state_chunk", "meta_json"])
def test_truncated_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, capsys, caplog, victim):
    exp, ref = reference
    run = copy_run(ref, tmp_path / "run")
    latest = run / "checkpoints" / str(TOTAL)
    f = _largest_state_file(latest) if victim == "state_chunk" else latest / "meta" / "metadata"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    rc, out, err = train(exp, run, capsys=capsys)
    assert rc == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"checkpoint {latest} is damaged" in w for w in warnings), warnings
    assert f"resumed from {run / 'checkpoints' / str(TOTAL - 1)}" in out
    # The damaged one is set aside, the last step is trained again, and the run ends exactly as
    # the one that was never damaged.
    assert (run / "checkpoints" / f"{TOTAL}.damaged").is_dir()
    assert_same_state(latest, ref / "checkpoints" / str(TOTAL))
    assert metrics(run) == metrics(ref)


def test_half_written_checkpoint_is_never_picked_up_and_is_cleaned(reference, tmp_path, capsys):
    """What `kill -9` during a save leaves (seen in the kill test below): Orbax's tmp directory."""
    exp, ref = reference
    run = copy_run(ref, tmp_path / "run")
    tmp = run / "checkpoints" / f"{TOTAL + 5}.orbax-checkpoint-tmp"
    for item in ("state", "data", "meta"):
        (tmp / f"{item}.orbax-checkpoint-tmp").mkdir(parents=True)
    shutil.copy(ref / "checkpoints" / str(TOTAL) / "_CHECKPOINT_METADATA", tmp)
    rc, out, err = train(exp, run, capsys=capsys)
    assert rc == 0, err
    assert f"resumed from {run / 'checkpoints' / str(TOTAL)}" in out
    assert not tmp.exists() and step_dirs(run) == step_dirs(ref)


def test_no_restorable_checkpoint_is_exit_2_naming_the_newest(reference, tmp_path, capsys):
    exp, ref = reference
    run = copy_run(ref, tmp_path / "run")
    for step in step_dirs(run):
        (run / "checkpoints" / str(step) / "meta" / "metadata").write_text("{")
    rc, out, err = train(exp, run, capsys=capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert f"{run / 'checkpoints' / str(TOTAL)}" in err and "can be restored" in err


def test_incompatible_model_config_is_exit_2_naming_the_parameter(reference, tmp_path, capsys):
    exp, ref = reference
    run = copy_run(ref, tmp_path / "run")
    resolved = (run / "config.resolved.yaml").read_text()
    rc, out, err = train(exp, run, "--set", "model.overrides.dense_ff=256", capsys=capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "incompatible model config: dense_ff (checkpoint: 128, experiment: 256)" in lines[0]
    assert str(run / "checkpoints" / str(TOTAL)) in lines[0]
    assert (run / "config.resolved.yaml").read_text() == resolved  # the workdir still describes the run
    assert step_dirs(run) == step_dirs(ref)


def test_init_from_an_incompatible_checkpoint_is_exit_2_naming_the_parameter(reference, tmp_path, capsys):
    _, ref = reference
    exp = experiment(tmp_path, init_from=str(ref))
    rc, out, err = train(exp, tmp_path / "run", "--set", "model.overrides.num_heads=8", capsys=capsys)
    assert rc == 2
    assert err.strip().splitlines() == [f"llama4-jax: error: init_from {ref}: incompatible model config: "
                                        "num_heads (checkpoint: 4, experiment: 8)"]


def test_resume_compares_the_architecture_only():
    """What may change on resume follows from the types: ModelConfig is compared, RuntimeConfig
    (dtypes, remat, dispatch) is not — also for a pre-split file holding both in one dict."""
    import dataclasses

    from llama4_jax.model.config import preset
    from llama4_jax.model.store import config_to_dict
    from llama4_jax.train.loop import _config_mismatch

    cfg = preset("tiny")
    saved = config_to_dict(cfg)
    legacy = {**saved, "compute_dtype": "bfloat16", "remat": True, "scan_layers": False,
              "moe": {**saved["moe"], "dispatch": "dense", "capacity_factor": 2.0, "aux_loss_coef": 0.1}}
    assert _config_mismatch(legacy, cfg) is None
    other = cfg.replace(moe=dataclasses.replace(cfg.moe, num_experts=8))
    assert _config_mismatch(saved, other) == "moe.num_experts (checkpoint: 4, experiment: 8)"
    assert _config_mismatch(legacy, other) == "moe.num_experts (checkpoint: 4, experiment: 8)"


def test_resume_drops_metrics_rows_past_the_checkpoint_and_a_row_cut_short(tmp_path):
    from llama4_jax.train.loop import _trim_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(f'{{"step": {s}, "loss": 1.5}}\n' for s in range(1, 6)) + '{"step": 6, "lo')
    _trim_metrics(f, 3)
    assert f.read_text() == "".join(f'{{"step": {s}, "loss": 1.5}}\n' for s in range(1, 4))


# --- signals and kill -9 ------------------------------------------------------------------------------
class Proc:
    """One `llama4-jax train` process with its output in files (no pipe can fill up)."""

    def __init__(self, exp: Path, run: Path, env: dict, log: Path):
        self.run, self.log = run, log
        self.out, self.err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
        self.resume_step = step_dirs(run)[-1] if (run / "checkpoints").is_dir() and step_dirs(run) else 0
        jsonl = run / "metrics.jsonl"
        self.stale = jsonl.exists() and any(s > self.resume_step for s in _logged_steps(jsonl))
        self.inode = jsonl.stat().st_ino if jsonl.exists() else None
        self.p = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(exp), str(run)],
                                  env=env, stdout=self.out, stderr=self.err, cwd=REPO)

    def last_step(self) -> int:
        """Last step this process logged (rows a killed predecessor logged past its last
        checkpoint count only once the new process has trimmed them)."""
        jsonl = self.run / "metrics.jsonl"
        try:
            if self.stale and jsonl.stat().st_ino == self.inode:
                return 0
            steps = _logged_steps(jsonl)
        except (FileNotFoundError, ValueError):
            return 0
        return steps[-1] if steps else 0

    def wait_for(self, cond, timeout=240.0):
        t = time.monotonic()
        while not cond():
            assert self.p.poll() is None, f"run exited early ({self.p.returncode}): {self.stderr()}"
            assert time.monotonic() - t < timeout, "timed out"
            time.sleep(0.002)

    def finish(self, timeout=240.0) -> int:
        rc = self.p.wait(timeout)
        self.out.close()
        self.err.close()
        return rc

    def stderr(self) -> str:
        if not self.err.closed:
            self.err.flush()
        return self.log.with_suffix(".err").read_text()


def _logged_steps(jsonl: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in jsonl.read_text().splitlines() if line.endswith("}")]


def _tmp_dirs(run: Path) -> list[str]:
    try:
        return [p.name for p in (run / "checkpoints").iterdir() if "orbax-checkpoint-tmp" in p.name]
    except FileNotFoundError:
        return []


def test_kill_9_at_random_moments_and_sigterm_then_resume_matches(reference, tmp_path, request):
    exp_ref, ref = reference
    # Checkpoint every step: more saves to be killed in; the final state must not care.
    exp = experiment(tmp_path, checkpoint={"every_steps": 1, "keep_last": 2, "keep_stage_final": True,
                                           "async_save": True})
    env = {**os.environ, **xla_cache_env(request.config), "LLAMA4_JAX_STOP_AT_STEP": ""}
    run, rng = tmp_path / "run", random.Random(0)

    # 1. kill -9 while a checkpoint is being written (its tmp directory is there).
    p = Proc(exp, run, env, tmp_path / "p1")
    p.wait_for(lambda: _tmp_dirs(run) and p.last_step() >= 2)
    reached = p.last_step()
    p.p.kill()
    assert p.finish() == -signal.SIGKILL

    # 2-3. kill -9 a few steps beyond where the previous process got.
    for i in (2, 3):
        p = Proc(exp, run, env, tmp_path / f"p{i}")
        target = min(reached + rng.randint(1, 3), TOTAL - 3)
        p.wait_for(lambda: p.last_step() >= target)
        reached = p.last_step()
        time.sleep(rng.uniform(0, 0.05))
        p.p.kill()
        assert p.finish() == -signal.SIGKILL

    # 4. SIGTERM: the step finishes, a checkpoint is written at it, exit 0.
    p = Proc(exp, run, env, tmp_path / "p4")
    p.wait_for(lambda: p.last_step() >= p.resume_step + 1)
    p.p.send_signal(signal.SIGTERM)
    assert p.finish() == 0, p.stderr()
    stopped = step_dirs(run)[-1]
    assert stopped < TOTAL and f"preempted; checkpoint saved at step {stopped}" in p.stderr()
    assert _logged_steps(run / "metrics.jsonl")[-1] == stopped

    # 5. To the end.
    p = Proc(exp, run, env, tmp_path / "p5")
    assert p.finish() == 0, p.stderr()
    assert f"resumed from {run / 'checkpoints' / str(stopped)}" in p.log.with_suffix(".out").read_text()
    assert not _tmp_dirs(run)
    assert metrics(run) == metrics(ref)
    assert_same_state(run / "checkpoints" / str(TOTAL), ref / "checkpoints" / str(TOTAL))


def test_sigusr1_asks_for_a_save_and_a_second_sigint_aborts_at_once(tmp_path):
    script = ("import os, signal, time\n"
              "from llama4_jax.train.loop import Preemption\n"
              "p = Preemption()\n"
              "os.kill(os.getpid(), signal.SIGUSR1)\n"
              "time.sleep(0.2)\n"
              "assert p.save_requested and not p.requested\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(0.2)\n"
              "assert p.requested\n"
              "print('first interrupt noted', flush=True)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "time.sleep(30)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert "first interrupt noted" in r.stdout
    assert "SIGINT received; saving a checkpoint after this step" in r.stderr
    assert "second interrupt, aborting without saving" in r.stderr
