"""The stage loop, end to end on the tiny fixture: stages switch at exactly the configured steps,
the optimizer carries across them, the logged LR is the configured per-stage phase, the train
step compiles once per stage shape, and the long-tail sampler moves weight to a hard source."""

import math
import random
import string
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from train_fixtures import TINY, train, train_rows, xla_cache  # noqa: F401  (autouse fixture)
from train_fixtures import tiny_run as _tiny_run


def configured_stages(path: Path) -> list[dict]:
    """Stage name, start, steps, seq_len and lr phase, computed here from the YAML itself."""
    out, at = [], 0
    for st in yaml.safe_load(path.read_text())["curriculum"]["stages"]:
        rows = st.get("batch_size") or st["global_batch_tokens"] // st["seq_len"]
        steps = st.get("steps") or math.ceil(st["tokens"] / (st["seq_len"] * rows))
        out.append(dict(name=st["name"], start=at, steps=steps, seq_len=st["seq_len"], batch=rows,
                        phase=st.get("lr_phase", {})))
        at += steps
    return out


def expected_lr(peak: float, stages: list[dict], g: int) -> float:
    """LR of global step g (0-based), n = g - stage start: warmup peak·start·n/w for n < w, then
    the shape from start (at n = w) toward end over the stage's remaining steps (0-based counts,
    as optax schedules take them, so a linear phase reaches `end` at the next stage's first step)."""
    st = next(s for s in stages if s["start"] <= g < s["start"] + s["steps"])
    p = st["phase"]
    a = p.get("start", 1.0)
    b = p.get("end", a)
    w, n = p.get("warmup_steps", 0), g - st["start"]
    if n < w:
        return peak * a * n / w
    m, rest = n - w, max(st["steps"] - w, 1)
    shape = p.get("shape", "constant")
    if shape == "constant":
        return peak * a
    if shape == "linear":
        return peak * (a + (b - a) * m / rest)
    return peak * (b + 0.5 * (a - b) * (1 + math.cos(math.pi * m / rest)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory)


# --- stage boundaries, optimizer continuity, LR ---------------------------------------------------

def test_stages_switch_at_exactly_the_configured_steps(tiny_run):
    workdir, _ = tiny_run
    stages = configured_stages(TINY)
    rows = train_rows(workdir)
    total = sum(s["steps"] for s in stages)
    # logging.every_steps = 1: row k is written after k steps, i.e. after global step k - 1.
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    for r in rows:
        g = r["step"] - 1
        want = next(i for i, s in enumerate(stages) if s["start"] <= g < s["start"] + s["steps"])
        assert (r["stage"], r["stage_index"]) == (stages[want]["name"], want), r
        assert r["skipped_steps"] == 0


def _state_counts(step_dir: Path) -> tuple[int, list[int]]:
    """(TrainState.step, every optimizer `count` leaf) of a checkpoint, read with Orbax directly."""
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(step_dir / "state").item_metadata.tree
        counts = {}
        for path, m in jax.tree_util.tree_flatten_with_path(tree["opt_state"])[0]:
            if "count" in jax.tree_util.keystr(path):
                counts[jax.tree_util.keystr(path)] = m
        assert counts, "no optimizer step counter in the checkpoint"
        target = {"step": tree["step"], "opt_state": tree["opt_state"]}
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=dev, global_shape=m.shape, dtype=m.dtype),
                            target)
        out = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=args, partial_restore=True))
    leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(out["opt_state"])[0]}
    return int(out["step"]), [int(leaves[k]) for k in counts]


def test_optimizer_state_carries_across_stages(tiny_run):
    """The checkpoint kept at each stage end counts every update since step 0: nothing is reset."""
    workdir, _ = tiny_run
    ends = list(np.cumsum([s["steps"] for s in configured_stages(TINY)]))
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert set(ends) <= set(kept), kept
    for end in ends:
        step, counts = _state_counts(workdir / "checkpoints" / str(end))
        assert step == end and counts and all(c == end for c in counts), (end, step, counts)


