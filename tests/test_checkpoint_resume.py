"""Exact resume: a run stopped anywhere — inside a stage, exactly at a stage boundary, inside the
long-tail stage between two sampler updates — and resumed is bit for bit the run that never
stopped (every metrics row, the whole final train state, the data iterator and sampler state).
Also: what a checkpoint holds and keeps, `--resume never`, and reading training checkpoints as
models (`store.load_any`, `convert to-hf`, `init_from`).

The runs are in-process (`cli.main`), sharing one persistent XLA cache, so the tiny model is
compiled once per session; `LLAMA4_JAX_STOP_AT_STEP` stops a run as a preemption would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from llama4_jax.cli import main
from llama4_jax.train import loop
from llama4_jax.model.store import read_arrays

TOTAL = 13  # base 4 + domain 4 + long_tail 5 steps
STAGE_ENDS = (4, 8, 13)
# Inside base; exactly at the base→domain boundary; inside domain; inside long_tail one step
# after its first sampler update was due to queue (update_every 2: pending loss sums saved).
STOPS = (2, 4, 6, 9)
TIMING_KEYS = {"tokens_per_s", "mfu"}  # wall-clock: with the time/* keys, the only fields allowed to differ


# --- shared helpers (the other checkpoint test files import these) -----------------------------
def write_corpus(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
             "pi rho sigma tau upsilon phi chi psi omega def return class import for while").split()
    out = {}
    for name, docs in (("prose", 120), ("code", 120), ("rare", 30)):
        text = "\n\n".join(" ".join(rng.choice(words, rng.integers(5, 30))) for _ in range(docs))
        out[name] = root / f"{name}.txt"
        out[name].write_text(text + "\n")
    return out


def experiment(root: Path, batch: int = 4, **top) -> Path:
    """A quickstart-like experiment: tiny model, 3 stages incl. long_tail, logs every step,
    checkpoints every 3 steps (async), keeps 2 + every stage-final checkpoint."""
    corpus = root / "corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        write_corpus(corpus)
    src = lambda n: {"kind": "text", "path": str(corpus / f"{n}.txt"), "split": "paragraph", "eval_fraction": 0.0}
    raw = {
        "seed": 0,
        "model": {"preset": "tiny", "overrides": {"vocab_size": 264}},
        "mesh": {"data": -1},
        "precision": {"param_dtype": "float32", "compute_dtype": "float32"},
        "optimizer": {"lr": 3.0e-3, "schedule": {"type": "stages"}},
        "data": {"tokenizer": {"type": "byte"}, "sources": {n: src(n) for n in ("prose", "code", "rare")}},
        "curriculum": {"stages": [
            {"name": "base", "steps": 4, "seq_len": 32, "batch_size": batch, "mixture": {"prose": 0.8, "code": 0.2},
             "lr_phase": {"warmup_steps": 2}},
            {"name": "domain", "steps": 4, "seq_len": 32, "batch_size": batch, "mixture": {"code": 0.8, "prose": 0.2}},
            {"name": "long_tail", "steps": 5, "seq_len": 32, "batch_size": batch,
             "mixture": {"prose": 0.4, "code": 0.4, "rare": 0.2},
             "lr_phase": {"shape": "linear", "start": 1.0, "end": 0.1},
             "sampler": {"type": "long_tail", "update_every": 2, "min_weight": 0.05}},
        ]},
        "checkpoint": {"every_steps": 3, "keep_last": 2, "keep_stage_final": True, "async_save": True},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
        "eval": {"every_steps": 0},
    }
    raw.update(top)
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def xla_cache_env(config) -> dict[str, str]:
    """The session's persistent XLA cache (set up in conftest.py) as environment variables, for
    subprocesses started with an environment of their own."""
    from conftest import XLA_CACHE_ENV

    return {**XLA_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"]}


def use_xla_cache(config):
    """Point this process's JAX at the shared cache; returns an undo function."""
    from jax._src import compilation_cache  # reset: an earlier compile may have fixed "no cache"

    env = xla_cache_env(config)
    names = {k.lower(): v if k.endswith("_DIR") else int(v) for k, v in env.items()}
    old = {k: getattr(jax.config, k) for k in names}
    for k, v in names.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()

    def undo():
        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()
    return undo


