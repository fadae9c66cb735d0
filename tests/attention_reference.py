"""The plain L×L masked softmax attention every attention kernel is tested against, packed-row
metadata to feed it, and the comparison (≤ tol relative to the largest reference value)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def plain(q, k, v, pos, seg, scale, chunk):
    """softmax(q·kᵀ·scale masked)·v over the whole row: the reference, written independently."""
    L = q.shape[1]
    i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    mask = (j <= i)[None] & (seg[:, :, None] == seg[:, None, :])
    if chunk is not None:
        mask &= (pos[:, :, None] // chunk) == (pos[:, None, :] // chunk)
    s = jnp.einsum("bqkgd,bmkd->bkgqm", q, k) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    return jnp.einsum("bkgqm,bmkd->bqkgd", jax.nn.softmax(s, axis=-1), v)


def packed(B, L, seed, first_pos=None):
    """Segment ids for 1-3 documents per row and per-document positions; `first_pos[b]` (if given)
    is where row b's first document starts, as for a document continued from the previous row."""
    rng = np.random.default_rng(seed)
    seg = np.ones((B, L), np.int32)
    for b in range(B):
        for cut in sorted(rng.choice(np.arange(1, L), rng.integers(0, 3), replace=False)):
            seg[b, cut:] += 1
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    idx = np.arange(L)[None].repeat(B, 0)
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    if first_pos is not None:
        pos = pos + np.where(seg == 1, np.asarray(first_pos)[:, None], 0)
    return jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


def qkvw(B, L, K, G, Dh, seed, dtype=jnp.float32):
    """Random q, k, v and a cotangent for the output (numpy's generator: no compile per shape)."""
    rng = np.random.default_rng(seed)
    shapes = [(B, L, K, G, Dh), (B, L, K, Dh), (B, L, K, Dh), (B, L, K, G, Dh)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)


def close(a, b, what, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err, scale = np.abs(a - b).max(), max(1.0, np.abs(b).max())
    assert err <= tol * scale, f"{what}: max |Δ| = {err:.3g} > {tol} × {scale:.3g}"
