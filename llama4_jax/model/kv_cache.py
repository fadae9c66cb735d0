"""The KV cache of a Llama 4 decoder: one (keys, values) pair per layer, slot layout per layer kind.

Global (NoPE) layers keep every position: slot = position, S = the bucketed total length.
Chunked (RoPE) layers keep one chunk as a ring: slot = position mod R with R = min(C, S). A query
at position p sees exactly the keys of its own chunk, positions ⌊p/C⌋·C .. p, which sit in slots
0 .. p mod C once p's own key is written (R < C only when every position is below R ≤ C, i.e. in
chunk 0, where slot = position). Older slots hold an earlier chunk and are masked, never read.

Slots past a row's current position may hold anything (right padding of the prompt, stale chunks):
the masks below never show them, and each is overwritten at the step that makes it visible.
Every row has its own positions, so rows of different prompt lengths share one cache.

Storage (`kv`): "model" keeps keys and values in the model's compute dtype; "int8" and "fp8"
(float8_e4m3fn) store 8-bit codes with one float32 scale per (row, slot, KV head): a head vector
x is kept as round(x / s) with s = max|x| / 127 (int8) or x / s with s = max|x| / 448 (fp8), so
each 128-wide head costs 132 bytes instead of 256 (bf16) or 512 (f32). Only cached keys and values
are quantized: the prompt attends to its own keys in full precision during prefill, and each
decode step dequantizes the cache (`read`) before attending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from ..parallel.rules import constrain
from .config import ModelConfig

CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")  # "cache_length" has no rule: whole
BUCKET = 256
KV_STORAGE = ("model", "int8", "fp8")
_CODES = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}  # global cache lengths are rounded up to a multiple: one compiled decode step per bucket


def bucket(n: int, multiple: int = BUCKET) -> int:
    return -(-n // multiple) * multiple


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Quantized:
    """One cache array stored as 8-bit codes [B, S, K, Dh] and float32 scales [B, S, K]."""

    codes: jax.Array
    scale: jax.Array
    kind: str = field(metadata=dict(static=True), default="int8")

    @property
    def shape(self):
        return self.codes.shape


def quantize(x_BxLxKxDh: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """Head vectors → (codes, float32 scale per vector); an all-zero vector gets scale 1."""
    dtype, top = _CODES[kind]
    x = x_BxLxKxDh.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    y = x / scale[..., None]
    return (jnp.round(y) if kind == "int8" else y).astype(dtype), scale


def read(cache, dtype):
    """The cached keys or values [B, S, K, Dh] in `dtype` (dequantized if stored as codes)."""
    if isinstance(cache, Quantized):
        return (cache.codes.astype(jnp.float32) * cache.scale[..., None]).astype(dtype)
    return cache


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Per layer k, v: [B, S_layer, K, Dh] (S_layer = ring size R for chunked layers, S for global)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def ring_size(chunk: int | None, total: int) -> int:
    return total if chunk is None else min(chunk, total)


def init_cache(cfg: ModelConfig, batch: int, total: int, dtype, kv: str = "model") -> KVCache:
    """An empty cache for `batch` rows of at most `total` positions (use `bucket(...)`), stored in
    `dtype` (the model's compute dtype) or as 8-bit codes (`kv` "int8" / "fp8")."""
    if kv not in KV_STORAGE:
        raise ValueError(f"unknown KV cache storage {kv!r}: expected one of {', '.join(KV_STORAGE)}")
    shapes = [(batch, ring_size(cfg.attention_chunk_size if cfg.is_chunked(i) else None, total),
               cfg.num_kv_heads, cfg.head_dim) for i in range(cfg.num_layers)]

    def empty(shape):  # under a mesh: rows over the batch axes, KV heads over `tensor` (rules table)
        if kv == "model":
            return constrain(jnp.zeros(shape, dtype), CACHE_AXES)
        return Quantized(constrain(jnp.zeros(shape, _CODES[kv][0]), CACHE_AXES),
                         constrain(jnp.ones(shape[:3], jnp.float32), CACHE_AXES[:3]), kv)

    return KVCache(tuple(empty(s) for s in shapes), tuple(empty(s) for s in shapes))


def _store(cache, new, put, *args):
    """`put(array, new, *args)` on a plain cache array, or on a Quantized one's codes and scales
    (`new` quantized first)."""
    if isinstance(cache, Quantized):
        codes, scale = quantize(new, cache.kind)
        return Quantized(put(cache.codes, codes, *args), put(cache.scale, scale, *args), cache.kind)
    return put(cache, new, *args)


def fill(cache, new_BxLxKxDh: jax.Array, lengths_B: jax.Array, chunk: int | None):
    """The cache after a prompt prefill: row b's first lengths_B[b] positions of `new` (the rest is padding).

    Global: slot = position, written whole. Ring of R slots: slot s takes position ⌊len/R⌋·R + s, the
    current chunk's keys (those past len − 1 are padding, masked until overwritten)."""
    return _store(cache, new_BxLxKxDh, _fill, lengths_B, chunk)


def _fill(cache_BxSx_, new_BxLx_, lengths_B, chunk):
    S = cache_BxSx_.shape[1]
    L = new_BxLx_.shape[1]
    new_BxLx_ = new_BxLx_.astype(cache_BxSx_.dtype)
    if chunk is None:
        return jax.lax.dynamic_update_slice_in_dim(cache_BxSx_, new_BxLx_[:, :S], 0, axis=1)
    src_BxS = (lengths_B[:, None] // S) * S + jnp.arange(S)[None, :]
    src_BxS = jnp.clip(src_BxS, 0, L - 1)
    return jnp.take_along_axis(new_BxLx_, src_BxS.reshape(src_BxS.shape + (1,) * (new_BxLx_.ndim - 2)), axis=1)


def slot(pos_B: jax.Array, size: int, chunk: int | None) -> jax.Array:
    return pos_B if chunk is None else pos_B % size


def write(cache, new_BxKxDh: jax.Array, pos_B: jax.Array, chunk: int | None):
    """Row b's key for position pos_B[b] into its slot (a scatter of B rows, in place when donated)."""
    return _store(cache, new_BxKxDh, _write, pos_B, chunk)


def _write(cache_BxSx_, new_Bx_, pos_B, chunk):
    B, S = cache_BxSx_.shape[:2]
    s_B = slot(pos_B, S, chunk)
    return cache_BxSx_.at[jnp.arange(B), s_B].set(new_Bx_.astype(cache_BxSx_.dtype), mode="drop")


def visible(pos_B: jax.Array, size: int, chunk: int | None) -> jax.Array:
    """[B, S] bool: slots a query at pos_B may attend to, its own key already written."""
    s_S = jnp.arange(size)[None, :]
    last_B = pos_B if chunk is None else pos_B % chunk
    return s_S <= last_B[:, None]
