"""Sharded training on 8 fake CPU devices equals 1-device training, with the planned shardings.

The body runs in a subprocess started with `--xla_force_host_platform_device_count=8` (the other
test files start JAX with one device). It trains the tiny model (2 layers: one dense block, one
MoE block) for 5 steps through the real trainer (`train_loop`: data, init, jitted step with
in/out shardings, metrics.jsonl, final checkpoint) on one device and on four meshes, and reports
the logged losses and the PartitionSpecs of the final train state.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from train_fixtures import write_small_experiment

MESHES = {
    "data8": {"data": 8},
    "fsdp8": {"data": 1, "fsdp": 8},
    "data2_fsdp2_expert2": {"data": 2, "fsdp": 2, "expert": 2},
    "data2_expert2_tensor2": {"data": 2, "expert": 2, "tensor": 2},
}


SCRIPT = r"""
import json, sys
import jax
from llama4_jax import parallel
from llama4_jax.train import loop
from llama4_jax.train.run import Run

assert jax.device_count() == 8, jax.devices()
loop.device_peak_flops = lambda *a, **kw: (1e12, "test")  # seconds of matmuls per run that only feed MFU
exp, out_dir, meshes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
trainers = []

class Recording(loop.Trainer):  # keep the trainer so its final state can be inspected
    def __init__(self, run):
        super().__init__(run)
        trainers.append(self)

loop.Trainer = Recording

def spec(x):
    s = tuple(x.sharding.spec)
    while s and s[-1] is None:
        s = s[:-1]
    return [list(a) if isinstance(a, tuple) else a for a in s]

def train(name, sizes, devices):
    sets = [f"mesh.{a}={sizes.get(a, 1)}" for a in parallel.MESH_AXES]
    run = Run(exp, overrides=sets, workdir=f"{out_dir}/{name}", resume="never", devices=devices)
    assert loop.train_loop(run) == 0
    tr = trainers[-1]
    rows = [json.loads(l) for l in open(f"{out_dir}/{name}/metrics.jsonl")]
    flat = lambda tree: {jax.tree_util.keystr(p): spec(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    with jax.set_mesh(run.mesh):
        x = jax.numpy.zeros((8, 32, 64))
        act = jax.jit(lambda x: parallel.constrain(x, ("batch", "length", "embed")))(x)
    return {"losses": [r["loss"] for r in rows], "steps": [r["step"] for r in rows],
            "params": flat(tr.state.params), "opt_state": flat(tr.state.opt_state), "activation": spec(act),
            "mesh": dict(run.mesh.shape)}

result = {"single": train("single", {}, jax.devices()[:1])}
for name, sizes in meshes.items():
    result[name] = train(name, sizes, None)

# run.init_sharded: the fresh state made directly in the (data 2, fsdp 2, expert 2) shardings
import numpy as np
from llama4_jax.train.run import init_sharded
from llama4_jax.train.state import init_state
run = Run(exp, overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"], workdir=f"{out_dir}/init",
          resume="never")
with jax.set_mesh(run.mesh):
    shardings = parallel.tree_shardings(jax.eval_shape(lambda: init_state(run.cfg, 0, run.make_tx)[1]),
                                        run.mesh, run.rules)
    sharded = init_sharded(run.cfg, 0, run.make_tx, shardings)
eager = init_state(run.cfg, 0, run.make_tx)[1]
diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
           for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(eager)))
result["init_sharded"] = {"max_abs_diff": diff, "params": {jax.tree_util.keystr(p): spec(x)
                          for p, x in jax.tree_util.tree_leaves_with_path(sharded.params)}}
