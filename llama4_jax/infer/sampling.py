"""Next-token choice from float32 logits: greedy, or temperature sampling restricted by top-k / top-p.

The settings travel as traced scalars (changing them does not recompile); the key is folded with
the step number, so a seed fixes the whole generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from . import GenerateError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax), whatever top_k / top_p say
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerateError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p)


def _sampled(logits_BxV, key, temperature, top_k, top_p):
    """Temperature, then the top-k cut (top_k = 0: none), then the nucleus: the most likely tokens
    until their mass reaches top_p (the first always kept, so a tiny top_p is greedy). One sort."""
    V = logits_BxV.shape[-1]
    logits_BxV = logits_BxV / temperature
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    sorted_BxV = jnp.where(jnp.arange(V) < k, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass strictly above each token
    keep_BxV = (jnp.arange(V) < k) & ((before_BxV < top_p) | (jnp.arange(V) == 0))
    cut_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(logits_BxV < cut_Bx1, -jnp.inf, logits_BxV), axis=-1)


def sample(logits_BxV: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """→ token ids [B] int32. The settings may be traced scalars: one compiled step serves them all;
    greedy (temperature 0) skips the sort at run time."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    return jax.lax.cond(
        temperature > 0,
        lambda: _sampled(logits_BxV, key, jnp.maximum(temperature, 1e-6), top_k, top_p).astype(jnp.int32),
        lambda: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32))