def train(exp: Path, workdir: Path, *argv, stop: int | None = None, capsys=None) -> tuple[int, str, str]:
    """`llama4-jax train` in this process; the peak-FLOP/s measurement is skipped (it only feeds MFU)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "device_peak_flops", lambda *a, **kw: (1e12, "test"))
    mp.setenv(loop.STOP_ENV, "" if stop is None else str(stop))
    if capsys is not None:
        capsys.readouterr()
    try:
        rc = main(["train", str(exp), "--workdir", str(workdir), *argv])
    finally:
        mp.undo()
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


def metrics(workdir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")}
            for r in rows}


def step_dirs(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_same_state(a: Path, b: Path) -> None:
    """Two step directories hold bitwise-equal train states, data states and sampler states."""
    sa, sb = read_arrays(a), read_arrays(b)
    assert sa.keys() == sb.keys()
    for part in sa:
        assert sa[part].keys() == sb[part].keys(), part
        for name in sa[part]:
            x, y = sa[part][name], sb[part][name]
            assert x.dtype == y.dtype and x.shape == y.shape, (part, name)
            assert x.tobytes() == y.tobytes(), f"{part}.{name} differs"
    assert read_json(a / "data" / "metadata") == read_json(b / "data" / "metadata")
    ma, mb = read_json(a / "meta" / "metadata"), read_json(b / "meta" / "metadata")
    for key in ("data_step", "stage", "stage_index", "step_in_stage", "mixture", "model_config"):
        assert ma[key] == mb[key], key


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xla_cache(request):
    undo = use_xla_cache(request.config)
    yield
    undo()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, xla_cache):
    root = tmp_path_factory.mktemp("straight")
    exp = experiment(root)
    rc, _, _ = train(exp, root / "run")
    assert rc == 0
    return exp, root / "run"


# --- exact resume --------------------------------------------------------------------------------
def test_stop_anywhere_and_resume_is_bitwise_identical(straight, tmp_path, capsys):
    exp, ref = straight
    run = tmp_path / "run"
    for k in STOPS:
        rc, out, err = train(exp, run, stop=k, capsys=capsys)
        assert rc == 0, err
        assert f"checkpoint saved at step {k}" in err
        assert step_dirs(run)[-1] == k
        meta = read_json(run / "checkpoints" / str(k) / "meta" / "metadata")
        assert meta["data_step"] == k and read_json(run / "checkpoints" / str(k) / "data" / "metadata")["step"] == k
    rc, out, err = train(exp, run, capsys=capsys)
    assert rc == 0, err
    assert f"resumed from {run / 'checkpoints' / str(STOPS[-1])}" in out

    got, want = metrics(run), metrics(ref)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in want:  # loss, lr, per-source losses, mixture weights, MoE stats: all bitwise
        assert got[step] == want[step], f"step {step}"
    assert_same_state(run / "checkpoints" / str(TOTAL), ref / "checkpoints" / str(TOTAL))


def test_stop_exactly_at_the_long_tail_boundary_starts_it_fresh(straight, tmp_path, capsys):
    exp, ref = straight
    run = tmp_path / "run"
    rc, _, _ = train(exp, run, stop=STAGE_ENDS[1], capsys=capsys)
    assert rc == 0
    meta = read_json(run / "checkpoints" / str(STAGE_ENDS[1]) / "meta" / "metadata")
    assert (meta["stage"], meta["step_in_stage"]) == ("domain", 4)
    rc, out, err = train(exp, run, capsys=capsys)
    assert rc == 0, err
    got, want = metrics(run), metrics(ref)
    assert got[STAGE_ENDS[1] + 1]["stage"] == "long_tail"
    assert got == want
    assert_same_state(run / "checkpoints" / str(TOTAL), ref / "checkpoints" / str(TOTAL))


def test_checkpoints_hold_everything_and_keep_last_plus_stage_finals(straight):
    _, ref = straight
    # keep_last 2 → 12, 13; every stage-final (4, 8, 13) is kept beyond that.
    assert step_dirs(ref) == [4, 8, 12, 13]
    ck = ref / "checkpoints" / "12"
    meta = read_json(ck / "meta" / "metadata")
    assert (meta["stage"], meta["stage_index"], meta["step_in_stage"], meta["data_step"]) == ("long_tail", 2, 4, 12)
    assert set(meta["mixture"]) == {"sampler", "pending"} and meta["mixture"]["sampler"]
    assert meta["model_config"]["vocab_size"] == 264 and "curriculum:" in meta["experiment"]
    data = read_json(ck / "data" / "metadata")  # one global state, no process_{i}-of-{n} file
    assert (data["step"], data["stage_index"], data["seq_len"], data["global_batch"]) == (12, 2, 32, 4)
    assert set(data["cursors"]) == {"prose", "code", "rare"}
    state = read_arrays(ck)
    assert int(state["step"][""]) == 12 and int(state["skipped"][""]) == 0
    assert any(name.endswith("bias") for name in state["extra"])  # MoE router biases
    assert any(".mu." in name for name in state["opt_state"]) and any(".nu." in name for name in state["opt_state"])
    assert not list((ref / "checkpoints").glob("*tmp*"))


def test_resume_never_refuses_a_workdir_with_checkpoints(straight, capsys):
    exp, ref = straight
    before = sorted(p.name for p in (ref / "checkpoints").iterdir())
    rc, out, err = train(exp, ref, "--resume", "never", capsys=capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "--resume never" in err and str(ref / "checkpoints") in err
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == before


def test_resume_of_a_finished_run_does_nothing(straight, capsys):
    exp, ref = straight
    rows = (ref / "metrics.jsonl").read_text()
    rc, out, err = train(exp, ref, capsys=capsys)
    assert rc == 0 and f"resumed from {ref / 'checkpoints' / str(TOTAL)}" in out
    assert (ref / "metrics.jsonl").read_text() == rows and step_dirs(ref) == [4, 8, 12, 13]


# --- training checkpoints as models ----------------------------------------------------------------
def test_load_any_reads_a_run_its_checkpoints_or_one_step(straight):
    from llama4_jax.model.store import load_any, state_shapes

    _, ref = straight
    state = read_arrays(ref / "checkpoints" / "13")
    want = {**state["params"], **state["extra"]}
    for path, step in ((ref, 13), (ref / "checkpoints", 13), (ref / "checkpoints" / "8", 8)):
        cfg, flat, _ = load_any(path)
        assert cfg.vocab_size == 264 and set(flat) == set(state_shapes(cfg))
        if step == 13:
            assert all(np.array_equal(flat[k], want[k]) for k in want)
    _, flat8, _ = load_any(ref / "checkpoints" / "8")
    assert not np.array_equal(flat8["embed"], want["embed"])


def test_convert_to_hf_from_a_training_checkpoint(straight, tmp_path, capsys):
    from llama4_jax.convert.hf import read_hf_params
    from llama4_jax.model.store import load_any

    _, ref = straight
    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(ref), str(out)]) == 0
    cfg, flat, _ = load_any(ref)
    hf_cfg, hf_flat = read_hf_params(out)
    assert (hf_cfg.num_layers, hf_cfg.hidden_size, hf_cfg.vocab_size) == (cfg.num_layers, cfg.hidden_size, 264)
    params = set(read_arrays(ref / "checkpoints" / "13", ("params",))["params"])
    assert params <= set(hf_flat)
    for name in params:
        assert np.array_equal(hf_flat[name], flat[name]), name


@pytest.mark.parametrize("source", ["training_run", "converted_hf"])
def test_init_from_takes_params_only(straight, tmp_path, capsys, source):
    exp, ref = straight
    src = ref
    if source == "converted_hf":  # a `convert from-hf` output (params checkpoint)
        assert main(["convert", "to-hf", str(ref), str(tmp_path / "hf")]) == 0
        assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
        src = tmp_path / "ours"
    exp2 = experiment(tmp_path, init_from=str(src))
    run = tmp_path / "run"
    rc, out, err = train(exp2, run, stop=1, capsys=capsys)
    assert rc == 0, err
    assert f"initialised params from {src}" in out
    got, init = read_arrays(run / "checkpoints" / "1"), read_arrays(ref / "checkpoints" / "13")
    # The first step runs at lr 0 (warmup from 0), so the params are still exactly the source's,
    # while the optimizer and the step counters start afresh.
    for name, x in init["params"].items():
        assert np.array_equal(got["params"][name], x), name
    assert int(got["step"][""]) == 1
    counts = [v for k, v in got["opt_state"].items() if k.endswith("count")]
    assert counts and all(int(c) == 1 for c in counts)
    assert read_json(run / "checkpoints" / "1" / "data" / "metadata")["step"] == 1
