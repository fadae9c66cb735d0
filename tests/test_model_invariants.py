"""Model invariants, checked by gradients where it matters (exact zeros, not tolerances):
causality, the chunk boundary, document isolation; and the equivalences jit == eager,
remat == plain, scan == unrolled, blocked chunked attention == the plain L×L masked path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax.model import store
from llama4_jax.model.attention import chunked_attention, global_attention
from llama4_jax.model.config import ModelConfig, MoEConfig, RopeScaling, RuntimeConfig

# NoPE (global, temperature-tuned) layers at 1 and 3, chunked RoPE layers at 0 and 2, MoE top-2 on
# every 2nd layer: the layer pattern repeats with period 2, so scan runs 2 groups.
MIXED = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, dense_ff=48,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ff=24), interleave_moe_layer_step=2,
    no_rope_layers=(1, 0, 1, 0), attention_chunk_size=4, floor_scale=2, attn_scale=0.5,
    rope_theta=10000.0, rope_scaling=RopeScaling(original_max_position_embeddings=16))
# Every layer RoPE + chunked (so nothing can carry information across a chunk boundary).
ALL_ROPE = MIXED.replace(num_layers=2, no_rope_layers=(1, 1), interleave_moe_layer_step=1)

L = 14  # > 2·chunk (blocked path), not a multiple of the chunk


@pytest.fixture(scope="module")
def models(random_flat):
    return {name: store.model_from_flat(cfg, random_flat(cfg, seed=i))
            for i, (name, cfg) in enumerate((("mixed", MIXED), ("all_rope", ALL_ROPE)))}


def distinct_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Every token distinct within a row, so embedding-table gradient rows ↔ positions."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(vocab)[:length] for _ in range(batch)]).astype(np.int32)


@jax.jit
def _influence(state, graphdef, ids_BxL, seg_BxL, w_L, r_V):
    """(logits, d(r · logits[0, t]) / d embed rows of row 0), with w_L one-hot at t."""
    def f(state):
        logits = nnx.merge(graphdef, state)(ids_BxL, seg_BxL)
        return jnp.sum(logits[0] @ r_V * w_L), logits
    g, logits = jax.grad(f, has_aux=True)(state)
    return logits, g["embed"][...][ids_BxL[0]]  # [L, D]: one row per position (ids distinct)


def position_influence(model, ids, seg=None):
    """(G, logits): G[t, s] = ‖d(r · logits[0, t]) / d embed(ids[0, s])‖ for a random r."""
    graphdef, state = nnx.split(model)
    r = np.random.default_rng(0).standard_normal(model.cfg.vocab_size).astype(np.float32)
    seg = np.zeros_like(ids) if seg is None else seg
    eye = np.eye(ids.shape[1], dtype=np.float32)  # numpy: eager jax ops would each compile
    rows = [_influence(state, graphdef, ids, seg, eye[t], r) for t in range(ids.shape[1])]
    G = np.stack([np.linalg.norm(np.asarray(g), axis=-1) for _, g in rows])
    return G, np.asarray(rows[0][0])


def test_causality_by_gradient(models):
    model = models["mixed"]
    G, _ = position_influence(model, distinct_ids(2, L, MIXED.vocab_size))
    future = np.triu(np.ones((L, L), bool), k=1)
    assert np.all(G[future] == 0.0)  # exact: masked scores get exactly zero probability
    assert np.all(G[~future] > 0.0)  # global NoPE layers reach every earlier token


@pytest.mark.parametrize("length", [L, 7], ids=["blocked", "plain"])
def test_chunk_boundary_by_gradient(models, length):
    """All-RoPE model: a token sees exactly the earlier tokens of its own chunk."""
    C = ALL_ROPE.attention_chunk_size
    G, _ = position_influence(models["all_rope"], distinct_ids(1, length, ALL_ROPE.vocab_size))
    t, s = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    visible = (s <= t) & (s // C == t // C)
    assert np.all(G[~visible] == 0.0)
    assert np.all(G[visible] > 0.0)


def test_documents_do_not_attend_across_segments(models):
    """Row 0 packs doc 1 (5 tokens) and doc 2; row 1 holds doc 2 alone (positions from 0), then filler."""
    model = models["mixed"]
    n1 = 5  # doc boundary not on a chunk boundary
    ids = distinct_ids(2, L, MIXED.vocab_size, seed=1)
    ids[1, : L - n1] = ids[0, n1:]
    seg = np.array([[0] * n1 + [1] * (L - n1), [0] * (L - n1) + [1] * n1], np.int32)
    G, logits = position_influence(model, ids, seg)
    assert np.all(G[n1:, :n1] == 0.0)  # doc-2 logits ignore doc 1
    assert np.all(G[n1:, n1:][np.tril(np.ones((L - n1,) * 2, bool))] > 0.0)
    # Doc 2 packed behind doc 1 == doc 2 alone: positions restart, so RoPE, the chunk grid and the
    # temperature all see the same positions.
    np.testing.assert_allclose(logits[0, n1:], logits[1, : L - n1], rtol=0, atol=1e-5)


def loss_fn(model, ids):
    logp = jax.nn.log_softmax(model(ids)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def assert_close_scaled(got, want, name, tol=1e-5):
    """max |Δ| ≤ tol · max |want|: the same sums in another order, not an elementwise rtol on
    entries that happen to be near zero."""
    err = float(np.abs(got - want).max())
    assert err <= tol * float(np.abs(want).max()), f"{name}: max |Δ| {err:.3g}, max |want| {np.abs(want).max():.3g}"


_value_and_grad = nnx.jit(nnx.value_and_grad(loss_fn))  # one compile per model graph, shared by tests
_forward = nnx.jit(lambda m, x: m(x))


def flat_grads(model, ids) -> tuple[float, dict[str, np.ndarray]]:
    loss, grads = _value_and_grad(model, ids)
    return float(loss), {store.flat_name(p): np.asarray(v.get_value()) for p, v in grads.flat_state()}


def test_jit_equals_eager(models):
    # The 2-layer model: eager mode compiles op by op, which is slow; L > 2C takes the blocked path.
    model = models["all_rope"]
    ids = jnp.asarray(distinct_ids(2, L, ALL_ROPE.vocab_size))
    eager = np.asarray(model(ids))
    jitted = np.asarray(_forward(model, ids))
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-5)


def uses_checkpoint(model, ids) -> bool:
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(ids))(state))
    return "checkpoint" in jaxpr or "remat" in jaxpr


def test_remat_equals_plain(models, random_flat):
    flat = random_flat(MIXED, seed=0)
    plain = store.model_from_flat(MIXED, flat)
    remat = store.model_from_flat(MIXED, flat, RuntimeConfig(remat=True))
    ids = jnp.asarray(distinct_ids(2, L, MIXED.vocab_size))
    assert not uses_checkpoint(plain, ids) and uses_checkpoint(remat, ids)  # remat is really on
    (l0, g0), (l1, g1) = flat_grads(plain, ids), flat_grads(remat, ids)
    assert l0 == pytest.approx(l1, abs=1e-6)
    assert sorted(g0) == sorted(g1)
    for k in g0:
        assert_close_scaled(g1[k], g0[k], k)


def test_scan_equals_unrolled(random_flat, stack_for_scan):
    flat = random_flat(MIXED, seed=0)  # same as the remat test: the unrolled compile is shared
    assert MIXED.scan_period() == 2
    unrolled = store.model_from_flat(MIXED, flat)
    scanned = store.model_from_flat(MIXED, stack_for_scan(MIXED, flat), RuntimeConfig(scan_layers=True))
    ids = jnp.asarray(distinct_ids(2, L, MIXED.vocab_size))
    (l0, g0), (l1, g1) = flat_grads(unrolled, ids), flat_grads(scanned, ids)
    assert l1 == pytest.approx(l0, abs=1e-6)
    g0_scan = stack_for_scan(MIXED, g0)
    assert sorted(g0_scan) == sorted(g1)
    for k in g1:
        assert_close_scaled(g1[k], g0_scan[k], k)


# --- blocked chunked attention == plain L×L masked path ------------------------------------------
def packed_rows(L: int):
    """Row 0: a document continuing from the previous row (positions start at 5), then a new one.
    Row 1: one document starting at position 3. Row 2: three short documents."""
    pos = np.zeros((3, L), np.int32)
    seg = np.zeros((3, L), np.int32)
    n = L // 2
    pos[0, :n], pos[0, n:] = np.arange(5, 5 + n), np.arange(L - n)
    seg[0, n:] = 1
    pos[1] = np.arange(3, 3 + L)
    cuts = [0, L // 4, L // 4 + 3, L]
    for d in range(3):
        pos[2, cuts[d]:cuts[d + 1]] = np.arange(cuts[d + 1] - cuts[d])
        seg[2, cuts[d]:cuts[d + 1]] = d
    return pos, seg


@pytest.mark.parametrize("length,chunk,grads", [(13, 4, True), (16, 4, False), (24, 5, False), (9, 4, False)])
def test_blocked_chunked_attention_equals_masked(length, chunk, grads):
    """L not a multiple of C, a multiple, a ragged last block, and C < L < 2C; packed rows."""
    K, G, Dh = 2, 3, 8
    rng = np.random.default_rng(length * chunk)  # numpy inputs: eager jax.random ops compile one by one
    q = rng.standard_normal((3, length, K, G, Dh), np.float32)
    k, v = rng.standard_normal((2, 3, length, K, Dh), np.float32)
    w = rng.standard_normal(q.shape, np.float32)
    pos, seg = packed_rows(length)
    blocked, plain, unchunked, gb, gp = _attention_paths(q, k, v, w, pos, seg, chunk, grads)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(plain), rtol=0, atol=1e-5)
    # The chunk mask really bites: without it the plain path gives a different answer.
    assert np.abs(np.asarray(unchunked) - np.asarray(plain)).max() > 1e-2
    # Gradients agree too (the training path).
    for a, b in zip(gb, gp):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@jax.jit(static_argnums=(6, 7))
def _attention_paths(q, k, v, w, pos, seg, chunk, with_grads):
    scale = q.shape[-1] ** -0.5
    blocked = lambda *a: chunked_attention(*a, pos, seg, scale, chunk)
    plain = lambda *a: global_attention(*a, pos, seg, scale, chunk=chunk)
    grads = [jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2))(q, k, v) if with_grads else ()
             for fn in (blocked, plain)]
    return blocked(q, k, v), plain(q, k, v), global_attention(q, k, v, pos, seg, scale), *grads


def _reference_attention(q, k, v, pos, seg, scale, chunk):
    """The textbook formula, differentiated by JAX autodiff: full L×L scores, masked softmax."""
    L = q.shape[1]
    i = jnp.arange(L)
    mask = (i[None, None, :] <= i[None, :, None]) & (seg[:, :, None] == seg[:, None, :])
    if chunk is not None:
        mask &= (pos[:, :, None] // chunk) == (pos[:, None, :] // chunk)
    s = jnp.einsum("blkgd,bmkd->bkglm", q, k) * scale
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bkglm,bmkd->blkgd", p, v)


@pytest.mark.parametrize("length,chunk,blocks,splits", [(13, 4, 1, 1), (13, 4, 3, 2), (16, None, 4, None),
                                                         (19, None, 5, None), (24, 5, 8, 1), (29, 8, 2, 4)])
def test_attention_custom_vjp_equals_autodiff_reference(length, chunk, blocks, splits):
    """Both attention paths (the causal query blocks of the global one, the windows of the
    chunked one) and their hand-written backward pass equal autodiff of the plain formula."""
    K, G, Dh = 2, 2, 8
    rng = np.random.default_rng(length + (chunk or 0))
    q = rng.standard_normal((3, length, K, G, Dh), np.float32)
    k, v = rng.standard_normal((2, 3, length, K, Dh), np.float32)
    w = rng.standard_normal(q.shape, np.float32)
    pos, seg = packed_rows(length)
    scale = Dh ** -0.5
    paths = {"reference": lambda *a: _reference_attention(*a, pos, seg, scale, chunk),
             "global": lambda *a: global_attention(*a, pos, seg, scale, chunk=chunk, query_blocks=blocks)}
    if chunk is not None:
        paths["chunked"] = lambda *a: chunked_attention(*a, pos, seg, scale, chunk, splits=splits)
    out = {name: jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
           for name, f in paths.items()}
    ref_val, ref_grads = out.pop("reference")
    for name, (val, grads) in out.items():
        np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5, err_msg=name)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5, err_msg=name)
