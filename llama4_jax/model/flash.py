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
block, so their cost is O(L·C) whatever L. Within those, each pair is classified from per-block
summaries (min/max of segment id and chunk id, `_block_kinds`): FULL pairs (an earlier block of
the same document and chunk: every key visible) run without building or applying the mask,
SKIP pairs (different documents or chunks throughout) are not computed, the rest (the diagonal,
blocks straddling a boundary, padding) are masked as before.

The backward pass (custom VJP) recomputes each visited block's probabilities from the saved
log-sum-exp, as FlashAttention-2 does: dV_j = Σ_i Pᵀ dO_i, dS = P ⊙ (dP − rowsum(dO ⊙ O)),
dK_j = Σ_i dSᵀ Q_i · scale, dQ_i = Σ_j dS K_j · scale, in two sweeps that each accumulate into
one block only: key-block-major for dK, dV (on transposed [keys, queries] score blocks), then
query-block-major for dQ. Memory stays O(L·T).

Layout (CPU speed, BENCHMARKS.md "Long context"): inside the kernel a block is [B·K, rows, Dh],
heads in the batch dim and the G query heads of a KV head stacked as G·T rows, so every product
is one batched GEMM whose operands need no transpose — a product contracting over the rows of a
score block (Pᵀ·dO on a [queries, keys] block) costs ~10× a plain one on XLA CPU, which is why
dK, dV use transposed score blocks and dQ its own sweep rather than sharing one (an explicit
transpose costs as much); a dQ carried over all rows and updated per pair (`dq.at[i].add`, the
earlier kernel) measured ~1–3 ms per update at 256 blocks (128K rows) here, a copy of the buffer.

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
    B, L, K, G, _ = q.shape
    T = min(block, -(-L // 8) * 8)
    n = -(-L // T)
    Lp = n * T
    qh, kh, vh = (_heads_major(_pad(x, Lp), n, T) for x in (q, k, v))
    posb = _blocks(_pad(pos, Lp), T)
    segb = _blocks(_pad(seg, Lp, -1), T)  # padding rows only see each other
    o = _flash(qh, kh, vh, posb, segb, scale, chunk)
    return _rows_major(o, B, K, G)[:, :L]


def _heads_major(x, n: int, T: int):
    """[B, n·T, K, (G,) Dh] → [n, B·K, (G·)T, Dh]: a block's heads in the batch dim and the G query
    heads that share a KV head stacked as rows (head-major), so every product in the loops is one
    plain batched matrix product with no transpose around it."""
    B, K, Dh = x.shape[0], x.shape[2], x.shape[-1]
    x = x.reshape(B, n, T, K, -1, Dh)  # G = 1 for keys and values
    return jnp.transpose(x, (1, 0, 3, 4, 2, 5)).reshape(n, B * K, -1, Dh)


def _rows_major(x, B: int, K: int, G: int):
    """[n, B·K, G·T, Dh] → [B, n·T, K, G, Dh], the inverse of _heads_major for queries."""
    n, _, GT, Dh = x.shape
    x = x.reshape(n, B, K, G, GT // G, Dh)
    return jnp.transpose(x, (1, 0, 4, 2, 3, 5)).reshape(B, n * (GT // G), K, G, Dh)


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


# --- the kernel: [n, B·K, rows, Dh] blocks (flash_attention) --------------------------------
F32 = jnp.float32
SKIP, MASKED, FULL = 0, 1, 2


def _block_kinds(posb, segb, chunk: int | None):
    """kind(i, j) of each (query block, key block) pair from per-block summaries, O(n) memory:
    FULL when every key is visible to every query in every batch row (j < i, both blocks inside
    one document and, for chunked layers, one chunk: the mask is all true and is not built),
    SKIP when none is (the two blocks are each inside one document or chunk, different ones),
    MASKED otherwise (the diagonal block, blocks that straddle a document or chunk boundary,
    padding). Returns a function of (i, j) → int32."""
    keys = [segb] + ([posb // chunk] if chunk is not None else [])
    lo = [x.min(-1) for x in keys]  # [n, B] each
    hi = [x.max(-1) for x in keys]

    def kind(i, j):
        uniform = jnp.all(jnp.stack([(a[i] == b[i]) & (a[j] == b[j]) for a, b in zip(lo, hi)]), 0)  # [B]
        same = jnp.all(jnp.stack([a[i] == a[j] for a in lo]), 0)
        full = jnp.all(uniform & same) & (j < i)
        empty = jnp.all(uniform & ~same)
        return jnp.where(full, FULL, jnp.where(empty, SKIP, MASKED))

    return kind


def _block_mask(i, j, posb, segb, T: int, chunk: int | None, transposed: bool = False):
    """The [B, Tq, Tk] mask of a block pair ([B, Tk, Tq] if transposed): key row ≤ query row,
    same segment, same chunk (if chunked)."""
    rows = lambda b: b * T + jnp.arange(T)
    if transposed:  # built as [B, Tk, Tq] directly rather than transposing a [B, Tq, Tk] mask
        m = (rows(j)[:, None] <= rows(i)[None, :]) & (segb[j][..., :, None] == segb[i][..., None, :])
        if chunk is not None:
            m &= (posb[j][..., :, None] // chunk) == (posb[i][..., None, :] // chunk)
        return m
    return _mask(rows(i), rows(j), posb[i], posb[j], segb[i], segb[j], chunk)


def _rows_mask(mask, K: int, G: int):
    """[B, Tq, Tk] → [B·K, G·Tq, Tk], broadcast over the heads as the score blocks are laid out."""
    B, Tq, Tk = mask.shape
    return jnp.broadcast_to(mask[:, None, None], (B, K, G, Tq, Tk)).reshape(B * K, G * Tq, Tk)


def _cols_mask(mask_t, K: int, G: int):
    """[B, Tk, Tq] → [B·K, Tk, G·Tq] for the transposed score blocks of the key-major backward."""
    B, Tk, Tq = mask_t.shape
    return jnp.broadcast_to(mask_t[:, None, :, None], (B, K, Tk, G, Tq)).reshape(B * K, Tk, G * Tq)


def _branches(body, kind):
    """lax.switch over the three block kinds: SKIP leaves the carry, MASKED and FULL run `body`
    with and without the mask."""
    return lambda carry: jax.lax.switch(kind, [lambda c: c, partial(body, True), partial(body, False)], carry)


def _dims(qh, posb):
    n, BK, GT, Dh = qh.shape
    B = posb.shape[1]
    T = posb.shape[2]
    return n, B, BK // B, GT // T, T, Dh


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(qh, kh, vh, posb, segb, scale, chunk):
    return _flash_fwd(qh, kh, vh, posb, segb, scale, chunk)[0]


def _flash_fwd(qh, kh, vh, posb, segb, scale, chunk):
    """Query-block-major online softmax → (o [n, B·K, G·T, Dh], residuals incl. lse [n, B·K, G·T])."""
    n, B, K, G, T, Dh = _dims(qh, posb)
    kind = _block_kinds(posb, segb, chunk)

    def query_block(i):
        q_i = qh[i]

        def body(j, carry):
            def step(masked, carry):
                m, l, acc = carry
                s = jnp.einsum("xqd,xkd->xqk", q_i, kh[j], preferred_element_type=F32) * scale
                if masked:
                    mask = _rows_mask(_block_mask(i, j, posb, segb, T, chunk), K, G)
                    s = jnp.where(mask, s, NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None])
                if masked:  # masked entries are 0 even while a row has seen nothing (m_new = NEG_INF)
                    p = jnp.where(mask, p, 0.0)
                corr = jnp.exp(m - m_new)
                acc = acc * corr[..., None] + jnp.einsum("xqk,xkd->xqd", p.astype(vh.dtype), vh[j],
                                                         preferred_element_type=F32)
                return m_new, l * corr + jnp.sum(p, axis=-1), acc

            return _branches(step, kind(i, j))(carry)

        BK, GT = qh.shape[1:3]
        init = (jnp.full((BK, GT), NEG_INF, F32), jnp.zeros((BK, GT), F32), jnp.zeros((BK, GT, Dh), F32))
        m, l, acc = jax.lax.fori_loop(_first_block(i, T, chunk), i + 1, body, init)
        l = jnp.where(l > 0, l, 1.0)  # a row that sees nothing (padding) gets 0, not NaN
        return (acc / l[..., None]).astype(qh.dtype), m + jnp.log(l)

    o, lse = jax.lax.map(query_block, jnp.arange(n))
    return o, (qh, kh, vh, posb, segb, o, lse)


def _flash_bwd(scale, chunk, res, do):
    """Two sweeps over the visited pairs, each accumulating into its own block only (no O(L)
    carry is updated per pair): key-block-major for dK, dV on transposed score blocks
    [keys, queries] (so dV = Pᵀ dO and dK = dSᵀ Q are plain products, no transposed operand), then
    query-block-major for dQ = dS K. P is recomputed in both: two extra block products, cheaper on
    CPU than products contracting over the rows of a score block."""
    qh, kh, vh, posb, segb, o, lse = res
    n, B, K, G, T, Dh = _dims(qh, posb)
    do = do.astype(F32)
    delta = jnp.sum(do * o.astype(F32), axis=-1)  # rowsum(dO ⊙ O): [n, B·K, G·T]
    kind = _block_kinds(posb, segb, chunk)

    def key_block(j):
        k_j, v_j = kh[j], vh[j].astype(F32)
        last = n - 1 if chunk is None else jnp.minimum((j * T + T - 1 + chunk - 1) // T, n - 1)

        def body(i, carry):
            def step(masked, carry):
                dk, dv = carry
                q_i = qh[i]
                st = jnp.einsum("xkd,xqd->xkq", k_j, q_i, preferred_element_type=F32) * scale
                pt = jnp.exp(st - lse[i][:, None, :])
                if masked:
                    pt = jnp.where(_cols_mask(_block_mask(i, j, posb, segb, T, chunk, transposed=True), K, G), pt, 0.0)
                dv = dv + jnp.einsum("xkq,xqd->xkd", pt, do[i])
                dpt = jnp.einsum("xkd,xqd->xkq", v_j, do[i])
                dst = pt * (dpt - delta[i][:, None, :])
                return dk + jnp.einsum("xkq,xqd->xkd", dst, q_i.astype(F32)), dv

            return _branches(step, kind(i, j))(carry)

        zeros = jnp.zeros(kh.shape[1:], F32)
        dk, dv = jax.lax.fori_loop(j, last + 1, body, (zeros, zeros))
        return dk * scale, dv

    def query_block(i):
        q_i, do_i = qh[i], do[i]

        def body(j, dq):
            def step(masked, dq):
                k_j = kh[j]
                s = jnp.einsum("xqd,xkd->xqk", q_i, k_j, preferred_element_type=F32) * scale
                p = jnp.exp(s - lse[i][..., None])
                if masked:
                    p = jnp.where(_rows_mask(_block_mask(i, j, posb, segb, T, chunk), K, G), p, 0.0)
                dp = jnp.einsum("xqd,xkd->xqk", do_i, vh[j].astype(F32))
                ds = p * (dp - delta[i][..., None])
                return dq + jnp.einsum("xqk,xkd->xqd", ds, k_j.astype(F32))

            return _branches(step, kind(i, j))(dq)

        dq = jax.lax.fori_loop(_first_block(i, T, chunk), i + 1, body, jnp.zeros(qh.shape[1:], F32))
        return dq * scale

    dk, dv = jax.lax.map(key_block, jnp.arange(n))
    dq = jax.lax.map(query_block, jnp.arange(n))
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
