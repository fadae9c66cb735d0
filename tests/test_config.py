"""Experiment schema and loading: every shipped YAML parses, every user mistake is one clear line."""

import math
import os
import textwrap
from pathlib import Path

import pytest

from llama4_jax.config import (CURRICULUM_DIR, ConfigError, Experiment, Mesh, dump_resolved, load_curriculum,
                               load_experiment)

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
RECIPES = sorted((REPO / "curriculum").glob("*.yaml"))

MINIMAL = """\
model: {preset: tiny, overrides: {vocab_size: 264}}
data:
  sources:
    prose: {kind: builtin, path: stdlib_prose}
    code: {kind: text, path: corpus/code}
curriculum:
  stages:
    - {name: a, steps: 10, seq_len: 64, batch_size: 2, mixture: {prose: 1}}
    - {name: b, tokens: 1000, seq_len: 64, global_batch_tokens: 256, mixture: {code: 1, prose: 0.5}}
"""


def write(tmp_path, text=MINIMAL, name="x.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg


# --- shipped files ----------------------------------------------------------------------------


def test_shipped_files_exist():
    assert {p.stem for p in EXPERIMENTS} >= {"quickstart", "bench_cpu", "scout_like", "maverick_like"}
    assert "three_stage" in {p.stem for p in RECIPES}
    assert CURRICULUM_DIR == REPO / "curriculum"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_parses(path):
    exp = load_experiment(path)
    assert exp.name == path.stem
    rt = exp.to_runtime()
    assert (rt.param_dtype, rt.compute_dtype) == (exp.precision.param_dtype, exp.precision.compute_dtype)
    sizes = {a: getattr(exp.mesh, a) for a in ("data", "fsdp", "expert", "tensor")}
    devices = math.prod(v for v in sizes.values() if v != -1)
    assert math.prod(exp.mesh.resolve(devices).values()) == devices
    # The house rule: a YAML opens with the command that runs it and what that costs.
    assert path.read_text().startswith("# llama4-jax ")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(path):
    assert load_curriculum(path).total_steps > 0
    assert path.read_text().startswith("#")


def test_quickstart_is_cpu_sized():
    exp = load_experiment(REPO / "experiments/quickstart.yaml")
    stages = exp.curriculum.resolved_stages()
    assert [s.name for s in stages] == ["base", "domain", "long_tail"]
    assert exp.curriculum.total_steps == 180 and {(s.seq_len, s.batch_size) for s in stages} == {(128, 8)}
    assert exp.data.tokenizer.type == "byte"
    vocab = exp.to_model_config().vocab_size
    assert vocab >= 259 and vocab % 8 == 0
    assert exp.optimizer.lr == 3e-3 and stages[0].lr_phase.warmup_steps == 20
    assert exp.checkpoint.every_steps == 50 and exp.eval.every_steps == 50
    assert exp.mesh.resolve(1) == {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    assert stages[2].sampler.type == "long_tail" and "stdlib_rare" in stages[2].mixture


@pytest.mark.parametrize("name, devices", [("scout_like", 64), ("maverick_like", 256)])
def test_large_shapes(name, devices):
    exp = load_experiment(REPO / f"experiments/{name}.yaml")
    cfg = exp.to_model_config()
    sizes = exp.mesh.resolve(devices)
    assert cfg.moe.num_experts % sizes["expert"] == 0
    rt = exp.to_runtime()
    assert rt.compute_dtype == "bfloat16" and rt.param_dtype == "float32" and rt.remat and rt.scan_layers
    assert exp.precision.fp8.enabled and "experts" in exp.precision.fp8.families
    for stage in exp.curriculum.resolved_stages():
        assert stage.seq_len == 8192 and stage.batch_size % (sizes["data"] * sizes["fsdp"] * sizes["expert"]) == 0


# --- user mistakes: one line naming file, key and problem -------------------------------------

BAD_OVERRIDES = [
    (["optimizer.lrr=1e-3"], "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    (["optimiser.lr=1"], "optimiser: unknown key (did you mean 'optimizer'?)"),
    (["optimizer.lr=-1"], "optimizer.lr: input should be greater than 0"),
    (["mesh.data=two"], "mesh.data: input should be a valid integer"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one axis may be -1"),
    (["mesh.tensor=0"], "mesh.tensor: must be >= 1"),
    (["mesh.rules={embed: fsdpp}"], "mesh.rules.embed: unknown mesh axis 'fsdpp' (did you mean 'fsdp'?)"),
    (["mesh.rules={embedd: fsdp}"], "mesh.rules.embedd: unknown logical axis (did you mean 'embed'?)"),
    (["curriculum.stages[1].mixture={wiki: 1}"], "curriculum.stages[1].mixture: unknown source 'wiki' (sources: code, prose)"),
    (["curriculum.stages[0].mixture={prose: 0}"], "curriculum.stages[0].mixture: needs at least one source"),
    (["curriculum.stages[1].global_batch_tokens=100"], "curriculum.stages[1].global_batch_tokens: 100 is not a multiple of seq_len=64"),
    (["curriculum.stages[0].tokens=5"], "curriculum.stages[0]: set exactly one of steps / tokens"),
    (["curriculum.stages[0].batch_size=null"], "curriculum.stages[0]: set exactly one of batch_size / global_batch_tokens"),
    (["curriculum.stages[1].name=a"], "curriculum.stages[1].name: duplicate stage name 'a'"),
    (["curriculum.stages[0].lr_phase.warmup_steps=11"], "curriculum.stages[0].lr_phase.warmup_steps: 11 exceeds"),
    (["curriculum.stages[0].lr_phase={start: 1, end: 0.5}"], "curriculum.stages[0].lr_phase.end: a constant phase"),
    (["curriculum.stages[0].sampler.temprature=2"], "curriculum.stages[0].sampler.temprature: unknown key (did you mean 'temperature'?)"),
    (["curriculum.stages[0].seq_len=99999"], "curriculum.stages[0].seq_len: 99999 exceeds the model's max_position_embeddings"),
    (["curriculum.stages=[]"], "curriculum.stages: list should have at least 1 item"),
    (["model.preset=tinny"], "model.preset: unknown preset 'tinny' (did you mean 'tiny'?)"),
    (["model.overrides.moe.num_expertz=3"], "model.overrides.moe.num_expertz: unknown key (did you mean 'num_experts'?)"),
    (["model.overrides.num_layers=abc"], "model.overrides.num_layers: input should be a valid integer"),
    (["model.overrides.num_heads=3"], "model.overrides: num_heads=3 is not a multiple of num_kv_heads=2"),
    (["model.overrides.rope_scaling={factr: 2}"], "model.overrides.rope_scaling.factr: unknown key (did you mean 'factor'?)"),
    (["model.overrides.param_dtype=bfloat16"], "model.overrides.param_dtype: set precision.param_dtype instead"),
    (["precision.fp8.families=[experts, moe]"], "precision.fp8.families[1]: input should be"),
    (["precision.compute_dtype=float16"], "precision.compute_dtype: input should be 'float32' or 'bfloat16'"),
    (["optimizer.schedule={type: stages, warmup_steps: 5}"], "optimizer.schedule.warmup_steps: unused with type 'stages'"),
    (["optimizer.schedule.min_lr_ratio=1.5"], "optimizer.schedule.min_lr_ratio: input should be less than or equal to 1"),
    (["data.tokenizer.type=hf"], "data.tokenizer.path: required for tokenizer type 'hf'"),
    (["data.sources.prose.eval_fraction=0.9"], "data.sources.prose.eval_fraction: input should be less than or equal to 0.5"),
    (["data.sources.x={kind: text}"], "data.sources.x.path: required"),
    (["data.sources.prose.path=stdlib_prse"],
     "data.sources.prose.path: unknown builtin corpus 'stdlib_prse' (did you mean 'stdlib_prose'?)"),
    (["curriculum.stages[1].sampler={type: long_tail, min_weight: 0.6}"],
     "curriculum.stages[1].sampler.min_weight: 0.6 x 2 sources exceeds 1"),
    (["eval.every_steps=5", "data.sources.prose.eval_fraction=0", "data.sources.code.eval_fraction=0"],
     "eval.every_steps: eval is on but no data source has eval_fraction > 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last: input should be greater than 0"),
    (["model=null"], "model: expected a mapping (got None)"),
    # Every numeric model field carries its bound (a negative size used to crash in JAX).
    (["model.overrides.hidden_size=-4"], "model.overrides.hidden_size: input should be greater than 0"),
    (["model.overrides.moe.num_experts=0"], "model.overrides.moe.num_experts: input should be greater than 0"),
    (["model.overrides.attn_scale=-0.1"], "model.overrides.attn_scale: input should be greater than or equal to 0"),
    (["model.overrides.rope_scaling={factor: -2}"], "model.overrides.rope_scaling.factor: input should be greater than 0"),
    (["model.runtime.moe.capacity_factor=-1"], "model.runtime.moe.capacity_factor: input should be greater than 0"),
    (["model.runtime.moe.ep_max_rounds=-1"], "model.runtime.moe.ep_max_rounds: input should be greater than or equal to 0"),
    (["balancing.aux_loss_coef=-0.01"], "balancing.aux_loss_coef: input should be greater than or equal to 0"),
    (["balancing.bias_update_rate=-1"], "balancing.bias_update_rate: input should be greater than or equal to 0"),
    (["optimizer.max_bad_steps=0"], "optimizer.max_bad_steps: input should be greater than 0"),
    # Keys in the wrong room say where they go.
    (["model.overrides.remat=true"], "model.overrides.remat: set model.runtime.remat instead"),
    (["model.overrides.moe.dispatch=dense"], "model.overrides.moe.dispatch: set model.runtime.moe.dispatch instead"),
    (["model.overrides.moe.aux_loss_coef=0.1"], "model.overrides.moe.aux_loss_coef: set balancing.aux_loss_coef instead"),
    (["model.moe.num_experts=64"], "model.moe: unknown key (model fields go under model.overrides: did you mean "
                                   "model.overrides.moe.num_experts?)"),
    (["model.remat=true"], "model.remat: unknown key (did you mean model.runtime.remat"),
    (["seed=1.5"], "seed: input should be a valid integer"),
]


@pytest.mark.parametrize("overrides, expected", BAD_OVERRIDES, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_values_name_file_and_key(tmp_path, overrides, expected):
    path = write(tmp_path)
    msg = error(path, overrides)
    assert msg.startswith(f"{path}: {expected}"), msg
    assert msg.endswith("(from --set)"), msg  # the user is told the value came from the command line


BAD_FILES = [
    (MINIMAL + "optimizer: {lrr: 1.0e-3}\n", "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    (MINIMAL + "optimizer: {lr: -1.0e-3}\n", "optimizer.lr: input should be greater than 0"),
    ("model:\n  preset: tiny\n  preset: tiny\n", "line 3: invalid YAML (duplicate key 'preset')"),
    ("model: {preset: tiny\n  bad: 1\n", "line 2: invalid YAML ("),
    ("- 1\n- 2\n", "expected a mapping of settings at the top level (got list)"),
    ("", "empty file"),
    (MINIMAL.split("curriculum:")[0], "curriculum: required"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES)
def test_bad_files(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error(path).startswith(f"{path}: {expected}")


def test_missing_file(tmp_path):
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: not found"


@pytest.mark.parametrize("item, expected", [
    ("optimizer", "--set 'optimizer': expected key.path=value"),
    ("=3", "--set '=3': expected key.path=value"),
    ("optimizer.lr.x=1", "optimizer.lr: input should be a valid number"),
    ("curriculum.stages[9].steps=1", "curriculum.stages[9]: no such list item (from --set curriculum.stages[9].steps=1)"),
    ("curriculum.stages.a.steps=1", "curriculum.stages: is not a mapping"),
])
def test_bad_override_paths(tmp_path, item, expected):
    path = write(tmp_path)
    assert error(path, [item]).startswith(f"{path}: {expected}")


def test_unknown_top_level_key_suggests(tmp_path):
    path = write(tmp_path, MINIMAL + "optimzer: {lr: 1.0}\n")
    assert error(path) == f"{path}: optimzer: unknown key (did you mean 'optimizer'?)"


# --- overrides --------------------------------------------------------------------------------


def test_set_parses_values_as_yaml(tmp_path):
    exp = load_experiment(write(tmp_path), [
        "optimizer.lr=1e-3", "mesh.data=2", "precision.fp8.enabled=yes", "optimizer.grad_clip=null",
        "name='1e3'", "model.overrides.moe_layers=[1, 3]", "mesh.rules.batch=[data, fsdp]", "mesh.rules.vocab=null",
        "curriculum.stages[0].steps=7", "eval.every_steps=0",
    ])
    assert exp.optimizer.lr == 1e-3 and isinstance(exp.optimizer.lr, float)
    assert exp.mesh.data == 2 and exp.precision.fp8.enabled is True and exp.optimizer.grad_clip is None
    assert exp.name == "1e3"
    assert exp.to_model_config().moe_layers == (1, 3)  # YAML list → the dataclass's tuple
    assert exp.mesh.rules == {"batch": ["data", "fsdp"], "vocab": None}
    assert exp.curriculum.boundaries() == [7, 11]


def test_yaml_floats_without_dot(tmp_path):
    # PyYAML alone reads `1e-3` as a string; a config must read it as the number everyone means.
    exp = load_experiment(write(tmp_path, MINIMAL + "optimizer: {lr: 1e-3, eps: 1E-8}\n"))
    assert exp.optimizer.lr == 1e-3 and exp.optimizer.eps == 1e-8


def test_include_with_stage_overrides(tmp_path):
    path = write(tmp_path, """\
        model: {preset: tiny}
        data:
          sources:
            stdlib_prose: {kind: builtin, path: stdlib_prose}
            stdlib_code: {kind: builtin, path: stdlib_code}
            stdlib_rare: {kind: builtin, path: stdlib_rare}
        curriculum:
          include: three_stage
          overrides:
            base: {tokens: 1000, seq_len: 64, global_batch_tokens: 256, lr_phase: {warmup_steps: 2}}
            domain: {steps: 11}
            long_tail: {mixture: {stdlib_rare: 1.0}, sampler: {temperature: 2.0}}
        """)
    recipe = {s.name: s for s in load_curriculum(CURRICULUM_DIR / "three_stage.yaml").stages}
    stages = load_experiment(path).curriculum.resolved_stages()
    base, domain, tail = stages
    # tokens replaces the recipe's steps, global_batch_tokens its batch_size: ceil(1000 / 256) = 4.
    assert (base.steps, base.batch_size, base.seq_len) == (4, 4, 64)
    assert base.lr_phase.warmup_steps == 2 and base.lr_phase.shape == recipe["base"].lr_phase.shape  # merged
    assert domain.steps == 11 and domain.mixture == recipe["domain"].mixture
    assert tail.mixture == {"stdlib_rare": 1.0}  # a mixture is replaced whole, not merged
    assert tail.sampler.temperature == 2.0 and tail.sampler.type == "long_tail"
    # --set reaches both the overrides and the expanded stages.
    exp = load_experiment(path, ["curriculum.overrides.domain.steps=5", "curriculum.stages[2].steps=3"])
    assert exp.curriculum.boundaries() == [4, 9, 12]


def test_include_by_path_and_errors(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes/one.yaml").write_text(
        "stages:\n  - {name: only, steps: 5, seq_len: 8, batch_size: 1, mixture: {prose: 1}}\n")
    path = write(tmp_path, MINIMAL.split("curriculum:")[0] + "curriculum: {include: recipes/one.yaml}\n")
    assert load_experiment(path).curriculum.total_steps == 5
    assert error(path, ["curriculum.include=three_stag"]).startswith(
        f"{path}: curriculum.include: no recipe 'three_stag' (did you mean 'three_stage'?)")
    assert "curriculum.include: recipe file" in error(path, ["curriculum.include=recipes/none.yaml"])
    assert error(path, ["curriculum.overrides.onyl.steps=1"]).startswith(
        f"{path}: curriculum.overrides.onyl: unknown stage (did you mean 'only'?)")
    assert error(path, ["curriculum.overrides.only.stepz=1"]).startswith(
        f"{path}: curriculum.overrides.only.stepz: unknown key (did you mean 'steps'?)")
    both = write(tmp_path, MINIMAL.replace("curriculum:\n", "curriculum:\n  include: three_stage\n"), "both.yaml")
    assert error(both) == f"{both}: curriculum: set either 'include' or 'stages', not both"
    # A mistake inside an included stage names the stage and the recipe it came from.
    msg = error(path, ["curriculum.overrides.only.mixture={wiki: 1}"])
    assert msg.startswith(f"{path}: curriculum.stages[0].mixture: unknown source 'wiki'") and "stage 'only' from" in msg


# --- curriculum arithmetic --------------------------------------------------------------------


def test_boundaries_and_stage_index(tmp_path):
    cur = load_experiment(write(tmp_path)).curriculum
    # Stage b: 1000 tokens at 256 tokens a step → ceil(3.9) = 4 steps of 4 rows.
    assert [(s.steps, s.batch_size) for s in cur.resolved_stages()] == [(10, 2), (4, 4)]
    assert cur.boundaries() == [10, 14] and cur.total_steps == 14
    assert [cur.stage_index(s) for s in (0, 9, 10, 13)] == [0, 0, 1, 1]
    with pytest.raises(IndexError):
        cur.stage_index(14)


def test_mesh_resolve():
    assert Mesh().resolve(8) == {"data": 8, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    assert Mesh(data=-1, fsdp=2, expert=4).resolve(16) == {"data": 2, "fsdp": 2, "expert": 4, "context": 1, "tensor": 1}
    assert Mesh(data=2, fsdp=-1).resolve(8)["fsdp"] == 4
    assert Mesh(data=2, fsdp=4).resolve(8) == {"data": 2, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    with pytest.raises(ConfigError, match=r"data=2 x fsdp=2 .* = 4 devices, but 8 are available"):
        Mesh(data=2, fsdp=2).resolve(8)
    with pytest.raises(ConfigError, match=r"cannot fill 6 devices"):
        Mesh(fsdp=4).resolve(6)


# --- round trip and side effects --------------------------------------------------------------


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_dump_load_round_trip(tmp_path, path):
    exp = load_experiment(path)
    text = dump_resolved(exp)
    again = load_experiment(write(tmp_path, text, "config.resolved.yaml"))
    assert again == exp.resolved()
    assert again.to_model_config() == exp.to_model_config()
    assert again.curriculum.boundaries() == exp.curriculum.boundaries()
    assert dump_resolved(again) == text
    assert all(s.tokens is None and s.global_batch_tokens is None for s in again.curriculum.stages)


def test_relative_paths_follow_the_yaml_not_the_cwd(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL + "init_from: ../ckpt\n")
    monkeypatch.chdir(REPO)
    exp = load_experiment(path)
    assert exp.data.sources["code"].path == str(tmp_path / "corpus/code")
    assert exp.data.sources["prose"].path == "stdlib_prose"  # builtin names are not paths
    assert exp.init_from == os.path.normpath(tmp_path / "../ckpt")


def test_loading_writes_nothing(tmp_path):
    def snapshot():
        return {p: p.stat().st_mtime_ns for root in (tmp_path, CURRICULUM_DIR) for p in root.rglob("*")}

    path = write(tmp_path, MINIMAL + "data_cache: 1\n")
    good = write(tmp_path, MINIMAL.replace("data:\n", "data:\n  cache_dir: cache\n"), "good.yaml")
    before = snapshot()
    load_experiment(good, ["checkpoint.every_steps=5"])
    dump_resolved(load_experiment(REPO / "experiments/quickstart.yaml"))
    with pytest.raises(ConfigError):
        load_experiment(path)
    assert snapshot() == before


def test_model_config_built_from_experiment(tmp_path):
    exp = load_experiment(write(tmp_path), ["precision.compute_dtype=bfloat16", "model.overrides.moe={top_k: 2}",
                                            "model.runtime.moe={dispatch: capacity}", "balancing.aux_loss_level=sequence"])
    cfg, rt = exp.to_model_config(), exp.to_runtime()
    assert cfg.vocab_size == 264 and rt.compute_dtype == "bfloat16" and cfg.moe.top_k == 2
    assert rt.moe.dispatch == "capacity" and rt.moe.aux_loss_level == "sequence"
    assert cfg.moe.num_experts == 4  # the rest of the preset's MoE block is kept
    assert isinstance(exp, Experiment)
