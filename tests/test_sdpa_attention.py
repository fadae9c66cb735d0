"""Global-layer attention through jax.nn.dot_product_attention (model/sdpa.py) and the choice of
kernel per platform (attention.pick_kernel).

- "xla" implementation, here on CPU: the wrapper's plumbing (GQA head order, the segment mask,
  causal, padding to 8 rows) = plain L×L attention in output and q/k/v gradients, f32, ≤1e-5.
- "cudnn" implementation, only with a GPU: = the blocked kernel (flash.py) on the same bf16
  inputs, output and gradients within BF16_TOL of the largest value (two bf16 kernels that
  round their probabilities to bf16 at different points)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attention_reference import close, packed, plain, qkvw
from llama4_jax.model.attention import CUDNN_UP_TO, FLASH_FROM, pick_kernel
from llama4_jax.model.flash import flash_attention
from llama4_jax.model.sdpa import sdpa_attention

TOL = 1e-5
BF16_TOL = 2e-2


def test_xla_implementation_equals_plain_attention_with_gradients():
    B, L, K, G, Dh = 2, 45, 2, 2, 8  # L not a multiple of the 8-row padding
    q, k, v, w = qkvw(B, L, K, G, Dh, seed=L)
    pos, seg = packed(B, L, seed=5)
    scale = Dh ** -0.5
    fast = jax.jit(lambda q, k, v: sdpa_attention(q, k, v, seg, scale, implementation="xla"))
    ref = jax.jit(lambda q, k, v: plain(q, k, v, pos, seg, scale, None))
    (o, vjp), (o_ref, vjp_ref) = jax.vjp(fast, q, k, v), jax.vjp(ref, q, k, v)
    close(o, o_ref, "output", TOL)
    for name, a, b in zip("qkv", jax.jit(vjp)(w), jax.jit(vjp_ref)(w)):
        close(a, b, f"d{name}", TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_equals_the_blocked_kernel_in_bf16():
    B, L, K, G, Dh = 2, 1000, 2, 4, 64
    q, k, v, w = qkvw(B, L, K, G, Dh, seed=L, dtype=jnp.bfloat16)
    pos, seg = packed(B, L, seed=6)
    scale = Dh ** -0.5
    cudnn = jax.jit(lambda q, k, v: sdpa_attention(q, k, v, seg, scale, implementation="cudnn"))
    blocked = jax.jit(lambda q, k, v: flash_attention(q, k, v, pos, seg, scale, None, block=128))
    (o, vjp), (o_ref, vjp_ref) = jax.vjp(cudnn, q, k, v), jax.vjp(blocked, q, k, v)
    close(o, o_ref, "output", BF16_TOL)
    for name, a, b in zip("qkv", jax.jit(vjp)(w), jax.jit(vjp_ref)(w)):
        close(a, b, f"d{name}", BF16_TOL)


@pytest.mark.parametrize("impl, platform, L, chunked, dtype, want", [
    ("auto", "cpu", FLASH_FROM, False, jnp.float32, "xla"),
    ("auto", "cpu", FLASH_FROM + 1, True, jnp.bfloat16, "flash"),
    ("auto", "tpu", 128, True, jnp.float32, "splash"),
    ("auto", "tpu", 1 << 18, False, jnp.bfloat16, "splash"),
    ("auto", "gpu", CUDNN_UP_TO, False, jnp.bfloat16, "cudnn"),
    ("auto", "gpu", CUDNN_UP_TO + 8, False, jnp.bfloat16, "flash"),  # the L×L segment mask: too big
    ("auto", "gpu", 4096, True, jnp.bfloat16, "flash"),  # chunks cut by position: not expressible
    ("auto", "gpu", 4096, False, jnp.float32, "flash"),  # cuDNN reads half precision only
    ("auto", "gpu", 1024, False, jnp.float32, "xla"),
    ("cudnn", "gpu", 1 << 16, False, jnp.float16, "cudnn"),  # asked for: no length limit
    ("cudnn", "gpu", 1024, True, jnp.bfloat16, "flash"),
    ("splash", "cpu", 64, True, jnp.float32, "splash"),  # interpret mode
    ("flash", "tpu", 64, False, jnp.float32, "flash"),
    ("xla", "gpu", 1 << 16, False, jnp.bfloat16, "xla"),
])
def test_pick_kernel(impl, platform, L, chunked, dtype, want):
    assert pick_kernel(impl, platform, L, chunked, dtype) == want