json.dump(result, open(f"{out_dir}/result.json", "w"))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh8")
    write_small_experiment(tmp, "{data: -1}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA4_JAX_", "JAX_COORDINATOR"))}
    # Backend optimisation off: compiles take half as long; the 1-device reference shares the flag.
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "exp.yaml"), str(tmp), json.dumps(MESHES)],
                          capture_output=True, text=True, env=env, timeout=540, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "result.json").read_text())


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_losses_equal_one_device(result, name):
    single, sharded = result["single"], result[name]
    assert single["steps"] == sharded["steps"] == [1, 2, 3, 4, 5]
    assert single["losses"][-1] < single["losses"][0]  # it trains
    for step, (a, b) in enumerate(zip(single["losses"], sharded["losses"]), 1):
        assert abs(a - b) <= 1e-5, (name, step, a, b)


def test_meshes_are_the_requested_ones(result):
    assert result["single"]["mesh"] == {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    for name, sizes in MESHES.items():
        assert result[name]["mesh"] == {a: sizes.get(a, 1) for a in ("data", "fsdp", "expert", "context", "tensor")}


EMBED = "['embed'].value"
Q = "['groups']['blocks'][0]['attn']['q'].value"  # [D, H, Dh]
KV = "['groups']['blocks'][0]['attn']['k'].value"  # [D, K=2, Dh]
MLP = "['groups']['blocks'][0]['ffn']['gate'].value"  # dense [D, F]
EXPERT = "['groups']['blocks'][1]['ffn']['experts']['gate'].value"  # [E, D, F]
NORM = "['groups']['blocks'][1]['attn_norm']['scale'].value"

# Expected PartitionSpecs (trailing Nones dropped) from parallel.DEFAULT_RULES.
EXPECTED = {
    "data8": {EMBED: [], Q: [], KV: [], MLP: [], EXPERT: [], NORM: []},  # pure data parallel: replicated
    "fsdp8": {EMBED: [None, "fsdp"], Q: ["fsdp"], KV: ["fsdp"], MLP: ["fsdp"], EXPERT: [None, "fsdp"], NORM: []},
    "data2_fsdp2_expert2": {EMBED: [None, "fsdp"], Q: ["fsdp"], KV: ["fsdp"], MLP: ["fsdp"],
                            EXPERT: ["expert", "fsdp"], NORM: []},
    "data2_expert2_tensor2": {EMBED: ["tensor"], Q: [None, "tensor"], KV: [None, "tensor"], MLP: [None, "tensor"],
                              EXPERT: ["expert", None, "tensor"], NORM: []},
}
BATCH = {"data8": ["data"], "fsdp8": ["fsdp"], "data2_fsdp2_expert2": [["data", "fsdp", "expert"]],
         "data2_expert2_tensor2": [["data", "expert"]]}


@pytest.mark.parametrize("name", list(MESHES))
def test_params_and_adam_moments_have_the_planned_shardings(result, name):
    params, opt = result[name]["params"], result[name]["opt_state"]
    for path, want in EXPECTED[name].items():
        assert params[path] == want, (name, path, params[path])
        moments = {k: v for k, v in opt.items() if k.endswith(path) and (".mu[" in k or ".nu[" in k)}
        assert len(moments) == 2, (path, sorted(opt)[:5])
        for k, v in moments.items():
            assert v == want, (name, k, v)
    # every moment mirrors its parameter, not only the ones named above
    for path, want in params.items():
        for k, v in opt.items():
            if k.endswith(path) and (".mu[" in k or ".nu[" in k):
                assert v == want, (name, k, v, want)


@pytest.mark.parametrize("name", list(MESHES))
def test_residual_stream_constraint_splits_the_batch(result, name):
    assert result[name]["activation"] == BATCH[name]


def test_init_sharded_makes_the_state_in_place(result):
    """The fresh state created straight into its shardings (no device ever holds it whole) equals
    the eager init up to the truncated normal's fused erf-inverse."""
    got = result["init_sharded"]
    assert got["max_abs_diff"] <= 1e-7
    for path, want in EXPECTED["data2_fsdp2_expert2"].items():
        assert got["params"][path] == want, (path, got["params"][path])
