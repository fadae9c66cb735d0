"""Pallas splash attention (TPU) for both layer kinds, computing exactly flash.py's masked softmax.

`splash_attention(q, k, v, pos, seg, scale, chunk)` runs jax.experimental.pallas's splash
attention kernel (fwd + its own bwd kernels) with:
  - global layers: a static `CausalMask` and the segment ids as splash's `SegmentIds`;
  - chunked layers: a static `LocalMask` reaching C − 1 rows back (no key further back can share
    a chunk), and as segment id the pair (document, parity of ⌊pos/C⌋) coded as 2·seg + parity.
    Splash's own `ChunkedCausalMask` cuts chunks by row index; ours are cut by per-document
    position (a document continued from the previous row starts mid-chunk, a packed document
    starts a new chunk), so the row mask alone cannot express them. Inside the C-row window,
    positions of one document advance by one per row (the invariant every kernel here relies
    on), so two rows of one document are at most one chunk apart and the parity tells "same
    chunk" from "next chunk" exactly.
The static masks make splash skip every fully masked block: the causal triangle's upper half, and
for chunked layers everything but the C-row band (O(L·C) work).

Shapes as flash.py: q [B, L, K, G, Dh], k and v [B, L, K, Dh]; the kernel is splash's MQA form
(G query heads on one KV head), vmapped over batch and KV heads. Rows are padded to a multiple of
the block with segment id −1, which no real row has (padding rows see only each other and are
cut off). Off TPU the kernel runs in Pallas interpret mode (`interpret=None` decides by the
platform): the same program, evaluated op by op — for tests, far too slow for training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

LANES = 128  # splash's block sizes must be multiples of the TPU lane width


def _block(Lp: int, block: int) -> int:
    """The largest of block, block/2, ..., 128 that divides the padded length."""
    b = max(LANES, block // LANES * LANES)
    while Lp % b:
        b //= 2
    return b


@functools.lru_cache(maxsize=32)
def _kernel(Lp: int, G: int, chunk: int | None, block: int, interpret: bool):
    """Splash's MQA kernel for G query heads over Lp rows (static mask info built once per shape)."""
    shape = (Lp, Lp)
    one = sm.CausalMask(shape) if chunk is None else sm.LocalMask(shape, (chunk - 1, 0), 0)
    b = _block(Lp, block)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # Concrete arrays even when first built inside a jit trace: the cached kernel outlives it.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * G), block_sizes=sizes,
                                                interpret=interpret)


def segment_codes(pos_BxL, seg_BxL, chunk: int | None):
    """Splash segment ids: the document, and for chunked layers the parity of its chunk (doc)."""
    if chunk is None:
        return seg_BxL
    return seg_BxL * 2 + (pos_BxL // chunk) % 2


def splash_attention(q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh, pos_BxL, seg_BxL, scale: float,
                     chunk: int | None = None, block: int = 512, interpret: bool | None = None):
    """Masked softmax attention by the splash kernel (module docstring) → [B, L, K, G, Dh]."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    B, L, K, G, Dh = q_BxLxKxGxDh.shape
    Lp = -(-L // LANES) * LANES
    pad = lambda x, val=0: jnp.pad(x, [(0, 0), (0, Lp - L)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
    ids_BxL = pad(segment_codes(pos_BxL, seg_BxL, chunk), -1)
    # splash does not scale the logits; scaling q first is the same product (in bf16: one more rounding)
    q_BxKxGxLxDh = jnp.einsum("blkgd->bkgld", pad(q_BxLxKxGxDh) * jnp.asarray(scale, q_BxLxKxGxDh.dtype))
    k_BxKxLxDh, v_BxKxLxDh = (jnp.einsum("blkd->bkld", pad(x)) for x in (k_BxLxKxDh, v_BxLxKxDh))
    kernel = _kernel(Lp, G, chunk, block, bool(interpret))

    def one_row(q_KxGxLxDh, k_KxLxDh, v_KxLxDh, ids_L):
        ids = sk.SegmentIds(q=ids_L, kv=ids_L)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KxGxLxDh, k_KxLxDh, v_KxLxDh)

    o_BxKxGxLxDh = jax.vmap(one_row)(q_BxKxGxLxDh, k_BxKxLxDh, v_BxKxLxDh, ids_BxL)
    return jnp.einsum("bkgld->blkgd", o_BxKxGxLxDh)[:, :L].astype(q_BxLxKxGxDh.dtype)
