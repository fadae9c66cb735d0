"""`llama4-jax train` as a user meets it: every mistake is exit 2 + one stderr line + an untouched
workdir; `--dry-run` plans without writing; every shipped experiment and recipe plans cleanly."""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from llama4_jax.cli import main
from llama4_jax.config import load_curriculum, load_experiment
from llama4_jax.train.curriculum import plan_stages, stage_at

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "data" / "tiny_experiment.yaml"
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
RECIPES = sorted((REPO / "curriculum").glob("*.yaml"))


def tiny_raw() -> dict:
    """The tiny fixture experiment as a dict, with its corpus paths made absolute."""
    raw = yaml.safe_load(TINY.read_text())
    for src in raw["data"]["sources"].values():
        src["path"] = str(TINY.parent / src["path"])
    return raw


def write_exp(tmp_path, edit=None, name="exp.yaml") -> Path:
    raw = tiny_raw()
    if edit is not None:
        edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def snapshot(path: Path):
    """Every entry under `path` with its bytes (None for folders); None if `path` does not exist."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# --- user errors --------------------------------------------------------------------------------

def _set(*keys_value):
    *keys, value = keys_value

    def edit(raw):
        node = raw
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


# (id, edit of the tiny experiment or None, extra argv, substrings the stderr line must hold).
# "{exp}" in an expected substring stands for the experiment file's path.
CASES = [
    ("unknown-key", _set("optimizer", "lrr", 1.0), [], ["{exp}: ", "optimizer.lrr", "unknown key"]),
    ("wrong-type", _set("optimizer", "lr", "fast"), [], ["{exp}: ", "optimizer.lr", "number"]),
    ("impossible-value", lambda r: r["curriculum"]["stages"][0].update(seq_len=0), [],
     ["{exp}: ", "curriculum.stages[0].seq_len"]),
    ("seq-beyond-model", lambda r: r["curriculum"]["stages"][2].update(seq_len=10**6), [],
     ["{exp}: ", "curriculum.stages[2].seq_len", "max_position_embeddings"]),
    ("unknown-source", lambda r: r["curriculum"]["stages"][1].update(mixture={"cod": 1.0}), [],
     ["{exp}: ", "curriculum.stages[1].mixture", "'cod'"]),
    ("bad-set-syntax", None, ["--set", "optimizer"], ["{exp}: ", "--set 'optimizer'"]),
    ("bad-set-index", None, ["--set", "curriculum.stages[7].steps=3"], ["{exp}: ", "curriculum.stages[7]"]),
    ("bad-set-value", None, ["--set", "optimizer.lr=abc"], ["{exp}: ", "optimizer.lr", "(from --set)"]),
    ("mesh-too-big", None, ["--set", f"mesh.data={jax.device_count() + 1}"],
     ["mesh", f"{jax.device_count() + 1}", f"{jax.device_count()} are available"]),
    ("vocab-too-small", None, ["--set", "model.overrides.vocab_size=128"],
     ["model.overrides.vocab_size", "128"]),
]


def _missing_data(tmp_path):
    missing = tmp_path / "nowhere" / "code.jsonl"
    return write_exp(tmp_path, _set("data", "sources", "code", "path", str(missing))), [str(missing)]


def _missing_tokenizer(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    return write_exp(tmp_path, _set("data", "tokenizer", {"type": "hf", "path": str(missing)})), [str(missing)]


def _missing_file(tmp_path):
    return tmp_path / "nope.yaml", [f"{tmp_path / 'nope.yaml'}: not found"]


def _invalid_yaml(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {preset: tiny\n  bad: 1\n")
    return path, [f"{path}: line 2: invalid YAML"]


def _init_from_missing(tmp_path):
    missing = tmp_path / "nowhere" / "params"
    return write_exp(tmp_path, lambda r: r.update(init_from=str(missing))), [str(missing)]


def _init_from_other_model(tmp_path):
    """A params checkpoint (the `convert from-hf` layout) of a 2-layer model; the experiment has 4."""
    from llama4_jax.model.store import save_params, state_shapes

    cfg = load_experiment(TINY).to_model_config().replace(num_layers=2)
    src = tmp_path / "other_params"
    save_params(src, cfg, {k: np.zeros(s.shape, s.dtype) for k, s in state_shapes(cfg).items()})
    return write_exp(tmp_path, lambda r: r.update(init_from=str(src))), [str(src)]


FILE_CASES = [pytest.param(_missing_data, id="missing-data-path"),
              pytest.param(_missing_tokenizer, id="missing-tokenizer"),
              pytest.param(_missing_file, id="missing-experiment"),
              pytest.param(_invalid_yaml, id="invalid-yaml"),
              pytest.param(_init_from_missing, id="init-from-missing"),
              pytest.param(_init_from_other_model, id="init-from-other-model")]


@pytest.mark.parametrize("make", [_init_from_missing, _init_from_other_model], ids=["missing", "other-model"])
def test_bad_init_from_is_a_user_error(capsys, tmp_path, make):
    """Exit 2 and one line naming the checkpoint (the untouched workdir is checked in FILE_CASES)."""
    exp, expected = make(tmp_path)
    rc, _, err = run_cli(capsys, exp, "--workdir", tmp_path / "run")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("llama4-jax: error: "), (rc, err)
    assert all(part in err for part in expected), err


def _check_user_error(capsys, tmp_path, exp, argv, expected, workdir_exists):
    workdir = tmp_path / "run"
    if workdir_exists:
        (workdir / "tensorboard").mkdir(parents=True)
        (workdir / "notes.txt").write_text("keep me\n")
    before = snapshot(workdir)
    rc, out, err = run_cli(capsys, exp, "--workdir", workdir, *argv)
    assert rc == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith("llama4-jax: error: "), err
    for part in expected:
        assert part.format(exp=exp) in err, (part, err)
    assert snapshot(workdir) == before  # None stays None: the workdir is not even created


@pytest.mark.parametrize("workdir_exists", [False, True], ids=["new-workdir", "existing-workdir"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_errors_exit_2_one_line_workdir_untouched(capsys, tmp_path, case, workdir_exists):
    _, edit, argv, expected = case
    _check_user_error(capsys, tmp_path, write_exp(tmp_path, edit), argv, expected, workdir_exists)


@pytest.mark.parametrize("workdir_exists", [False, True], ids=["new-workdir", "existing-workdir"])
@pytest.mark.parametrize("make", FILE_CASES)
def test_file_errors_exit_2_one_line_workdir_untouched(capsys, tmp_path, make, workdir_exists):
    exp, expected = make(tmp_path)
    _check_user_error(capsys, tmp_path, exp, [], expected, workdir_exists)


def test_resume_never_refuses_existing_checkpoints(capsys, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "8" / "state").mkdir(parents=True)
    (workdir / "checkpoints" / "8" / "state" / "blob").write_bytes(b"\x00\x01")
    (workdir / "metrics.jsonl").write_text('{"step": 8}\n')
    before = snapshot(workdir)
    exp = write_exp(tmp_path)
    rc, _, err = run_cli(capsys, exp, "--workdir", workdir, "--resume", "never")
    assert rc == 2 and err.count("\n") == 1, err
    assert str(workdir / "checkpoints") in err and "--resume never" in err, err
    assert snapshot(workdir) == before
    # Without checkpoints (only other files) --resume never is not an error: checked by dry run.
    empty = tmp_path / "fresh"
    (empty / "checkpoints").mkdir(parents=True)
    rc, _, err = run_cli(capsys, exp, "--workdir", empty, "--resume", "never", "--dry-run")
    assert rc == 0, err


def test_user_error_in_a_real_process(tmp_path):
    """The installed entry point: exit status 2 and nothing but one line on the real stderr."""
    exp, _ = _missing_data(tmp_path)
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "llama4_jax", "train", str(exp), "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("llama4-jax: error: "), proc.stderr
    assert not workdir.exists()


# --- dry run --------------------------------------------------------------------------------------

def _param_count(exp) -> tuple[int, int]:
    """(total, active) from the model's actual parameter shapes, not from the flops module."""
    from flax import nnx

    from llama4_jax.model.transformer import Llama4

    cfg = exp.to_model_config()
    model = nnx.eval_shape(lambda: Llama4(cfg, rngs=nnx.Rngs(0)))
    total, experts = 0, 0
    for path, v in jax.tree.leaves_with_path(nnx.state(model, nnx.Param)):
        total += math.prod(v.shape)
        if "['experts']" in jax.tree_util.keystr(path):
            experts += math.prod(v.shape)
    m = cfg.moe
    return total, total - experts * (m.num_experts - m.top_k) // m.num_experts


