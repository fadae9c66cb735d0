"""Context parallelism (model/context_parallel.py): the sequence split over a `context` mesh axis.

In this process (one device): the zig-zag layout, and the per-device kernel (`attend_blocks`,
the blocked online softmax over explicit row metadata) against a plain masked softmax in output,
log-sum-exp and gradients.

On 8 fake CPU devices (a subprocess: the flag must be set before JAX starts): the loss and the
gradients of every parameter of a 2-layer model (one chunked RoPE layer, one global NoPE layer
with temperature tuning; QK-norm; packed documents with segment ids and per-document positions)
equal the single-device run with the plain kernels (chunk 12, so chunks straddle the pieces of
16, 32 and 64 rows), for
  - context=8, ring attention,
  - data=2 × context=4, all-gather of K/V,
  - context=2 × expert=2 × tensor=2 (auto: ring) with expert-parallel MoE dispatch.
Tolerance (float32): max |a − b| ≤ 1e-5 · max(1, max |b|) for the loss and every gradient.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax import parallel
from llama4_jax.model.context_parallel import attend_blocks, choose_mode, local_rows

TOL = 1e-5


def test_zigzag_layout():
    perm = parallel.zigzag_order(16, 4)  # pieces of 2: device r holds pieces r and 7 - r
    assert perm.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    for r in range(4):
        assert np.asarray(local_rows(r, 4, 2)).tolist() == perm[4 * r:4 * r + 4].tolist()
    batch = {"inputs": np.arange(32).reshape(2, 16), "source_ids": np.array([3, 4])}
    out = parallel.to_context_layout(batch, 4)
    assert out["inputs"].tolist() == [perm.tolist(), (perm + 16).tolist()]
    assert out["source_ids"].tolist() == [3, 4]
    with pytest.raises(ValueError, match="not a multiple of 2 × 4"):
        parallel.zigzag_order(12, 4)


def test_context_axes_follow_the_length_rule():
    from jax.sharding import AbstractMesh

    from llama4_jax.model.context_parallel import context_axes
    mesh = AbstractMesh((2, 1, 1, 4, 1), parallel.MESH_AXES)
    R = parallel.DEFAULT_RULES
    assert context_axes(mesh, R) == ("context",)
    assert context_axes(mesh, {**R, "length": None}) == ()
    # an axis the batch takes is not free for the sequence (and the batch layout agrees)
    assert context_axes(mesh, {**R, "batch": ("data", "context")}) == ()
    assert context_axes(AbstractMesh((8, 1, 1, 1, 1), parallel.MESH_AXES), R) == ()


def test_mode_rule():
    # gathered K+V (2·n·kv_heads) no bigger than the local queries (heads) → all_gather
    assert choose_mode("auto", 4, 40, 8) == "ring"  # 64 > 40
    assert choose_mode("auto", 2, 40, 8) == "all_gather"  # 32 <= 40
    assert choose_mode("all_gather", 8, 4, 2) == "all_gather"


def _plain(q, k, v, qm, km, scale, chunk):
    (qi, qp, qs), (ki, kp, ks) = qm, km
    mask = (ki[:, None, :] <= qi[:, :, None]) & (qs[:, :, None] == ks[:, None, :])
    if chunk:
        mask &= (qp[:, :, None] // chunk) == (kp[:, None, :] // chunk)
    s = jnp.einsum("bqkgd,bmkd->bkgqm", q, k) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask[:, None, None], jnp.exp(s - lse[..., None]), 0.0)
    return jnp.einsum("bkgqm,bmkd->bqkgd", p, v), lse


def test_attend_blocks_equals_plain_softmax():
    """Queries against a key set that starts earlier (a neighbour's tail, then its own rows),
    lengths not multiples of the block, chunk mask and segment ids: output, lse and gradients
    (through both) ≤ 1e-5. (Without the chunk mask: the 8-device test's global layers.)"""
    chunk = 7
    rng = np.random.default_rng(0)
    B, Lq, Lk, K, G, Dh = 2, 21, 30, 2, 2, 8
    q = jnp.asarray(rng.normal(size=(B, Lq, K, G, Dh)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, Lk, K, Dh)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, Lk, K, Dh)), jnp.float32)
    kidx = np.broadcast_to(np.arange(Lk), (B, Lk))
    kseg = np.stack([np.repeat([0, 1, 2], [9, 12, 9]), np.repeat([5, 6], [3, 27])])
    kpos = np.stack([np.concatenate([np.arange(n) for n in r]) for r in ([9, 12, 9], [3, 27])])
    km = tuple(jnp.asarray(x, jnp.int32) for x in (kidx, kpos, kseg))
    qm = tuple(x[:, Lk - Lq:] for x in km)
    w = jnp.asarray(rng.normal(size=(B, K, G, Lq)), jnp.float32)

    def loss(f):  # → (loss, (o, lse)): one forward pass gives the outputs and the gradients
        def run(q, k, v):
            o, lse = f(q, k, v)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(w * jnp.where(lse > -1e30, lse, 0.0)), (o, lse)
        return run

    ours = lambda q, k, v: attend_blocks(q, k, v, qm, km, 0.3, chunk, block=8)
    ref = lambda q, k, v: _plain(q, k, v, qm, km, 0.3, chunk)
    both = lambda f: jax.jit(lambda q, k, v: jax.grad(loss(f), (0, 1, 2), has_aux=True)(q, k, v)[::-1])
    (out, grads), (out_ref, grads_ref) = both(ours)(q, k, v), both(ref)(q, k, v)
    for a, b in zip(out, out_ref):
        assert float(jnp.max(jnp.abs(a - b))) <= TOL
    for a, b in zip(grads, grads_ref):
        assert float(jnp.max(jnp.abs(a - b))) <= TOL * max(1.0, float(jnp.max(jnp.abs(b))))


