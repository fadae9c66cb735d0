"""The logical → mesh rules, mesh validation, multi-process settings and the `--dry-run` memory plan.

All of it is planning: one device is enough (meshes are axis sizes or AbstractMeshes here; real
multi-device meshes are in test_parallel_mesh.py and test_multihost.py).
"""

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama4_jax import parallel
from llama4_jax.parallel import distributed
from llama4_jax.cli import main
from llama4_jax.config import load_experiment
from llama4_jax.model import flops

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "data" / "tiny_experiment.yaml"
ALL2 = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 2}
R = parallel.DEFAULT_RULES


# --- spec_for: the table applied to shapes ---------------------------------------------------

@pytest.mark.parametrize("shape, axes, sizes, want", [
    # attention q [D, H, Dh]: FSDP on the model dim, heads over tensor
    ((64, 4, 16), ("embed", "heads", "head_dim"), ALL2, P("fsdp", "tensor", None)),
    # routed experts [E, D, F]: experts over expert, model dim over fsdp, ff over tensor
    ((4, 64, 32), ("expert", "embed", "expert_mlp"), ALL2, P("expert", "fsdp", "tensor")),
    # stacked by scan over layers: one more leading dim, never sharded
    ((3, 4, 64, 32), ("expert", "embed", "expert_mlp"), ALL2, P(None, "expert", "fsdp", "tensor")),
    # size-1 axes are left out of the spec
    ((64, 4, 16), ("embed", "heads", "head_dim"), {**ALL2, "fsdp": 1}, P(None, "tensor", None)),
    # 2 KV heads on tensor=4: not divisible → replicated (documented), not an error
    ((64, 2, 16), ("embed", "kv_heads", "head_dim"), {**ALL2, "tensor": 4}, P("fsdp", None, None)),
    # activations: the batch takes data×fsdp×expert, so embed (fsdp for weights) stays whole
    ((8, 32, 64), ("batch", "length", "embed"), ALL2, P(("data", "fsdp", "expert"), None, None)),
    # batch only over the axes > 1
    ((8, 32, 64), ("batch", "length", "embed"), {**ALL2, "fsdp": 1}, P(("data", "expert"), None, None)),
    # norms and router bias: replicated
    ((64,), ("norm",), ALL2, P(None)),
])
def test_spec_for_default_rules(shape, axes, sizes, want):
    assert parallel.spec_for(shape, axes, sizes, R) == want
    # the same on an AbstractMesh of those sizes (what --dry-run plans with)
    assert parallel.spec_for(shape, axes, parallel.abstract_mesh(sizes), R) == want


def test_rules_overrides_from_yaml_shape():
    rules = parallel.merged_rules({"batch": ["data"], "length": "fsdp", "vocab": None})
    assert rules["batch"] == ("data",) and rules["vocab"] is None and rules["embed"] == "fsdp"
    # sequence parallelism: length over fsdp, so embed cannot use fsdp again in the same array
    assert parallel.spec_for((8, 32, 64), ("batch", "length", "embed"), ALL2, rules) == P("data", "fsdp", None)
    assert parallel.spec_for((264, 64), ("vocab", "embed"), ALL2, rules) == P(None, "fsdp")
    assert parallel.spec_for((264, 64), ("vocab", "embed"), ALL2, R) == P("tensor", "fsdp")
    assert parallel.merged_rules() == R and parallel.merged_rules() is not R


def test_config_rule_names_are_the_parallel_table():
    exp = load_experiment(TINY, ["mesh.rules={length: fsdp, batch: [data, expert]}"])
    assert parallel.merged_rules(exp.mesh.rules)["batch"] == ("data", "expert")


def test_batch_divisor_and_sharding_axes():
    assert parallel.batch_divisor(ALL2, R) == 8
    assert parallel.batch_divisor({**ALL2, "tensor": 8}, R) == 8  # tensor replicates the batch
    assert parallel.batch_divisor(ALL2, parallel.merged_rules({"batch": "data"})) == 2