def _field(out: str, prefix: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1, (prefix, out)
    return lines[0][len(prefix):]


@pytest.mark.parametrize("name", ["quickstart", "bench_cpu"])
def test_dry_run_prints_plan_and_writes_nothing(capsys, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # the default workdir runs/<name> would appear here
    path = REPO / "experiments" / f"{name}.yaml"
    exp = load_experiment(path)
    workdir = tmp_path / "wd"
    for argv in (["--workdir", workdir], []):
        rc, out, err = run_cli(capsys, path, "--dry-run", *argv)
        assert rc == 0, err
        assert not workdir.exists() and not (tmp_path / "runs").exists()
        assert list(tmp_path.iterdir()) == []
    total, active = _param_count(exp)
    assert _field(out, "parameters: ") == f"{total:,} total, {active:,} active per token"
    # 6 FLOPs per parameter of every matmul a token passes, plus attention scores: at least the
    # non-embedding active parameters, and no more than all active ones plus full causal attention.
    cfg = exp.to_model_config()
    seq = exp.curriculum.resolved_stages()[0].seq_len
    fpt = float(_field(out, f"training FLOPs per token (seq {seq}): "))
    lo = 6 * (active - cfg.vocab_size * cfg.hidden_size - cfg.hidden_size * (2 * cfg.num_layers + 1))
    hi = 6 * active + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq
    assert lo <= fpt <= hi, (lo, fpt, hi)
    n = jax.device_count()
    assert _field(out, "mesh: ").endswith(f"over {n} {jax.devices()[0].platform} devices")
    assert f"'data': {n}" in _field(out, "mesh: ")
    assert "state memory per device: params " in out
    nbytes = lambda part: [int(x.replace(",", "")) for x in
                           _field(out, f"state bytes {part}: ").split(" per device of ")]
    # f32 master weights replicated over data; f32 Adam moments (2 per parameter) + step counts;
    # "other" is the router biases: one f32 per expert per MoE layer.
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.num_layers))
    assert nbytes("params") == [4 * total, 4 * total]
    per_dev, whole = nbytes("optimizer")
    assert per_dev == whole and 8 * total <= whole <= 8 * total + 64
    assert nbytes("other") == [4 * n_moe * cfg.moe.num_experts] * 2
    # The resolved config is printed first and is loadable YAML naming the same experiment.
    resolved = yaml.safe_load(out.split("\n---\n")[0])
    assert resolved["name"] == name and len(resolved["curriculum"]["stages"]) == len(exp.curriculum.stages)


