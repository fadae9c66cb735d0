"""Blocked attention with an online softmax (flash style): O(L·T) memory for any layer kind.

`flash_attention(q, k, v, pos, seg, scale, chunk, block)` computes exactly what the plain masked
softmax computes — key j visible to query i iff j ≤ i (row order), same document (segment id),
and, for chunked layers, the same attention chunk (⌊pos_i/C⌋ = ⌊pos_j/C⌋) — but never holds more
than one [T, T] score block per (batch, head): the rows are cut into blocks of T, each query
block walks the key blocks it can see with a running max, denominator and output (the online
softmax), and keeps only its output and its log-sum-exp.

Which key blocks a query block visits is decided by structure alone, so fully masked blocks are
never computed: global layers visit key blocks 0..i (the causal triangle, ~half of all pairs);
chunked layers visit only the blocks that can share a chunk, keys at most C − 1 rows back
(a key further back is in an earlier chunk, packed documents included), ~(C/T + 1) per query
block, so their cost is O(L·C) whatever L.

The backward pass (custom VJP) recomputes each visited block's probabilities from the saved
log-sum-exp, as FlashAttention-2 does: dV_j = Σ_i Pᵀ dO_i, dS = P ⊙ (dP − rowsum(dO ⊙ O)),
dK_j = Σ_i dSᵀ Q_i · scale, dQ_i = Σ_j dS K_j · scale. Memory stays O(L·T).

Shapes: q [B, L, K, G, Dh] (G query heads per KV head), k and v [B, L, K, Dh].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

NEG_INF = float(jnp.finfo(jnp.float32).min)


def _first_block(i, T: int, chunk: int | None):
    """First key block query block i can see: 0 for global layers, else the block holding row
    i·T − (C − 1), the furthest key that can share a chunk with the block's first query."""
    if chunk is None:
        return jnp.zeros_like(i)
    return jnp.maximum(i * T - (chunk - 1), 0) // T


def _mask(qi, ki, qpos, kpos, qseg, kseg, chunk):
    m = (ki[None, :] <= qi[:, None]) & (qseg[..., :, None] == kseg[..., None, :])
    if chunk is not None:
        m &= (qpos[..., :, None] // chunk) == (kpos[..., None, :] // chunk)
    return m  # [B, Tq, Tk]


def _pad(x, n, value=0):
    pad = n - x.shape[1]
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _blocks(x, T):
    """[B, n·T, ...] → [n, B, T, ...] (block-major, so a loop index picks a block)."""
    B, L = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, L // T, T, *x.shape[2:]), 1, 0)


def flash_attention(q, k, v, pos, seg, scale: float, chunk: int | None = None, block: int = 512):
    """Masked softmax attention, blocked (module docstring). Any L: rows are padded to a multiple
    of the block with a segment id no real row has, then cut off."""
    L = q.shape[1]
    T = min(block, -(-L // 8) * 8)
    n = -(-L // T)
    Lp = n * T
    qb, kb, vb = (_blocks(_pad(x, Lp), T) for x in (q, k, v))
    posb = _blocks(_pad(pos, Lp), T)
    segb = _blocks(_pad(seg, Lp, -1), T)  # padding rows only see each other
    o = _flash(qb, kb, vb, posb, segb, scale, chunk)
    B = q.shape[0]
    return jnp.moveaxis(o, 0, 1).reshape(B, Lp, *q.shape[2:])[:, :L]


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qb, kb, vb, posb, segb, scale, chunk):
    return _flash_fwd(qb, kb, vb, posb, segb, scale, chunk)[0]


def _scores(q_i, k_j, scale):
    # [B, T, K, G, Dh] · [B, T, K, Dh] → [B, K, G, Tq, Tk] in float32
    return jnp.einsum("bqkgd,bmkd->bkgqm", q_i, k_j, preferred_element_type=jnp.float32) * scale


def block_grads(q_i, k_j, v_j, do_i, lse_i, delta_i, mask, scale):
    """One (query block, key block) pair's share of the attention gradients, from the saved
    log-sum-exp: → (dq_i, dk_j, dv_j) in float32. `mask` broadcasts against [B, K, G, Tq, Tk]."""
    p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale) - lse_i[..., None]), 0.0)
    dv = jnp.einsum("bkgqm,bqkgd->bmkd", p, do_i)
    dp = jnp.einsum("bqkgd,bmkd->bkgqm", do_i, v_j.astype(jnp.float32))
    ds = p * (dp - delta_i[..., None]) * scale
    dk = jnp.einsum("bkgqm,bqkgd->bmkd", ds, q_i.astype(jnp.float32))
    dq = jnp.einsum("bkgqm,bmkd->bqkgd", ds, k_j.astype(jnp.float32))
    return dq, dk, dv


def _visible(i, j, posb, segb, T, chunk):
    rows = lambda b: b * T + jnp.arange(T)
    return _mask(rows(i), rows(j), posb[i], posb[j], segb[i], segb[j], chunk)[:, None, None]  # [B,1,1,Tq,Tk]


def _forward_block(i, qb, kb, vb, posb, segb, scale, chunk):
    """One query block against its visible key blocks → (output [B, T, K, G, Dh], lse [B, K, G, T])."""
    B, T = qb.shape[1:3]
    K, G, Dh = qb.shape[3:]
    q_i = qb[i]

    def body(j, carry):
        m, l, acc = carry
        seen = _visible(i, j, posb, segb, T, chunk)
        s = jnp.where(seen, _scores(q_i, kb[j], scale), NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # Masked entries are 0 even while a row has seen nothing yet (m_new = NEG_INF there).
        p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgqm,bmkd->bkgqd", p.astype(vb.dtype), vb[j],
                                                 preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((B, K, G, T), NEG_INF, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, Dh), jnp.float32))
    m, l, acc = jax.lax.fori_loop(_first_block(i, T, chunk), i + 1, body, init)
    l = jnp.where(l > 0, l, 1.0)  # a row that sees nothing (padding) gets 0, not NaN
    o = jnp.einsum("bkgqd->bqkgd", acc / l[..., None]).astype(qb.dtype)
    return o, m + jnp.log(l)


def _flash_fwd(qb, kb, vb, posb, segb, scale, chunk):
    n = qb.shape[0]
    o, lse = jax.lax.map(lambda i: _forward_block(i, qb, kb, vb, posb, segb, scale, chunk), jnp.arange(n))
    return o, (qb, kb, vb, posb, segb, o, lse)


def _flash_bwd(scale, chunk, res, do):
    qb, kb, vb, posb, segb, o, lse = res
    do = do.astype(jnp.float32)
    n, T = qb.shape[0], qb.shape[2]
    # rowsum(dO ⊙ O) per query: [n, B, K, G, T]
    delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", do, o.astype(jnp.float32))

    def key_block(dq, j):
        """dK_j, dV_j over the query blocks that see key block j; dQ accumulated in the carry."""
        last = n - 1 if chunk is None else jnp.minimum((j * T + T - 1 + chunk - 1) // T, n - 1)

        def body(i, carry):
            dq, dk, dv = carry
            gq, gk, gv = block_grads(qb[i], kb[j], vb[j], do[i], lse[i], delta[i],
                                     _visible(i, j, posb, segb, T, chunk), scale)
            return dq.at[i].add(gq), dk + gk, dv + gv

        zeros = jnp.zeros(kb.shape[1:], jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, last + 1, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(key_block, dq0, jnp.arange(n))
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