# --- model fit: errors vs documented replication ---------------------------------------------

def _tiny_cfg():
    return load_experiment(TINY).to_model_config()  # D 64, 4 heads, 2 KV heads, E 4, ff 128 / 64


@pytest.mark.parametrize("sizes, msg", [
    ({"tensor": 3}, "mesh tensor=3 does not divide num_heads=4"),
    ({"expert": 3}, "mesh expert=3 does not divide moe.num_experts=4"),
    ({"fsdp": 128}, "mesh fsdp=128 does not divide hidden_size=64"),
    ({"tensor": 4, "fsdp": 1}, None),  # kv heads 2 on tensor 4: replicated, a note
])
def test_check_fit(sizes, msg):
    sizes = {**dict.fromkeys(parallel.MESH_AXES, 1), **sizes}
    dims = parallel.model_dims(_tiny_cfg())
    if msg:
        with pytest.raises(parallel.MeshError, match=msg):
            parallel.check_fit(dims, sizes, R)
    else:
        notes = parallel.check_fit(dims, sizes, R)
        assert notes == ["num_kv_heads=2 is not divisible by tensor=4: logical axis 'kv_heads' is replicated"]


def test_check_fit_follows_rules():
    sizes = {**dict.fromkeys(parallel.MESH_AXES, 1), "tensor": 3}
    dims = parallel.model_dims(_tiny_cfg())
    # heads, mlp and expert_mlp off the tensor axis: nothing left for tensor=3 to divide
    rules = parallel.merged_rules({"heads": None, "kv_heads": None, "mlp": None, "expert_mlp": None, "vocab": None})
    assert parallel.check_fit(dims, sizes, rules) == []


# --- impossible meshes through the CLI: exit 2, one line ---------------------------------------

