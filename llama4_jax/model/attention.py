"""Llama 4 attention: GQA, interleaved RoPE (+ llama3 scaling), QK-norm, temperature tuning,
and the three masks that compose — causal, chunked-local (RoPE layers), document (segment ids).

Chunked layers cost O(L·C), not O(L²): queries in row block b (of size C) can only see keys in
blocks b-1 and b, because a key in the same attention chunk is at most C-1 tokens back. The masks
are still applied exactly, from per-document positions, so packed rows behave as separate
sequences.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from . import kv_cache
from .context_parallel import context_attention, context_axes
from .config import ModelConfig, RopeScaling
from .flash import flash_attention
from .layers import MakeDot, param, plain_dot, rms_normalize, rows_dot
from .sdpa import sdpa_attention
from .splash import splash_attention

NEG_INF = float(jnp.finfo(jnp.float32).min)
# Rows past which "auto" uses the flash kernel: below it the query-blocked kernels are faster on
# CPU and their O(L²) (global) / O(L·C) (chunked) score buffers still fit comfortably.
FLASH_FROM = 2048
# Rows up to which "auto" on GPU gives global layers to cuDNN: its segment mask is an L×L bias
# (sdpa.py), 128 MiB per bf16 row here; past it the blocked kernel's O(L·T) wins.
CUDNN_UP_TO = 8192
HALF = (jnp.bfloat16, jnp.float16)


def pick_kernel(impl: str, platform: str, L: int, chunked: bool, dtype) -> str:
    """The kernel a layer runs (docs/long_context.md, "Which kernel runs where"): "xla", "flash",
    "splash" or "cudnn". A kernel that cannot express the layer's mask falls back to the blocked
    ones: cuDNN has no position-cut chunk mask and reads half precision only."""
    cudnn_ok = not chunked and jnp.dtype(dtype) in HALF
    if impl == "cudnn":
        return "cudnn" if cudnn_ok else "flash"
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and cudnn_ok and L <= CUDNN_UP_TO:
        return "cudnn"
    return "flash" if L > FLASH_FROM else "xla"


# --- RoPE ---------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxLxNxDh: jax.Array, pos_BxL: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by pos·inv_freq[j] (Llama 4 convention)."""
    ang_BxLxJ = pos_BxL[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(ang_BxLxJ)[:, :, None, :], jnp.sin(ang_BxLxJ)[:, :, None, :]
    xf = x_BxLxNxDh.astype(jnp.float32).reshape(*x_BxLxNxDh.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x_BxLxNxDh.shape).astype(x_BxLxNxDh.dtype)


def temperature_scale(pos_BxL: jax.Array, floor_scale: int, attn_scale: float) -> jax.Array:
    """Per-query scale for NoPE layers: 1 + attn_scale·ln(1 + ⌊(pos+1)/floor_scale⌋)."""
    p = pos_BxL.astype(jnp.float32)
    return jnp.log1p(jnp.floor((p + 1.0) / floor_scale)) * attn_scale + 1.0


# --- masked softmax attention -------------------------------------------------------------
def _visible(qi, ki, qpos, kpos, qseg, kseg, chunk):
    """Key visible to query: causal by row index, same document, same chunk (if chunked)."""
    m = (ki <= qi) & (qseg == kseg)
    if chunk is not None:
        m &= (qpos // chunk) == (kpos // chunk)
    return m


def _scores(q_XxCxKxGxDh, k_XxMxKxDh, scale):
    return jnp.einsum("xckgd,xmkd->xkgcm", q_XxCxKxGxDh, k_XxMxKxDh, preferred_element_type=jnp.float32) * scale


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q_XxCxKxGxDh, k_XxMxKxDh, v_XxMxKxDh, mask_XxCxM, scale):
    """softmax(q·kᵀ·scale, masked)·v for X independent (query block, key window) pairs.

    The custom VJP is the textbook one flash attention uses, in plain XLA ops: the backward pass
    reads the saved probabilities once (ds = p ⊙ (dp − rowsum(do ⊙ o))) instead of
    differentiating through the mask select and the softmax's reductions; masked scores have
    p = 0, so they get exactly zero gradient. Values match autodiff of the plain formula to
    float rounding (tests compare against HF and against it).
    """
    return _attend_fwd(q_XxCxKxGxDh, k_XxMxKxDh, v_XxMxKxDh, mask_XxCxM, scale)[0]


def _attend_fwd(q, k, v, mask_XxCxM, scale):
    s = _scores(q, k, scale)
    s = jnp.where(mask_XxCxM[:, None, None], s, NEG_INF)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)
    o = jnp.einsum("xkgcm,xmkd->xckgd", p, v)
    return o, (q, k, v, p, o)