def test_logged_lr_is_the_configured_stage_schedule(tiny_run):
    workdir, _ = tiny_run
    peak = yaml.safe_load(TINY.read_text())["optimizer"]["lr"]
    stages = configured_stages(TINY)
    for r in train_rows(workdir):
        want = expected_lr(peak, stages, r["step"] - 1)
        assert r["lr"] == pytest.approx(want, rel=1e-5, abs=1e-12), r
    # The fixture exercises every shape and a warmup that starts inside the curriculum.
    assert {s["phase"].get("shape", "constant") for s in stages} == {"constant", "cosine", "linear"}
    assert stages[-1]["phase"].get("warmup_steps", 0) > 0


def test_train_step_compiles_once_per_stage_shape(tiny_run):
    _, compile_log = tiny_run
    shapes = {(s["seq_len"], s["batch"]) for s in configured_stages(TINY)}
    assert len(shapes) < len(configured_stages(TINY))  # two stages share a shape: a real check
    compiles = [m for m in compile_log if m.startswith("Compiling") and "train_step" in m]
    traces = [m for m in compile_log if m.startswith("Finished tracing") and "train_step" in m]
    assert len(compiles) == len(shapes), compiles
    assert len(traces) <= len(shapes), traces


def test_static_stages_log_no_mixture_and_long_tail_weights_are_a_distribution(tiny_run):
    workdir, _ = tiny_run
    for r in train_rows(workdir):
        w = {k: v for k, v in r.items() if k.startswith("mixture/")}
        if r["stage"] != "long_tail":
            assert not w, r
        else:
            assert set(w) == {"mixture/prose", "mixture/code", "mixture/rare"}
            assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)
            assert min(w.values()) >= 0.05 - 1e-12  # sampler.min_weight


# --- long tail ------------------------------------------------------------------------------------

LONG_TAIL = """\
model: {preset: tiny, overrides: {vocab_size: 264}}
mesh: {data: -1}
optimizer: {lr: 3.0e-3, schedule: {type: stages}}
data:
  sources:
    easy: {kind: text, path: easy.txt, split: line, eval_fraction: 0.0}
    hard: {kind: text, path: hard.txt, split: line, eval_fraction: 0.0}
curriculum:
  stages:
    - {name: base, steps: 14, seq_len: 32, batch_size: 4, mixture: {easy: 0.5, hard: 0.5}}
    - name: long_tail
      steps: 12
      seq_len: 32
      batch_size: 4
      mixture: {easy: 0.5, hard: 0.5}
      sampler: {type: long_tail, update_every: 2, min_weight: 0.05}
checkpoint: {every_steps: 1000, keep_last: 1, async_save: false}
logging: {every_steps: 1, tensorboard: false, progress: false}
eval: {every_steps: 0}
"""


def test_long_tail_moves_weight_to_the_hard_source(tmp_path):
    """Random printable characters (loss stays near ln 95) next to one repeated word (learned in a
    few steps): over the long-tail stage the hard source's weight rises above its base weight."""
    r = random.Random(0)
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    (tmp_path / "hard.txt").write_text("\n".join("".join(r.choice(chars) for _ in range(80)) for _ in range(200)))
    (tmp_path / "easy.txt").write_text("\n".join("hello hello hello hello" for _ in range(200)))
    exp = tmp_path / "lt.yaml"
    exp.write_text(LONG_TAIL)
    workdir = tmp_path / "run"
    train(exp, workdir)
    rows = train_rows(workdir)
    base = [r for r in rows if r["stage"] == "base"]
    tail = [r for r in rows if r["stage"] == "long_tail"]
    # Precondition: by the end of base the hard source really is harder.
    both = [r for r in base if "loss/hard" in r and "loss/easy" in r]
    assert both[-1]["loss/hard"] > both[-1]["loss/easy"] + 1.0, both[-1]
    hard = [r["mixture/hard"] for r in tail]
    assert hard[0] == pytest.approx(0.5)  # before the first update: the stage's base mixture
    assert hard[-1] > hard[0] + 0.1, hard
    assert all(r["mixture/easy"] == pytest.approx(1 - r["mixture/hard"]) for r in tail)