@pytest.mark.parametrize("argv, parts", [
    (["--set", "mesh.data=3"], ["mesh: data=3 x fsdp=1 x expert=1 x context=1 x tensor=1 = 3 devices", "are available"]),
    (["--dry-run", "--set", "mesh.tensor=3"], ["mesh tensor=3 does not divide num_heads=4"]),
    (["--dry-run", "--set", "mesh.expert=8"], ["mesh expert=8 does not divide moe.num_experts=4"]),
    (["--dry-run", "--set", "mesh.data=8"], ["batch_size=4 is not divisible by the 8 batch shards"]),
    (["--dry-run", "--set", "mesh.data=-1", "--set", "mesh.fsdp=-1"], ["at most one axis may be -1"]),
    (["--dry-run", "--set", "mesh.data=1", "--set", "mesh.context=3"],
     ["curriculum.stages[0].seq_len=32 is not a multiple of 2 × the 3 context shards"]),
])
def test_impossible_mesh_exit_2_one_line(capsys, tmp_path, argv, parts):
    capsys.readouterr()
    rc = main(["train", str(TINY), "--workdir", str(tmp_path / "wd"), *argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.startswith("llama4-jax: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)
    assert not (tmp_path / "wd").exists()


# --- --dry-run: per-device memory for the big shapes on their own meshes -----------------------

def _stat(out: str, label: str) -> tuple[int, int]:
    line = next(l for l in out.splitlines() if l.startswith(f"state bytes {label}: "))
    per, total = line.split(": ")[1].split(" per device of ")
    return int(per.replace(",", "")), int(total.replace(",", ""))


def _expected_param_bytes(cfg, sizes, param_dtype, embed_axes=("fsdp",)) -> tuple[int, int]:
    """(total, per device) from the config alone: routed experts split expert×fsdp ways, every
    other weight matrix has a model-dim axis split over the `embed` rule's axes (fsdp, or
    fsdp×expert where the experiment says so), RMSNorm scales replicated."""
    D, E, F = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.expert_ff
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_layers))
    experts = moe_layers * 3 * E * D * F
    norms = (2 * cfg.num_layers + 1) * D
    total, _ = flops.param_counts(cfg)
    b = np.dtype(param_dtype).itemsize
    per = experts * b // (sizes["expert"] * sizes["fsdp"]) + (total - experts - norms) * b // math.prod(sizes[a] for a in embed_axes) + norms * b
    return total * b, per


@pytest.mark.parametrize("name, devices", [("scout_like", 64), ("maverick_like", 256)])
def test_dry_run_plans_big_meshes_without_devices(capsys, name, devices):
    path = REPO / "experiments" / f"{name}.yaml"
    exp = load_experiment(path)
    cfg = exp.to_model_config()
    before = sum(a.nbytes for a in jax.live_arrays())
    t = time.perf_counter()
    capsys.readouterr()
    rc = main(["train", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    elapsed = time.perf_counter() - t
    assert rc == 0, err
    assert elapsed < 60, elapsed
    assert sum(a.nbytes for a in jax.live_arrays()) - before < 2**20  # nothing of the model was allocated
    sizes = exp.mesh.resolve(devices)
    assert f"mesh: {sizes} over {devices} devices (planned; this host has {jax.device_count()} " in out

    per, total = _stat(out, "params")
    embed_axes = parallel.rule_axes(parallel.merged_rules(exp.mesh.rules), "embed")
    assert (total, per) == _expected_param_bytes(cfg, sizes, exp.precision.param_dtype, embed_axes)
    assert total / (sizes["expert"] * sizes["fsdp"]) < per < total / sizes["fsdp"]
    # Adam: two moments per parameter, sharded exactly like it (+ a few replicated step counts):
    # opt = a·params + c on every device and in total, with a = moment bytes / param bytes.
    opt_per, opt_total = _stat(out, "optimizer")
    a = (opt_total - opt_per) / (total - per)
    assert a in (1.0, 1.5, 2.0), a  # each moment in f32 or bf16, the params in f32
    assert 0 <= opt_total - a * total < 1024 and 0 <= opt_per - a * per < 1024
    if exp.precision.opt_state_dtype == "float32":
        assert a == 2.0
    else:  # bf16 moments (optax keeps the second one in f32 today)
        assert a < 2.0
    # the human line agrees with the bytes, in adaptive units
    human = next(l for l in out.splitlines() if l.startswith("state memory per device: "))
    assert f"params {parallel.format_bytes(per)}," in human and "GiB" in human
    assert f"optimizer {parallel.format_bytes(opt_per)}," in human


def test_dry_run_on_local_devices_uses_local_count(capsys, tmp_path):
    capsys.readouterr()
    assert main(["train", str(TINY), "--dry-run", "--workdir", str(tmp_path / "wd")]) == 0
    out = capsys.readouterr().out
    n = jax.device_count()
    assert f"over {n} {jax.devices()[0].platform} devices" in out and "planned" not in out
    per, total = _stat(out, "params")
    assert per == total  # data parallelism only: every device holds everything
    human = next(l for l in out.splitlines() if l.startswith("state memory per device: "))
    assert human.startswith(f"state memory per device: params {parallel.format_bytes(per)}, ")


@pytest.mark.parametrize("n, want", [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1_024_256, "1000 KiB"),
                                     (11_608_084_480, "10.8 GiB"), (3.5 * 2**40, "3.50 TiB")])
def test_format_bytes(n, want):
    assert parallel.format_bytes(n) == want


def test_planned_device_count():
    from llama4_jax.train.run import planned_device_count

    mesh = load_experiment(REPO / "experiments" / "scout_like.yaml").mesh
    assert planned_device_count(mesh, 1) == 64
    assert planned_device_count(mesh, 128) == 128  # fits: data = 2
    assert planned_device_count(load_experiment(TINY).mesh, 1) == 1


# --- activation constraints -----------------------------------------------------------------------

def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 8, 16))
    assert parallel.constrain(x, ("batch", "length", "embed")) is x
    mesh = parallel.make_mesh(dict.fromkeys(parallel.MESH_AXES, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):  # one device: nothing to constrain either
        assert parallel.constrain(x, ("batch", "length", "embed")) is x


def test_logical_rules_context_restores():
    before = dict(parallel.current_rules())
    with parallel.logical_rules({**R, "batch": "data"}):
        assert parallel.current_rules()["batch"] == "data"
    assert parallel.current_rules() == before


# --- multi-process settings -------------------------------------------------------------------------

def _clean_env(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(key, raising=False)


def test_distributed_single_process_by_default(monkeypatch):
    _clean_env(monkeypatch)
    assert distributed.settings({}) is None
    assert distributed.initialize({}) == "single process"


def test_distributed_explicit_from_env():
    env = {"LLAMA4_JAX_COORDINATOR": "10.0.0.1:1234", "LLAMA4_JAX_NUM_PROCESSES": "4",
           "LLAMA4_JAX_PROCESS_ID": "3", "LLAMA4_JAX_HEARTBEAT_TIMEOUT": "20"}
    assert distributed.settings(env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        "cluster_detection_method": "deactivate", "initialization_timeout": 300, "heartbeat_timeout_seconds": 20, "shutdown_timeout_seconds": 300}
    # the standard JAX names work too
    std = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.settings(std)["coordinator_address"] == "h:1"
    assert distributed.settings({**env, "LLAMA4_JAX_DISTRIBUTED": "off"}) is None


@pytest.mark.parametrize("env, msg", [
    ({"LLAMA4_JAX_COORDINATOR": "h:1"}, "LLAMA4_JAX_NUM_PROCESSES, LLAMA4_JAX_PROCESS_ID not set"),
    ({"LLAMA4_JAX_COORDINATOR": "h:1", "LLAMA4_JAX_NUM_PROCESSES": "2", "LLAMA4_JAX_PROCESS_ID": "2"},
     "LLAMA4_JAX_PROCESS_ID=2 is not below LLAMA4_JAX_NUM_PROCESSES=2"),
    ({"LLAMA4_JAX_COORDINATOR": "h", "LLAMA4_JAX_NUM_PROCESSES": "2", "LLAMA4_JAX_PROCESS_ID": "0"},
     "expected host:port"),
    ({"LLAMA4_JAX_COORDINATOR": "h:1", "LLAMA4_JAX_NUM_PROCESSES": "two", "LLAMA4_JAX_PROCESS_ID": "0"},
     "LLAMA4_JAX_NUM_PROCESSES='two': expected an integer"),
    ({"LLAMA4_JAX_HEARTBEAT_TIMEOUT": "0"}, "LLAMA4_JAX_HEARTBEAT_TIMEOUT=0: must be >= 1"),
    ({"LLAMA4_JAX_DISTRIBUTED": "maybe"}, "expected auto, on or off"),
])
def test_distributed_bad_settings(env, msg):
    with pytest.raises(distributed.DistributedError, match=msg.replace("(", r"\(")):
        distributed.settings(env)


def test_distributed_bad_settings_exit_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA4_JAX_COORDINATOR", "127.0.0.1:1")
    capsys.readouterr()
    assert main(["train", str(TINY), "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LLAMA4_JAX_NUM_PROCESSES" in err, err


@pytest.mark.parametrize("ntasks, detected", [("2", True), ("1", False)])
def test_distributed_detects_slurm(monkeypatch, ntasks, detected):
    """Inside a multi-task SLURM step, JAX's own detection is used (initialize() without args)."""
    _clean_env(monkeypatch)
    for k, v in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": ntasks,
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    kw = distributed.settings({})
    if detected:
        assert kw == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 60, "shutdown_timeout_seconds": 300}
    else:
        assert kw is None
