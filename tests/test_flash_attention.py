"""Blocked online-softmax attention (model/flash.py) = plain L×L masked softmax attention, in the
output and in the gradients of q, k and v (autodiff of the plain formula), f32, ≤1e-5 relative to
the largest value. Global and chunked masks, packed documents (segment ids with per-document
positions), lengths that are not multiples of the block or the chunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_reference
from attention_reference import packed, plain, qkvw
from llama4_jax.model.flash import flash_attention

TOL = 1e-5


def close(a, b, what):
    attention_reference.close(a, b, what, TOL)


@pytest.mark.parametrize("L, chunk, block", [
    (45, None, 16),  # global, 3 blocks, the last one padded
    (45, 12, 16),  # chunked, chunk not a multiple of the block, blocks straddle chunks
    (64, 8, 16),  # chunked, chunk smaller than the block
    (37, 20, 8),  # chunked, chunk spanning 3 blocks
    (24, None, 512),  # one block smaller than the default
])
def test_flash_equals_plain_attention_with_gradients(L, chunk, block):
    B, K, G, Dh = 2, 2, 2, 8
    q, k, v, w = qkvw(B, L, K, G, Dh, seed=L + (chunk or 0))  # w: a random cotangent
    pos, seg = packed(B, L, seed=L)
    scale = Dh ** -0.5

    def out_and_grads(f):  # one compiled program: the output and the q/k/v gradients of Σ out·w
        def run(q, k, v):
            o, vjp = jax.vjp(lambda q, k, v: f(q, k, v, pos, seg, scale, chunk), q, k, v)
            return o, vjp(w)
        return jax.jit(run)

    fast = lambda q, k, v, pos, seg, scale, chunk: flash_attention(q, k, v, pos, seg, scale, chunk, block=block)
    (o, grads), (o_ref, grads_ref) = out_and_grads(fast)(q, k, v), out_and_grads(plain)(q, k, v)
    close(o, o_ref, "output")
    for name, a, b in zip("qkv", grads, grads_ref):
        close(a, b, f"d{name}")


def _two_documents(B, L, cut):
    """Every row: document 1 up to `cut`, document 2 after it, positions restarting at the cut."""
    idx = np.arange(L)
    seg = np.where(idx < cut, 1, 2)
    pos = np.where(idx < cut, idx, idx - cut)
    return jnp.asarray(np.repeat(pos[None], B, 0), jnp.int32), jnp.asarray(np.repeat(seg[None], B, 0), jnp.int32)


@pytest.mark.parametrize("chunk", [None, 20])
def test_unmasked_and_skipped_blocks_equal_plain_attention(chunk):
    """Block pairs the kernel runs without a mask (keys all visible: earlier block of the same
    document and chunk) or skips (different documents or chunks) give plain attention's output and
    gradients. The rows are built so that all three kinds occur, which the test checks first."""
    from llama4_jax.model.flash import FULL, MASKED, SKIP, _blocks, _block_kinds

    B, L, K, G, Dh, T = 2, 96, 1, 2, 8, 8
    pos, seg = _two_documents(B, L, cut=44)  # block 5 (rows 40-47) holds the document boundary
    kind = _block_kinds(_blocks(pos, T), _blocks(seg, T), chunk)
    i, j = np.tril_indices(L // T)  # the causal pairs
    kinds = set(np.asarray(jax.vmap(kind)(jnp.asarray(i), jnp.asarray(j))).tolist())
    assert kinds == {FULL, MASKED, SKIP}, kinds
    q, k, v, w = qkvw(B, L, K, G, Dh, seed=7)
    scale = Dh ** -0.5

    def out_and_grads(f):
        def run(q, k, v):
            o, vjp = jax.vjp(lambda q, k, v: f(q, k, v, pos, seg, scale, chunk), q, k, v)
            return o, vjp(w)
        return jax.jit(run)

    fast = lambda q, k, v, pos, seg, scale, chunk: flash_attention(q, k, v, pos, seg, scale, chunk, block=T)
    (o, grads), (o_ref, grads_ref) = out_and_grads(fast)(q, k, v), out_and_grads(plain)(q, k, v)
    close(o, o_ref, "output")
    for name, a, b in zip("qkv", grads, grads_ref):
        close(a, b, f"d{name}")


def test_memory_grows_with_the_block_not_the_row():
    """Compiled temporaries of fwd+bwd at 4× the length grow about 4× (O(L·T)), not 16× (O(L²))."""
    B, K, G, Dh, T = 1, 1, 2, 16, 64

    def temps(L):
        q = jax.ShapeDtypeStruct((B, L, K, G, Dh), jnp.float32)
        kv = jax.ShapeDtypeStruct((B, L, K, Dh), jnp.float32)
        ids = jax.ShapeDtypeStruct((B, L), jnp.int32)
        f = lambda q, k, v, p, s: jnp.sum(flash_attention(q, k, v, p, s, 0.25, None, block=T))
        c = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
        return c.memory_analysis().temp_size_in_bytes

    small, big = temps(1024), temps(4096)
    assert big < 6 * small, (small, big)


def test_model_with_flash_attention_equals_the_xla_kernels(random_flat):
    """The whole model (chunked RoPE layers, a global NoPE layer, MoE) with
    `model.runtime.attention: flash` gives the logits and gradients of the query-blocked kernels."""
    from flax import nnx

    from llama4_jax.model import store
    from llama4_jax.model.config import ModelConfig, MoEConfig, RuntimeConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                      dense_ff=48, moe=MoEConfig(num_experts=4, top_k=2, expert_ff=24), interleave_moe_layer_step=2,
                      attention_chunk_size=12, floor_scale=4, rope_theta=10000.0)
    flat = random_flat(cfg, seed=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 40)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], 2, 0), jnp.int32)

    def loss_and_grads(rt):
        model = store.model_from_flat(cfg, flat, rt)
        gdef, params, rest = nnx.split(model, nnx.Param, ...)
        f = lambda p: jnp.mean(nnx.merge(gdef, p, rest, copy=True)(ids, seg) ** 2)
        return jax.jit(jax.value_and_grad(f))(params)

    (l0, g0), (l1, g1) = loss_and_grads(RuntimeConfig(attention="xla")), \
        loss_and_grads(RuntimeConfig(attention="flash", flash_block=16))
    close(l1, l0, "loss")
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        close(a, b, jax.tree_util.keystr(p))
