"""The KV cache of a Llama 4 decoder: one (keys, values) pair per layer, slot layout per layer kind.

Global (NoPE) layers keep every position: slot = position, S = the bucketed total length.
Chunked (RoPE) layers keep one chunk as a ring: slot = position mod R with R = min(C, S). A query
at position p sees exactly the keys of its own chunk, positions ⌊p/C⌋·C .. p, which sit in slots
0 .. p mod C once p's own key is written (R < C only when every position is below R ≤ C, i.e. in
chunk 0, where slot = position). Older slots hold an earlier chunk and are masked, never read.

Slots past a row's current position may hold anything (right padding of the prompt, stale chunks):
the masks below never show them, and each is overwritten at the step that makes it visible.
Every row has its own positions, so rows of different prompt lengths share one cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..parallel.rules import constrain
from .config import ModelConfig

CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")  # "cache_length" has no rule: whole
BUCKET = 256  # global cache lengths are rounded up to a multiple: one compiled decode step per bucket


def bucket(n: int, multiple: int = BUCKET) -> int:
    return -(-n // multiple) * multiple


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Per layer k, v: [B, S_layer, K, Dh] (S_layer = ring size R for chunked layers, S for global)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def ring_size(chunk: int | None, total: int) -> int:
    return total if chunk is None else min(chunk, total)


def init_cache(cfg: ModelConfig, batch: int, total: int, dtype) -> KVCache:
    """An empty cache for `batch` rows of at most `total` positions (use `bucket(...)`), stored in
    `dtype` (the model's compute dtype)."""
    shapes = [(batch, ring_size(cfg.attention_chunk_size if cfg.is_chunked(i) else None, total),
               cfg.num_kv_heads, cfg.head_dim) for i in range(cfg.num_layers)]

    def empty(shape):  # under a mesh: rows over the batch axes, KV heads over `tensor` (rules table)
        return constrain(jnp.zeros(shape, dtype), CACHE_AXES)

    return KVCache(tuple(empty(s) for s in shapes), tuple(empty(s) for s in shapes))


def fill(cache_BxSxKxDh: jax.Array, new_BxLxKxDh: jax.Array, lengths_B: jax.Array, chunk: int | None):
    """The cache after a prompt prefill: row b's first lengths_B[b] positions of `new` (the rest is padding).

    Global: slot = position, written whole. Ring of R slots: slot s takes position ⌊len/R⌋·R + s, the
    current chunk's keys (those past len − 1 are padding, masked until overwritten)."""
    S = cache_BxSxKxDh.shape[1]
    L = new_BxLxKxDh.shape[1]
    new_BxLxKxDh = new_BxLxKxDh.astype(cache_BxSxKxDh.dtype)
    if chunk is None:
        return jax.lax.dynamic_update_slice_in_dim(cache_BxSxKxDh, new_BxLxKxDh[:, :S], 0, axis=1)
    src_BxS = (lengths_B[:, None] // S) * S + jnp.arange(S)[None, :]
    src_BxS = jnp.clip(src_BxS, 0, L - 1)
    return jnp.take_along_axis(new_BxLxKxDh, src_BxS[:, :, None, None], axis=1)


def slot(pos_B: jax.Array, size: int, chunk: int | None) -> jax.Array:
    return pos_B if chunk is None else pos_B % size


def write(cache_BxSxKxDh: jax.Array, new_BxKxDh: jax.Array, pos_B: jax.Array, chunk: int | None):
    """Row b's key for position pos_B[b] into its slot (a scatter of B rows, in place when donated)."""
    B, S = cache_BxSxKxDh.shape[:2]
    s_B = slot(pos_B, S, chunk)
    return cache_BxSxKxDh.at[jnp.arange(B), s_B].set(new_BxKxDh.astype(cache_BxSxKxDh.dtype), mode="drop")


def visible(pos_B: jax.Array, size: int, chunk: int | None) -> jax.Array:
    """[B, S] bool: slots a query at pos_B may attend to, its own key already written."""
    s_S = jnp.arange(size)[None, :]
    last_B = pos_B if chunk is None else pos_B % chunk
    return s_S <= last_B[:, None]