# --- every shipped YAML -----------------------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_plans_contiguous_stages(path):
    plans = plan_stages(load_curriculum(path))
    assert plans[0].start == 0
    for a, b in zip(plans, plans[1:]):
        assert a.end == b.start
    for p in plans:
        assert stage_at(plans, p.start) is p and stage_at(plans, p.end - 1) is p


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_dry_runs_on_this_host(capsys, tmp_path, path):
    """The big shapes need many devices; planned on this host with every device on `data`."""
    one_axis = ["--set", "mesh.data=-1", "--set", "mesh.fsdp=1", "--set", "mesh.expert=1",
                "--set", "mesh.tensor=1"]
    exp = load_experiment(path)
    plans = plan_stages(exp.curriculum)
    batch_ok = all(p.batch_size % jax.device_count() == 0 for p in plans)
    rc, out, err = run_cli(capsys, path, "--dry-run", "--workdir", tmp_path / "wd", *one_axis)
    assert rc == (0 if batch_ok else 2), err
    if batch_ok:
        line = _field(out, "curriculum: ")
        assert line == ", ".join(f"{p.name} {p.steps} steps × {p.batch_size}×{p.seq_len}"
                                 + (f" (RoPE scaling ×{p.rope_scaling.factor:g})" if p.rope_scaling else "")
                                 for p in plans)
    assert not (tmp_path / "wd").exists()
