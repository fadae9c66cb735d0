"""An AWQ-quantized checkpoint on a mesh of 8 fake CPU devices (fsdp=2, expert=2, tensor=2),
loaded by `load_checkpoint(..., mesh=...)` (`load_any` + `model_from_flat`, the reading that
`generate` and `eval` do, with each array read straight onto its sharding):

  - every packed array (qweight, qzeros, scales, in_scale) is sharded as the float weight it
    stands for: its expert dims as the float's, its input rows as the float's first input dim,
    its output words as the float's first output dim (the reference: `flat_shardings` of the
    float model, mapped by hand here) — nothing the rules shard is replicated; every other
    variable has exactly the rules' sharding;
  - its logits equal the single-device quantized model's (max |Δ| ≤ 1e-5 · max(1, max |ref|):
    reductions are ordered differently on a mesh, as in test_moe_ep.py), and greedy generation
    on the mesh gives the single-device tokens.

The mesh part needs `--xla_force_host_platform_device_count=8` before JAX starts, so it runs in a
subprocess (this process may already have JAX on 1 device); the AWQ checkpoint is written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama4_jax.compress.awq import awq_quantize
from llama4_jax.model import store
from llama4_jax.model.config import ModelConfig, MoEConfig, MoERuntime, RuntimeConfig
from llama4_jax.model.quant import QuantSpec

# Layer 0 dense + RoPE, layer 1 MoE (shared expert) + NoPE. Sizes every packed dim divides by 2
# (group 32: embed 64 → 2 groups, expert_ff 64 → 2 groups), so "nothing replicated" is strict.
CFG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  dense_ff=64, moe=MoEConfig(num_experts=4, top_k=1, expert_ff=64), interleave_moe_layer_step=2,
                  no_rope_layer_interval=2, attention_chunk_size=16, floor_scale=16, rope_theta=10000.0,
                  max_position_embeddings=256)
SPEC = QuantSpec(bits=4, group_size=32)
MESH = {"fsdp": 2, "expert": 2, "tensor": 2}

SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from llama4_jax.api import load_checkpoint
from llama4_jax.compress.int4 import targets
from llama4_jax.infer.generate import generate_ids
from llama4_jax.model import store
from llama4_jax.model.config import MoERuntime
from llama4_jax.parallel.mesh import make_mesh
from llama4_jax.parallel.rules import DEFAULT_RULES

ckpt, ids_path, out_path, mesh_json = sys.argv[1:]
assert jax.device_count() == 8, jax.devices()
mesh = make_mesh(json.loads(mesh_json))
dropless = MoERuntime(dispatch="dropless")  # what eval's loader runs
ids = jnp.asarray(np.load(ids_path))
fwd = nnx.jit(lambda m, x: m(x))

one = load_checkpoint(ckpt, moe=dropless)
ref = np.asarray(fwd(one, ids))
ref_gen = generate_ids(one, [list(map(int, r[:9])) for r in np.asarray(ids)[:2]], 8)

sharded = load_checkpoint(ckpt, mesh=mesh, moe=dropless)
cfg, rt = sharded.cfg, sharded.rt
leaves = {store.flat_name(p): v.get_value() for p, v in nnx.state(sharded).flat_state()}
rules_say = store.flat_shardings(cfg, rt, mesh, DEFAULT_RULES)
floats = store.flat_shardings(cfg, rt.replace(quant=None), mesh, DEFAULT_RULES)  # the float model's

def spec(s, ndim):
    t = tuple(s.spec)
    return t + (None,) * (ndim - len(t))

bad, packed, sharded_dims = [], 0, 0
for name, arr in leaves.items():  # every variable where the rules put it
    if not arr.sharding.is_equivalent_to(rules_say[name], arr.ndim):
        bad.append(f"{name}: {arr.sharding.spec} != rules {rules_say[name].spec}")
for name, n_lead, n_in, ins in targets(cfg, rt.quant):
    shape = store.state_shapes(cfg, rt.replace(quant=None))[name].shape
    f = spec(floats[name], len(shape))
    # the merged trailing dims (head_dim) must be unsharded for the mapping to be exact
    assert all(a is None for a in f[n_lead + 1:n_lead + n_in] + f[n_lead + n_in + 1:]), (name, f)
    lead, k_ax, n_ax = f[:n_lead], f[n_lead], f[n_lead + n_in]
    want = {"qweight": lead + (k_ax, n_ax), "qzeros": lead + (k_ax, n_ax), "scales": lead + (k_ax, n_ax)}
    if ins:
        want["in_scale"] = lead + (k_ax,)
    for part, w in want.items():
        arr = leaves[f"{name}.{part}"]
        packed += 1
        sharded_dims += sum(a is not None for a in w)
        if not arr.sharding.is_equivalent_to(NamedSharding(mesh, P(*w)), arr.ndim):
            bad.append(f"{name}.{part}: {spec(arr.sharding, arr.ndim)} != float-derived {w}")
        if arr.addressable_shards[0].data.size * max(1, np.prod([mesh.shape[a] for a in w if a])) != arr.size:
            bad.append(f"{name}.{part}: device 0 holds {arr.addressable_shards[0].data.shape} of {arr.shape}")

with jax.set_mesh(mesh):
    got = np.asarray(fwd(sharded, ids))
gen = generate_ids(sharded, [list(map(int, r[:9])) for r in np.asarray(ids)[:2]], 8)
json.dump({"bad": bad, "packed": packed, "sharded_dims": sharded_dims,
           "max_abs_diff": float(np.max(np.abs(got - ref))), "max_abs_ref": float(np.max(np.abs(ref))),
           "gen": gen, "ref_gen": ref_gen}, open(out_path, "w"))
'''


@pytest.fixture(scope="module")
def result(random_flat, tmp_path_factory):
    root = tmp_path_factory.mktemp("qmesh")
    flat = random_flat(CFG, seed=11, std=0.1)
    model = store.model_from_flat(CFG, flat, RuntimeConfig(moe=MoERuntime(dispatch="dropless")))
    calib = np.random.default_rng(12).integers(0, CFG.vocab_size, (4, 32)).astype(np.int32)
    qflat = awq_quantize(model, flat, calib, SPEC)
    store.save_params(root / "q", CFG, qflat, rt=RuntimeConfig(quant=SPEC))
    np.save(root / "ids.npy", np.random.default_rng(13).integers(0, CFG.vocab_size, (4, 16)).astype(np.int32))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(root / "q"), str(root / "ids.npy"), str(root / "out.json"),
                        json.dumps(MESH)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((root / "out.json").read_text())


def test_packed_weights_sharded_like_their_float_weights(result):
    assert not result["bad"], "\n".join(result["bad"])
    # attention 4 × 3 arrays in both layers; dense MLP, shared and routed experts 3 × 3; 2 in_scale
    assert result["packed"] == 2 * 12 + 9 + 9 + 9 + 2
    assert result["sharded_dims"] >= 2 * result["packed"]  # every packed array split along 2+ dims


def test_mesh_logits_and_generation_equal_single_device(result):
    print(result["max_abs_diff"], result["max_abs_ref"])
    assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["max_abs_ref"])
    assert result["gen"] == result["ref_gen"]
