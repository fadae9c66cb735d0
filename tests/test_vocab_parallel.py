"""The vocab tables on a mesh (model/vocab_parallel.py, train/loss.py): the embedding lookup and
the vocab-parallel chunked loss equal the single-device formulas, and no device holds a whole
[V, D] table or float32 head gradient.

On 8 fake CPU devices: the checks run in a subprocess (the device-count flag must be set before
JAX starts, and must not leak into the pytest worker's other tests)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llama4_jax.model.vocab_parallel import embed_lookup
from llama4_jax.parallel.mesh import make_mesh
from llama4_jax.parallel.rules import DEFAULT_RULES, MESH_AXES, logical_rules, spec_for
from llama4_jax.train.loss import chunked_token_losses, token_losses

# (mesh sizes, rule overrides): FSDP alone; batch over data×expert with the model dim over
# fsdp×expert; three batch axes with the table over one of them; a vocab dim already split over
# tensor; rows split over the sequence too (context).
LAYOUTS = [
    ({"fsdp": 8}, {}),
    ({"data": 2, "expert": 4}, {"embed": ("fsdp", "expert")}),
    ({"data": 2, "fsdp": 2, "expert": 2}, {}),
    ({"fsdp": 2, "expert": 2, "tensor": 2}, {}),
    ({"fsdp": 4, "context": 2}, {}),
]
IDS = [",".join(f"{k}{v}" for k, v in m.items()) + ("+embed" if r else "") for m, r in LAYOUTS]

B, L, D, V = 8, 12, 32, 64  # N = 96 rows, not a multiple of the chunk (20 rows)


def make_data():
    rng = np.random.default_rng(0)
    return dict(
        h=jnp.asarray(rng.normal(size=(B * L, D)), jnp.float32),
        w=jnp.asarray(rng.normal(size=(D, V)) * 0.3, jnp.float32),
        t=jnp.asarray(rng.integers(0, V, B * L), jnp.int32),
        d=jnp.asarray(rng.normal(size=B * L), jnp.float32),  # an arbitrary cotangent per row
        table=jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
        ids=jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32),
        probe=jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32),
    )


def _place(x, axes, mesh, rules):
    return jax.device_put(x, NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules)))


def _loss_fn(data, chunk):
    return lambda h, w: jnp.sum(chunked_token_losses(h, w, data["t"], chunk) * data["d"])


def _lookup_fn(data):
    return lambda table: jnp.sum(embed_lookup(table, data["ids"], jnp.float32) * data["probe"])


def test_vocab_parallel_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"ok {len(LAYOUTS)} layouts + whole-table check", r.stdout


# --- everything below runs in the subprocess ------------------------------------------------------

def loss_and_lookup_equal_the_single_device_formulas(data, sizes, overrides):
    rules = {**DEFAULT_RULES, **overrides}
    mesh = make_mesh(sizes)
    # Reference: plain cross entropy on materialised logits, plain lookup, one device.
    ref_loss = token_losses((data["h"] @ data["w"])[None], data["t"][None])[0]
    ref_g = jax.grad(lambda h, w: jnp.sum(token_losses((h @ w)[None], data["t"][None])[0] * data["d"]),
                     argnums=(0, 1))(data["h"], data["w"])
    ref_emb = jnp.take(data["table"], data["ids"], axis=0)
    ref_dtable = jax.grad(lambda tb: jnp.sum(jnp.take(tb, data["ids"], axis=0) * data["probe"]))(data["table"])
    with jax.set_mesh(mesh), logical_rules(rules):
        h = _place(data["h"], ("batch", None), mesh, rules)
        w = _place(data["w"], ("embed", "vocab"), mesh, rules)
        table = _place(data["table"], ("vocab", "embed"), mesh, rules)
        losses = jax.jit(lambda h, w: chunked_token_losses(h, w, data["t"], 20))(h, w)
        g = jax.jit(jax.grad(_loss_fn(data, 20), argnums=(0, 1)))(h, w)
        emb = jax.jit(lambda tb: embed_lookup(tb, data["ids"], jnp.float32))(table)
        dtable = jax.jit(jax.grad(_lookup_fn(data)))(table)
        text = jax.jit(jax.grad(_loss_fn(data, 20), argnums=(0, 1))).lower(h, w).as_text()
    assert "manual" in text  # the vocab-parallel path ran (a shard_map), not the fallback
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ref_loss), rtol=1e-5, atol=1e-5)
    for got, want in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(ref_emb))  # a lookup moves values exactly
    np.testing.assert_allclose(np.asarray(dtable), np.asarray(ref_dtable), rtol=1e-6, atol=1e-6)


def no_device_holds_a_whole_table():
    """fsdp=8, V large against everything else: the compiled fwd+bwd of the loss and of the
    lookup each need less scratch than ONE whole float32 [D, V] (the gathered head, or the
    whole-table gradient of the plain lookup, which gathering the table first does allocate)."""
    Vb, Db, N = 16384, 64, 64
    whole = Vb * Db * 4
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(N, Db)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(Db, Vb)) * 0.1, jnp.float32)
    t = jnp.asarray(rng.integers(0, Vb, N), jnp.int32)
    ids = jnp.asarray(rng.integers(0, Vb, (8, N // 8)), jnp.int32)
    mesh, rules = make_mesh({"fsdp": 8}), DEFAULT_RULES

    def temps(fn, *args):
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    loss = jax.grad(lambda h, w: jnp.sum(chunked_token_losses(h, w, t, 16)), argnums=(0, 1))
    lookup = jax.grad(lambda tb: jnp.sum(embed_lookup(tb, ids, jnp.float32) ** 2))
    with jax.set_mesh(mesh), logical_rules(rules):
        hs, ws = _place(h, ("batch", None), mesh, rules), _place(w, ("embed", "vocab"), mesh, rules)
        tb = _place(w.T, ("vocab", "embed"), mesh, rules)
        split = temps(loss, hs, ws), temps(lookup, tb)
        # The old way: gather the table's D shards, then look up locally.
        gathered = jax.grad(lambda tb: jnp.sum(jnp.take(jax.lax.with_sharding_constraint(tb, P()), ids, axis=0) ** 2))
        whole_lookup = temps(gathered, tb)
    assert split[0] < whole / 2 and split[1] < whole / 2, (split, whole)
    assert whole_lookup >= whole  # the measure sees a whole table when there is one


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    data = make_data()
    for (sizes, overrides), name in zip(LAYOUTS, IDS):
        loss_and_lookup_equal_the_single_device_formulas(data, sizes, overrides)
        print("equal:", name, flush=True)
    no_device_holds_a_whole_table()
    print(f"ok {len(LAYOUTS)} layouts + whole-table check")
