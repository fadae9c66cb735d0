"""Sharded initialisation on 8 fake CPU devices: nothing the rules shard is ever replicated.

On meshes (fsdp=8) and (data=2, expert=4) the body (a subprocess started with
`--xla_force_host_platform_device_count=8`) checks that every leaf has exactly the sharding the
rules table gives it — for a fresh train state (the trainer's jitted init), for the state after
`init_from` a converted checkpoint, and for `load_hf(..., mesh=...)` / `load_checkpoint(...,
mesh=...)` — and that the compiled init program's per-device output bytes are at most the bytes
the rules' shardings put on one device + 5%. Values must equal the single-device reading
(init_from / load_hf: exactly; a fresh state: the eager init up to the documented ~1e-8
fusion rounding of the jitted random normal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train_fixtures import write_small_experiment

from llama4_jax.config import load_experiment
from llama4_jax.convert.hf import to_hf
from llama4_jax.model import store

MESHES = {"fsdp8": ["mesh.data=1", "mesh.fsdp=8"], "data2_expert4": ["mesh.data=2", "mesh.expert=4"]}

SCRIPT = r"""
import json, sys
import jax, numpy as np
from flax import nnx
import llama4_jax
from llama4_jax import parallel
from llama4_jax.model.store import flat_name, flat_shardings
from llama4_jax.train.loop import Trainer
from llama4_jax.train.run import Run
from llama4_jax.train.state import init_state

exp, tmp, ckpt, hf_dir, meshes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])

def mismatches(tree, shardings):
    bad = []
    for (p, leaf), want in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
            bad.append(f"{jax.tree_util.keystr(p)}: {leaf.sharding.spec} != {want.spec}")
    return bad

def model_mismatches(model, run):
    want = flat_shardings(model.cfg, model.rt, run.mesh, run.rules)
    return [f"{flat_name(p)}: {v.get_value().sharding.spec} != {want[flat_name(p)].spec}"
            for p, v in nnx.state(model).flat_state()
            if not v.get_value().sharding.is_equivalent_to(want[flat_name(p)], v.get_value().ndim)]

def host(model):
    return {flat_name(p): np.asarray(v.get_value()) for p, v in nnx.state(model).flat_state()}

from llama4_jax.infer.generate import generate_ids
from llama4_jax.model import kv_cache

result = {}
ref_model = llama4_jax.load_hf(hf_dir)
ref_hf = host(ref_model)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, ref_model.cfg.vocab_size, n).tolist() for n in (3, 9, 17, 5, 12, 7, 20, 1)]
ref_gen = generate_ids(ref_model, prompts, max_new_tokens=6)
ref_ck = host(llama4_jax.load_checkpoint(ckpt))
for name, sets in meshes.items():
    r = {}
    run = Run(exp, overrides=sets, workdir=f"{tmp}/{name}", resume="never")
    tr = Trainer(run)
    tr.setup()  # a fresh run: the state is made here
    r["fresh"] = mismatches(tr.state, tr.shardings)
    r["partitioned"] = sum(any(a is not None for a in s.spec) for s in jax.tree.leaves(tr.shardings))
    with jax.set_mesh(run.mesh):
        compiled = jax.jit(lambda: init_state(run.cfg, 0, run.make_tx, rt=run.rt)[1],
                           out_shardings=tr.shardings).lower().compile()
    r["init_out_bytes"] = compiled.memory_analysis().output_size_in_bytes
    r["rules_bytes"] = parallel.per_device_bytes(tr.abstract, tr.shardings)
    eager = init_state(run.cfg, run.exp.seed, run.make_tx, rt=run.rt)[1]
    r["fresh_vs_eager"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                              for a, b in zip(jax.tree.leaves(tr.state.params), jax.tree.leaves(eager.params)))
    tr.close()

    run = Run(exp, overrides=[*sets, f"init_from={ckpt}"], workdir=f"{tmp}/{name}_init", resume="never")
    tr = Trainer(run)
    tr.setup()
    r["init_from"] = mismatches(tr.state, tr.shardings)
    got = {flat_name(p): np.asarray(v.get_value()) for p, v in tr.state.params.flat_state()}
    r["init_from_exact"] = all(np.array_equal(got[k], ref_ck[k]) for k in got)
    tr.close()

    model = llama4_jax.load_hf(hf_dir, mesh=run.mesh, rules=run.rules)
    r["load_hf"] = model_mismatches(model, run)
    r["load_hf_exact"] = all(np.array_equal(a, ref_hf[k]) for k, a in host(model).items())
    r["generate_equal"] = generate_ids(model, prompts, max_new_tokens=6) == ref_gen
    with jax.set_mesh(run.mesh):
        cache = jax.jit(lambda: kv_cache.init_cache(model.cfg, len(prompts), 256, np.float32))()
    r["cache_spec"] = [str(a) for a in cache.k[0].sharding.spec]
    r["batch_axes"] = [a for a in ("data", "fsdp", "expert") if run.mesh.shape[a] > 1]
    model = llama4_jax.load_checkpoint(ckpt, mesh=run.mesh, rules=run.rules)
    r["load_checkpoint"] = model_mismatches(model, run)
    r["load_checkpoint_exact"] = all(np.array_equal(a, ref_ck[k]) for k, a in host(model).items())
    result[name] = r
json.dump(result, open(f"{tmp}/result.json", "w"))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory, random_flat):
    tmp = tmp_path_factory.mktemp("shard8")
    exp = write_small_experiment(tmp, "{data: -1}")
    cfg = load_experiment(exp).to_model_config()
    store.save_params(tmp / "ckpt", cfg, random_flat(cfg, seed=5))
    to_hf(tmp / "ckpt", tmp / "hf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA4_JAX_", "JAX_COORDINATOR"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(exp), str(tmp), str(tmp / "ckpt"), str(tmp / "hf"),
                           json.dumps(MESHES)], capture_output=True, text=True, env=env, timeout=900, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "result.json").read_text())


@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.parametrize("what", ["fresh", "init_from", "load_hf", "load_checkpoint"])
def test_every_leaf_has_the_rules_sharding(result, name, what):
    assert result[name][what] == [], result[name][what][:5]


@pytest.mark.parametrize("name", list(MESHES))
def test_init_program_holds_no_more_than_its_shards(result, name):
    r = result[name]
    assert r["partitioned"] > 0  # the mesh really shards something
    assert r["init_out_bytes"] <= 1.05 * r["rules_bytes"], (r["init_out_bytes"], r["rules_bytes"])


@pytest.mark.parametrize("name", list(MESHES))
def test_decoding_on_the_mesh_equals_one_device(result, name):
    """Greedy KV-cache decoding of 8 prompts of different lengths with the weights sharded over the
    mesh gives the single-device tokens, and the cache's rows are split over the batch axes."""
    r = result[name]
    assert r["generate_equal"]
    batch = r["cache_spec"][0]
    assert all(a in batch for a in r["batch_axes"]), (r["cache_spec"], r["batch_axes"])


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_values_equal_the_single_device_reading(result, name):
    r = result[name]
    assert r["init_from_exact"] and r["load_hf_exact"] and r["load_checkpoint_exact"]
    assert r["fresh_vs_eager"] <= 1e-7, r["fresh_vs_eager"]
    assert np.isfinite(r["fresh_vs_eager"])
