"""Pallas splash attention (model/splash.py), run here in Pallas interpret mode on CPU, = plain
L×L masked softmax attention in the output and in the gradients of q, k and v (splash's own
backward kernels), f32, ≤ TOL relative to the largest value. Global and chunked masks; packed
documents whose first one continues from the previous row (positions not starting at 0, so
chunks are cut by position, not row); a length padded to the 128-row block; chunks straddling
the kernel's blocks."""

from __future__ import annotations

import jax
import pytest

from attention_reference import close, packed, plain, qkvw
from llama4_jax.model.splash import splash_attention

TOL = 1e-5
B, L, K, G, Dh = 2, 200, 2, 2, 16


@pytest.mark.parametrize("chunk", [None, 48])
def test_splash_equals_plain_attention_with_gradients(chunk):
    q, k, v, w = qkvw(B, L, K, G, Dh, seed=7)
    pos, seg = packed(B, L, seed=3, first_pos=[37, 0])
    scale = Dh ** -0.5
    fast = lambda q, k, v: splash_attention(q, k, v, pos, seg, scale, chunk, block=128, interpret=True)
    ref = jax.jit(lambda q, k, v: plain(q, k, v, pos, seg, scale, chunk))

    (o, vjp), (o_ref, vjp_ref) = jax.vjp(jax.jit(fast), q, k, v), jax.vjp(ref, q, k, v)
    close(o, o_ref, "output", TOL)
    for name, a, b in zip("qkv", jax.jit(vjp)(w), jax.jit(vjp_ref)(w)):
        close(a, b, f"d{name}", TOL)


def test_attention_layer_with_splash_equals_the_xla_kernels():
    """`model.runtime.attention: splash` reaches the kernel with the layer's chunk, positions and
    segment ids: a chunked RoPE layer (QK-norm) gives the query-blocked kernel's output."""
    from flax import nnx

    from llama4_jax.model.attention import Attention
    from llama4_jax.model.config import preset

    cfg = preset("tiny", attention_chunk_size=16)
    Lx = 40
    x = jax.numpy.asarray(qkvw(1, Lx, 1, 1, cfg.hidden_size, seed=2)[0][:, :, 0, 0])
    pos, seg = packed(1, Lx, seed=4, first_pos=[9])
    layer = lambda impl: Attention(cfg, use_rope=True, param_dtype=jax.numpy.float32, rngs=nnx.Rngs(0), impl=impl)
    out = {impl: nnx.jit(lambda m, x: m(x, pos, seg))(layer(impl), x) for impl in ("splash", "xla")}
    close(out["splash"], out["xla"], "layer output", TOL)


def test_a_kernel_first_built_inside_a_trace_holds_no_tracers():
    """The kernel (and its block-mask arrays) is cached per shape across jit traces, so it must be
    built from concrete arrays even when the first call is inside one (else: a leaked tracer)."""
    from llama4_jax.model import splash

    key = (128, 1, 32, 128, True)
    splash._kernel.cache_clear()
    jax.jit(lambda: (splash._kernel(*key), 0)[1])()
    leaves = jax.tree.leaves(splash._kernel(*key))
    assert leaves and not any(isinstance(x, jax.core.Tracer) for x in leaves)
