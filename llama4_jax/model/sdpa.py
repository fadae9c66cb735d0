"""Global-layer attention through `jax.nn.dot_product_attention`: cuDNN's fused flash attention on
GPU (`implementation="cudnn"`), XLA's plain L×L formula elsewhere (`"xla"`, the same call, so the
plumbing is testable on CPU).

What it can express, and therefore where attention.py uses it: the causal mask (`is_causal`, which
cuDNN turns into skipped blocks) and packed documents (segment ids), passed as a boolean
[B, 1, L, L] `mask` — jax.nn has no segment-id argument, and cuDNN turns the mask into an additive
bias of that size, so this path holds O(B·L²) mask memory on top of the kernel's O(L). Chunked
layers are not expressible: cuDNN's sliding window cuts by row, the chunks here are cut by
per-document position, so they would need the same L×L mask; attention.py runs them on the
blocked kernels instead. cuDNN reads half precision only (bf16 / f16 q, k, v); float32 runs use
the blocked kernels too.

Shapes as flash.py: q [B, L, K, G, Dh], k and v [B, L, K, Dh]. jax.nn's grouped heads are
query head n on KV head n // G, which is our [K, G] order flattened. The row is padded to a
multiple of 8 (cuDNN wants even lengths with a bias) with segment id −1, which no real row has.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

ROW_MULTIPLE = 8


def sdpa_attention(q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh, seg_BxL, scale: float,
                   implementation: Literal["cudnn", "xla"] | None = None):
    """Causal, same-document softmax attention by jax.nn.dot_product_attention → [B, L, K, G, Dh].
    `implementation=None`: "cudnn" on GPU, "xla" elsewhere."""
    if implementation is None:
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    B, L, K, G, Dh = q_BxLxKxGxDh.shape
    Lp = -(-L // ROW_MULTIPLE) * ROW_MULTIPLE
    pad = lambda x, val=0: jnp.pad(x, [(0, 0), (0, Lp - L)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
    seg_BxL = pad(seg_BxL, -1)
    same_doc_Bx1xLxL = (seg_BxL[:, :, None] == seg_BxL[:, None, :])[:, None]
    o_BxLxHxDh = jax.nn.dot_product_attention(
        pad(q_BxLxKxGxDh).reshape(B, Lp, K * G, Dh), pad(k_BxLxKxDh), pad(v_BxLxKxDh),
        mask=same_doc_Bx1xLxL, scale=scale, is_causal=True, implementation=implementation)
    return o_BxLxHxDh.reshape(B, Lp, K, G, Dh)[:, :L]