def _attend_bwd(scale, res, do_XxCxKxGxDh):
    q, k, v, p, o = res
    do = do_XxCxKxGxDh.astype(v.dtype)
    dv = jnp.einsum("xkgcm,xckgd->xmkd", p, do)
    dp = jnp.einsum("xckgd,xmkd->xkgcm", do, v, preferred_element_type=jnp.float32)
    row = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [X, C, K, G]
    ds = (p.astype(jnp.float32) * (dp - jnp.transpose(row, (0, 2, 3, 1))[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("xkgcm,xmkd->xckgd", ds, k)
    dk = jnp.einsum("xkgcm,xckgd->xmkd", ds, q)
    return dq, dk, dv, None


attend.defvjp(_attend_fwd, _attend_bwd)


def global_attention(q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh, pos_BxL, seg_BxL, scale, chunk=None,
                     query_blocks: int | None = None):
    """Causal attention over the whole row (the chunk mask, if any, still applies from positions).

    Queries go in `query_blocks` row blocks; block i only computes scores against keys
    [0, end of block i): the blocks above the causal diagonal, fully masked, are skipped
    (4 blocks: 10 of 16 score blocks computed; 8 blocks: 36 of 64).
    """
    B, L = q_BxLxKxGxDh.shape[:2]
    n = query_blocks or max(1, min(8, L // 64))
    bounds = [round(i * L / n) for i in range(n + 1)]
    idx = jnp.arange(L)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mask_BxCxM = _visible(idx[None, a:b, None], idx[None, None, :b], pos_BxL[:, a:b, None], pos_BxL[:, None, :b],
                              seg_BxL[:, a:b, None], seg_BxL[:, None, :b], chunk)
        outs.append(attend(q_BxLxKxGxDh[:, a:b], k_BxLxKxDh[:, :b], v_BxLxKxDh[:, :b], mask_BxCxM, scale))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def _windows(x, n, Bq, s, fill=0):
    """[B, n·Bq, ...] → (query blocks [B, n, Bq, ...], key windows [B, n, (s+1)·Bq, ...]): window i
    is blocks i−s, ..., i concatenated; blocks before the row start are `fill`."""
    xb = x.reshape(x.shape[0], n, Bq, *x.shape[2:])
    xp = jnp.concatenate([jnp.full_like(xb[:, :1], fill)] * s + [xb], axis=1)  # [B, s + n, Bq, ...]
    return xb, jnp.concatenate([xp[:, j:j + n] for j in range(s + 1)], axis=2)


def chunked_attention(q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh, pos_BxL, seg_BxL, scale, chunk, splits=None):
    """Chunked-local attention at O(L·C): query blocks of Bq = C/splits rows against the
    C − 1 + Bq keys that can share a chunk with them (a key more than C − 1 rows back is in an
    earlier chunk, packed documents included), rounded to (splits + 1)·Bq. Computed scores per
    query: 2C for splits=1, 1.5C for 2, 1.25C for 4 (the default when C divides by 4)."""
    B, L = q_BxLxKxGxDh.shape[:2]
    C = chunk
    s = splits or next(d for d in (4, 2, 1) if C % d == 0 and (C // d >= 8 or d == 1))
    Bq = C // s
    n = -(-L // Bq)
    pad = n * Bq - L
    if pad:
        padw = lambda a, val=0: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=val)
        q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh = padw(q_BxLxKxGxDh), padw(k_BxLxKxDh), padw(v_BxLxKxDh)
        pos_BxL, seg_BxL = padw(pos_BxL), padw(seg_BxL, -1)
    idx_BxL = jnp.broadcast_to(jnp.arange(n * Bq), (B, n * Bq))
    qb = q_BxLxKxGxDh.reshape(B, n, Bq, *q_BxLxKxGxDh.shape[2:])
    kw = _windows(k_BxLxKxDh, n, Bq, s)[1]  # [B, n, (s+1)·Bq, K, Dh]
    vw = _windows(v_BxLxKxDh, n, Bq, s)[1]
    pos_q, kpos = _windows(pos_BxL, n, Bq, s)
    seg_q, kseg = _windows(seg_BxL, n, Bq, s, fill=-2)  # before the row start: never visible
    idx_q, kidx = _windows(idx_BxL, n, Bq, s)
    mask_BxNxCxM = _visible(idx_q[..., :, None], kidx[..., None, :], pos_q[..., :, None], kpos[..., None, :],
                            seg_q[..., :, None], kseg[..., None, :], C)
    flat = lambda a: a.reshape(B * n, *a.shape[2:])
    o = attend(flat(qb), flat(kw), flat(vw), flat(mask_BxNxCxM), scale)
    return o.reshape(B, n * Bq, *o.shape[2:])[:, :L]


# --- the module ---------------------------------------------------------------------------
class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, use_rope: bool, *, param_dtype, rngs: nnx.Rngs,
                 make_dot: MakeDot = plain_dot, chunked: bool | None = None, impl: str = "auto",
                 flash_block: int = 512, context_mode: str = "auto"):
        """`chunked` (the mask) defaults to `use_rope`; HF's `layer_types` may set it apart.
        `impl` (RuntimeConfig.attention): "xla" the query-blocked kernels below, "flash" the
        online-softmax kernel of flash.py (O(L·block) memory), "splash" Pallas's (splash.py),
        "cudnn" jax.nn's (sdpa.py), "auto" by platform and length (pick_kernel).
        When the ambient mesh splits the sequence (a `context` axis), context_parallel.py runs
        instead, its global layers by `context_mode` (RuntimeConfig.context_attention)."""
        D, H, K, Dh, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, param_dtype
        std = cfg.initializer_range
        self.q = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pd, std=std)
        self.k = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd, std=std)
        self.v = param(rngs, (D, K, Dh), ("embed", "kv_heads", "head_dim"), pd, std=std)
        self.o = param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), pd, std=std)
        self.use_rope = use_rope
        self.chunk = cfg.attention_chunk_size if (use_rope if chunked is None else chunked) else None
        self.qk_norm = cfg.use_qk_norm and use_rope
        self.temperature = cfg.attn_temperature_tuning and not use_rope
        self.eps, self.floor_scale, self.attn_scale = cfg.rms_norm_eps, cfg.floor_scale, cfg.attn_scale
        self.rope = (cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.groups = H // K
        self.dot_q, self.dot_k, self.dot_v, self.dot_o = (make_dot() for _ in range(4))
        self.impl, self.flash_block, self.context_mode = impl, flash_block, context_mode

    def __call__(self, x_BxLxD, pos_BxL, seg_BxL):
        q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh = self.project(x_BxLxD, pos_BxL)
        B, L, K, G, Dh = q_BxLxKxGxDh.shape
        scale = Dh ** -0.5
        args = (q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh, pos_BxL, seg_BxL, scale, self.chunk)
        cp_axes = context_axes()
        if cp_axes:  # the rows are split (zig-zag) over the context axis
            o = context_attention(*args, axes=cp_axes, mode=self.context_mode, block=self.flash_block)
            return self._out(o)
        chunked = self.chunk is not None
        kernel = pick_kernel(self.impl, jax.default_backend(), L, chunked, q_BxLxKxGxDh.dtype)
        if kernel == "flash":
            o = flash_attention(*args, block=self.flash_block)
        elif kernel == "splash":
            o = splash_attention(*args, block=self.flash_block)
        elif kernel == "cudnn":
            o = sdpa_attention(q_BxLxKxGxDh, k_BxLxKxDh, v_BxLxKxDh, seg_BxL, scale)
        else:
            # The blocked path pays 2C keys per query; below L = 2C the plain L×L path is cheaper.
            use_blocks = self.chunk is not None and L > 2 * self.chunk
            o = chunked_attention(*args) if use_blocks else global_attention(*args)
        return self._out(o)

    # --- the projections (shared with cached inference, llama4_jax/infer) ---------------------
    def project(self, x_BxLxD, pos_BxL):
        """→ q [B, L, K, G, Dh] (RoPE, QK-norm, temperature applied), k, v [B, L, K, Dh]."""
        q_BxLxHxDh = rows_dot(self.dot_q, x_BxLxD, self.q[...])
        k_BxLxKxDh = rows_dot(self.dot_k, x_BxLxD, self.k[...])
        v_BxLxKxDh = rows_dot(self.dot_v, x_BxLxD, self.v[...])
        if self.use_rope:
            inv_freq = rope_inv_freq(*self.rope)
            q_BxLxHxDh, k_BxLxKxDh = apply_rope(q_BxLxHxDh, pos_BxL, inv_freq), apply_rope(k_BxLxKxDh, pos_BxL, inv_freq)
        if self.qk_norm:
            q_BxLxHxDh, k_BxLxKxDh = rms_normalize(q_BxLxHxDh, self.eps), rms_normalize(k_BxLxKxDh, self.eps)
        if self.temperature:
            t_BxL = temperature_scale(pos_BxL, self.floor_scale, self.attn_scale)
            q_BxLxHxDh = (q_BxLxHxDh.astype(jnp.float32) * t_BxL[..., None, None]).astype(q_BxLxHxDh.dtype)
        B, L, H, Dh = q_BxLxHxDh.shape
        return q_BxLxHxDh.reshape(B, L, H // self.groups, self.groups, Dh), k_BxLxKxDh, v_BxLxKxDh

    def _out(self, o_BxLxKxGxDh):
        B, L = o_BxLxKxGxDh.shape[:2]
        return rows_dot(self.dot_o, o_BxLxKxGxDh.reshape(B, L, -1, o_BxLxKxGxDh.shape[-1]), self.o[...], 2)

    def prefill(self, x_BxLxD, lengths_B, k_cache, v_cache):
        """Right-padded prompts (row b real up to lengths_B[b]) at positions 0..L-1 → (output, the
        cache filled with their keys and values). Padding only follows real tokens, so causality
        keeps it out of them."""
        B, L = x_BxLxD.shape[:2]
        pos_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        q, k_BxLxKxDh, v_BxLxKxDh = self.project(x_BxLxD, pos_BxL)
        args = (q, k_BxLxKxDh, v_BxLxKxDh, pos_BxL, jnp.zeros_like(pos_BxL), q.shape[-1] ** -0.5, self.chunk)
        use_blocks = self.chunk is not None and L > 2 * self.chunk  # as in __call__
        o = chunked_attention(*args) if use_blocks else global_attention(*args)
        return (self._out(o), kv_cache.fill(k_cache, k_BxLxKxDh, lengths_B, self.chunk),
                kv_cache.fill(v_cache, v_BxLxKxDh, lengths_B, self.chunk))

    def decode(self, x_Bx1xD, pos_B, k_cache_BxSxKxDh, v_cache_BxSxKxDh):
        """One new token per row at its own position pos_B → (output [B, 1, D], updated cache)."""
        q_Bx1xKxGxDh, k_Bx1xKxDh, v_Bx1xKxDh = self.project(x_Bx1xD, pos_B[:, None])
        k_cache_BxSxKxDh = kv_cache.write(k_cache_BxSxKxDh, k_Bx1xKxDh[:, 0], pos_B, self.chunk)
        v_cache_BxSxKxDh = kv_cache.write(v_cache_BxSxKxDh, v_Bx1xKxDh[:, 0], pos_B, self.chunk)
        mask_Bx1xS = kv_cache.visible(pos_B, k_cache_BxSxKxDh.shape[1], self.chunk)[:, None, :]
        dt = q_Bx1xKxGxDh.dtype
        o = attend(q_Bx1xKxGxDh, kv_cache.read(k_cache_BxSxKxDh, dt), kv_cache.read(v_cache_BxSxKxDh, dt), mask_Bx1xS,
                   q_Bx1xKxGxDh.shape[-1] ** -0.5)
        return self._out(o), k_cache_BxSxKxDh, v_cache_BxSxKxDh