def test_context_parallel_on_8_cpu_devices():
    # Backend optimisation off: the compiles (most of the time) take half as long.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    report = f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}"
    assert r.returncode == 0, f"context-parallel checks failed (exit {r.returncode})\n{report}"
    assert "ALL OK" in r.stdout, report


# --- everything below runs in the subprocess ------------------------------------------------------
def _checks():
    import time

    from flax import nnx

    from llama4_jax.model.config import MoERuntime, RuntimeConfig, preset
    from llama4_jax.model.transformer import Llama4, positions_from_segments
    from llama4_jax.parallel.rules import DEFAULT_RULES, logical_rules

    assert jax.device_count() == 8
    B, L = 4, 256
    rng = np.random.default_rng(0)
    seg = np.stack([np.repeat(np.arange(len(n)), n) for n in ([100, 60, 96], [256], [30, 200, 26], [7, 249])])
    local = {"inputs": rng.integers(0, 256, (B, L)).astype(np.int32),
             "targets": rng.integers(0, 256, (B, L)).astype(np.int32),
             "segment_ids": seg.astype(np.int32),
             "positions": np.asarray(positions_from_segments(jnp.asarray(seg))),
             "loss_mask": (rng.random((B, L)) > 0.1).astype(np.float32)}

    def build(chunk, **rt):
        cfg = preset("tiny", num_layers=2, no_rope_layers=(1, 0), attention_chunk_size=chunk,
                     max_position_embeddings=L, floor_scale=8)
        return Llama4(cfg, RuntimeConfig(**rt), rngs=nnx.Rngs(0))

    def loss_fn(graphdef, rest):
        def f(params, b):
            logits = nnx.merge(graphdef, params, rest, copy=True)(b["inputs"], b["segment_ids"], b["positions"])
            ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
            return jnp.sum(ce * b["loss_mask"]) / jnp.sum(b["loss_mask"])
        return f

    # MoE dispatch "dense" (every expert on every token, exact) compiles fastest; the EP case runs
    # the expert-parallel dropless path, also exact.
    def single(chunk):
        graphdef, params, rest = nnx.split(build(chunk, attention="xla", moe=MoERuntime(dispatch="dense")),
                                           nnx.Param, ...)
        batch = {k: jnp.asarray(v) for k, v in local.items()}
        return jax.jit(jax.value_and_grad(loss_fn(graphdef, rest)))(params, batch)

    def sharded(chunk, sizes, **rt):
        graphdef, params, rest = nnx.split(build(chunk, **rt), nnx.Param, ...)
        mesh = parallel.make_mesh(sizes)
        with logical_rules(DEFAULT_RULES), jax.set_mesh(mesh):
            sharding = parallel.batch_sharding(mesh, DEFAULT_RULES)
            assert parallel.context_shards(sharding) == sizes["context"]
            batch = parallel.global_batch(local, sharding)
            assert batch["inputs"].sharding.spec[1] == "context"
            return jax.jit(jax.value_and_grad(loss_fn(graphdef, rest)))(params, batch)

    def same(name, got, want):
        (lg, gg), (lw, gw) = got, want
        assert abs(float(lg) - float(lw)) <= TOL * max(1.0, abs(float(lw))), (name, float(lg), float(lw))
        worst = 0.0
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gg), jax.tree.leaves(gw)):
            a, b = np.asarray(a), np.asarray(b)
            err = float(np.max(np.abs(a - b)))
            worst = max(worst, err / max(1.0, float(np.max(np.abs(b)))))
            assert err <= TOL * max(1.0, float(np.max(np.abs(b)))), (name, jax.tree_util.keystr(path), err)
        print(f"ok {name}: loss {float(lg):.6f} (ref {float(lw):.6f}), worst grad diff {worst:.2e}", flush=True)

    ref = single(12)
    cases = [
        ("context=8 ring", {"context": 8}, dict(context_attention="ring", moe=MoERuntime(dispatch="dense"))),
        ("data=2 x context=4 all_gather", {"data": 2, "context": 4},
         dict(context_attention="all_gather", moe=MoERuntime(dispatch="dense"))),
        ("context=2 x expert=2 x tensor=2 ring, EP dispatch", {"context": 2, "expert": 2, "tensor": 2},
         dict(context_attention="auto", moe=MoERuntime(dispatch="dropless"))),
    ]
    failed = 0
    for name, sizes, rt in cases:
        t = time.perf_counter()
        try:
            same(name, sharded(12, {**dict.fromkeys(parallel.MESH_AXES, 1), **sizes}, **rt), ref)
        except Exception:
            import traceback
            traceback.print_exc()
            failed += 1
        print(f"  ({time.perf_counter() - t:.1f}s)", flush=True)
    if failed:
        sys.exit(1)
    print("ALL OK")


if __name__ == "__main__":
    _checks()
