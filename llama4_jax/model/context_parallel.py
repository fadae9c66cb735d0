"""Context parallelism: attention when the sequence dimension is split over a `context` mesh axis.

Layout (zig-zag, for the causal load balance). With n devices on the axis, the row is cut into
2n equal pieces of c = L/(2n) rows and device r holds pieces r and 2n−1−r, in that order. A
device near the start of the row then holds one piece with few visible keys and one with many,
so every device does the same work under the causal mask. The permutation is done once, at the
data boundary (`parallel.global_batch` lays each [B, L] field out in this order; positions and
segment ids are computed from the natural order before it): every layer other than attention
works token by token and does not care, and the loss is a sum over tokens. Attention knows each
local row's original index from the layout (`local_rows`), so causality, segment ids (packed
documents), positions, the chunk mask, QK-norm and temperature tuning (applied to q and k
before this module, from the positions) are exactly the single-device ones.

Global (NoPE) layers, inside a `jax.shard_map` over the context axis only (every other mesh
axis stays automatic, so data / fsdp / expert / tensor shard the batch and the heads as usual):
  - "ring": K/V blocks travel round the ring with `lax.ppermute`, n steps; each step merges
    one key set into the running (output, log-sum-exp) of the local queries — the online
    softmax of flash.py, one level up. The backward pass (custom VJP) goes round once more with
    the K/V blocks and their dK/dV accumulators, which after n hops are back at their owner, and
    recomputes probabilities from the saved global log-sum-exp (FlashAttention-2's backward,
    split by key set). Memory per device: O(L/n) for Q, K, V and the saved output.
  - "all_gather": K/V (and their row metadata) of the whole row are gathered on every device
    and the local queries attend to them at once (backward: autodiff of the gather is a
    reduce-scatter). Memory per device: O(L) for K/V.
  - "auto": all_gather when the gathered K and V are no bigger than the local queries
    (2·n·kv_heads ≤ heads: few devices and wide GQA groups), ring otherwise. Both move the same
    K/V bytes; the gather holds them all at once, the ring overlaps each hop with a block of work.
Chunked (RoPE) layers: a query sees keys at most C−1 rows back, so each of a device's two pieces
needs only the last C−1 rows of the piece before it: piece r's predecessor r−1 is the first
piece of device r−1 (one hop forward), piece 2n−1−r's predecessor 2n−2−r is the second piece of
device r+1 (one hop back) — except on device n−1, whose own first piece (n−1) precedes its
second (n). Nothing else moves; the whole row is never gathered. If C−1 > c (a chunk longer
than a piece), the chunked layer falls back to the all-gather path.

Inside a device every key set is attended with `attend_blocks`: the blocked online softmax of
flash.py over explicit row indices, which skips (`lax.cond`) every [T, T] block whose mask is
empty — so the zig-zag halves that a hop's keys cannot reach, and blocks outside a chunk, cost
only their mask.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..parallel.rules import current_rules, rule_axes, zigzag_order  # noqa: F401 (re-exported)
from .flash import NEG_INF, _blocks, _pad, _scores, block_grads

MODES = ("auto", "ring", "all_gather")


# --- the layout (parallel.rules.zigzag_order is the permutation) ----------------------------
def local_rows(r, n: int, c: int):
    """Original row indices of device r's 2c rows (traceable in r)."""
    a = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([r * c + a, (2 * n - 1 - r) * c + a])


def context_axes(mesh=None, rules=None) -> tuple[str, ...]:
    """The mesh axes the `length` logical axis is split over (size > 1), or () when the
    sequence is not split (no mesh, or inside a shard_map that made them manual)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return ()
    rules = current_rules() if rules is None else rules
    batch = set(rule_axes(rules, "batch"))  # an axis the batch takes is not free for the length
    axes = tuple(a for a in rule_axes(rules, "length")
                 if a in mesh.axis_names and mesh.shape[a] > 1 and a not in batch)
    return () if set(axes) & set(mesh.manual_axes) else axes


def choose_mode(mode: str, n: int, num_heads: int, num_kv_heads: int) -> str:
    """The documented rule: all_gather when the gathered K+V (2·n·kv_heads rows' worth per
    local row) are no bigger than the local queries (heads), ring otherwise."""
    if mode != "auto":
        return mode
    return "all_gather" if 2 * n * num_kv_heads <= num_heads else "ring"


# --- one key set: blocked online softmax over explicit row metadata -------------------------
def _visible(qm, km, chunk):
    """qm, km = (row index, position, segment) blocks [B, T]: the mask [B, Tq, Tk]."""
    (qi, qp, qs), (ki, kp, ks) = qm, km
    m = (ki[:, None, :] <= qi[:, :, None]) & (qs[:, :, None] == ks[:, None, :])
    if chunk is not None:
        m &= (qp[:, :, None] // chunk) == (kp[:, None, :] // chunk)
    return m




def _fwd_core(qb, kb, vb, qm, km, scale, chunk):
    """Blocks [n, B, T, ...] → (o [nq, B, Tq, K, G, Dh] f32, lse [nq, B, K, G, Tq]); a row that
    sees nothing gets o = 0, lse = NEG_INF."""
    nk = kb.shape[0]
    B, Tq, K, G, Dh = qb.shape[1:]

    def one_query_block(i):
        q_i, qm_i = qb[i], tuple(x[i] for x in qm)

        def body(j, carry):
            mask = _visible(qm_i, tuple(x[j] for x in km), chunk)[:, None, None]  # [B,1,1,Tq,Tk]

            def update(carry):
                m, l, acc = carry
                s = jnp.where(mask, _scores(q_i, kb[j], scale), NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                acc = acc * corr[..., None] + jnp.einsum("bkgqm,bmkd->bkgqd", p.astype(vb.dtype), vb[j],
                                                         preferred_element_type=jnp.float32)
                return m_new, l * corr + jnp.sum(p, axis=-1), acc

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

        init = (jnp.full((B, K, G, Tq), NEG_INF, jnp.float32), jnp.zeros((B, K, G, Tq), jnp.float32),
                jnp.zeros((B, K, G, Tq, Dh), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, nk, body, init)
        seen = l > 0
        l = jnp.where(seen, l, 1.0)
        return jnp.einsum("bkgqd->bqkgd", acc / l[..., None]), jnp.where(seen, m + jnp.log(l), NEG_INF)

    return jax.lax.map(one_query_block, jnp.arange(qb.shape[0]))


def _bwd_core(qb, kb, vb, qm, km, scale, chunk, do, lse, delta):
    """Gradients of one key set's share, given the row's final lse and delta = rowsum(dO ⊙ O)
    (minus the lse cotangent): p = exp(s − lse), dS = p ⊙ (dP − delta) → dq, dk, dv in f32."""
    nq = qb.shape[0]

    def key_block(dq, j):
        km_j = tuple(x[j] for x in km)

        def body(i, carry):
            mask = _visible(tuple(x[i] for x in qm), km_j, chunk)[:, None, None]

            def update(carry):
                dq, dk, dv = carry
                gq, gk, gv = block_grads(qb[i], kb[j], vb[j], do[i], lse[i], delta[i], mask, scale)
                return dq.at[i].add(gq), dk + gk, dv + gv

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry)

        zeros = jnp.zeros(kb.shape[1:], jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, nq, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(kb.shape[0]))
    return dq, dk, dv


def _rowsum(do, o):
    return jnp.einsum("nbqkgd,nbqkgd->nbkgq", do, o)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _partial(qb, kb, vb, qm, km, scale, chunk):
    return _fwd_core(qb, kb, vb, qm, km, scale, chunk)


def _partial_fwd(qb, kb, vb, qm, km, scale, chunk):
    o, lse = _fwd_core(qb, kb, vb, qm, km, scale, chunk)
    return (o, lse), (qb, kb, vb, qm, km, o, lse)


def _partial_bwd(scale, chunk, res, cot):
    qb, kb, vb, qm, km, o, lse = res
    do, dlse = cot
    do = do.astype(jnp.float32)
    # d lse / d s = p, so an lse cotangent enters as delta − dlse.
    delta = _rowsum(do, o) - dlse.astype(jnp.float32)
    dq, dk, dv = _bwd_core(qb, kb, vb, qm, km, scale, chunk, do, lse, delta)
    none = jax.tree.map(lambda _: None, (qm, km))
    return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), *none)


_partial.defvjp(_partial_fwd, _partial_bwd)


def _block_rows(x, T, fill=0):
    n = -(-x.shape[1] // T)
    return _blocks(_pad(x, n * T, fill), T)


def _block_meta(idx, pos, seg, T, seg_fill):
    return (_block_rows(idx, T), _block_rows(pos, T), _block_rows(seg, T, seg_fill))


def _unblock(x, L):
    """[n, B, T, ...] → [B, L, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :L]


def _tile(L, block):
    return min(block, -(-L // 8) * 8)


def attend_blocks(q, k, v, q_meta, k_meta, scale, chunk, block: int = 512):
    """Local queries q [B, Lq, K, G, Dh] against a key set k, v [B, Lk, K, Dh] whose rows are
    described by (row index, position, segment) [B, L] each → (o [B, Lq, K, G, Dh] f32,
    lse [B, K, G, Lq]). Exact masked softmax over that key set; differentiable in q, k, v
    (and through lse)."""
    Lq = q.shape[1]
    Tq, Tk = _tile(Lq, block), _tile(k.shape[1], block)
    qm = _block_meta(*q_meta, Tq, -1)  # padding queries and padding keys never match
    km = _block_meta(*k_meta, Tk, -2)
    o, lse = _partial(_block_rows(q, Tq), _block_rows(k, Tk), _block_rows(v, Tk), qm, km, scale, chunk)
    lse = jnp.moveaxis(lse, 0, -2)  # [B, K, G, nq, Tq]
    return _unblock(o, Lq), lse.reshape(*lse.shape[:3], -1)[..., :Lq]


# --- the ring --------------------------------------------------------------------------------
def _merge(o1, lse1, o2, lse2):
    """Two (output, lse) of disjoint key sets → those of their union (blocked layouts)."""
    lse = jnp.logaddexp(lse1, lse2)
    w = lambda a: jnp.moveaxis(jnp.exp(a - lse), -1, 2)[..., None]  # [n,B,K,G,T] → [n,B,T,K,G,1]
    return o1 * w(lse1) + o2 * w(lse2), lse


def _shift(n):
    return [(j, (j + 1) % n) for j in range(n)]


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(qb, kb, vb, qm, km, axis, n, scale, chunk):
    return _ring_fwd(qb, kb, vb, qm, km, axis, n, scale, chunk)[0]


def _ring_fwd(qb, kb, vb, qm, km, axis, n, scale, chunk):
    def hop(carry, _):
        o, lse, kv = carry
        kb_t, vb_t, km_t = kv
        o_t, lse_t = _fwd_core(qb, kb_t, vb_t, qm, km_t, scale, chunk)
        o, lse = _merge(o, lse, o_t, lse_t)
        return (o, lse, jax.lax.ppermute(kv, axis, _shift(n))), None

    nq, B, T, K, G, Dh = qb.shape
    init = (jnp.zeros(qb.shape, jnp.float32), jnp.full((nq, B, K, G, T), NEG_INF, jnp.float32), (kb, vb, km))
    (o, lse, _), _ = jax.lax.scan(hop, init, None, length=n)
    return o, (qb, kb, vb, qm, km, o, lse)


def _ring_bwd(axis, n, scale, chunk, res, do):
    qb, kb, vb, qm, km, o, lse = res
    do = do.astype(jnp.float32)
    delta = _rowsum(do, o)

    def hop(carry, _):
        dq, kv, dkv = carry
        kb_t, vb_t, km_t = kv
        dq_t, dk_t, dv_t = _bwd_core(qb, kb_t, vb_t, qm, km_t, scale, chunk, do, lse, delta)
        dkv = (dkv[0] + dk_t, dkv[1] + dv_t)
        # dK/dV travel with their K/V: after n hops both are back at the owner.
        kv, dkv = jax.lax.ppermute((kv, dkv), axis, _shift(n))
        return (dq + dq_t, kv, dkv), None

    zeros = jnp.zeros(kb.shape, jnp.float32)
    init = (jnp.zeros(qb.shape, jnp.float32), (kb, vb, km), (zeros, zeros))
    (dq, _, (dk, dv)), _ = jax.lax.scan(hop, init, None, length=n)
    none = jax.tree.map(lambda _: None, (qm, km))
    return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), *none)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, meta, scale, chunk, axis, n: int, block: int = 512):
    """Inside a shard_map over `axis` (n devices): the local queries against every device's
    keys, K/V passed round the ring → o [B, Lq, K, G, Dh] f32."""
    Lq = q.shape[1]
    T = _tile(Lq, block)
    qm, km = _block_meta(*meta, T, -1), _block_meta(*meta, T, -2)
    o = _ring(_block_rows(q, T), _block_rows(k, T), _block_rows(v, T), qm, km, axis, n, scale, chunk)
    return _unblock(o, Lq)


def gather_attention(q, k, v, meta, scale, chunk, axis, block: int = 512):
    """Inside a shard_map over `axis`: K/V and their metadata of the whole row gathered, the local
    queries attend to them at once → o f32."""
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
    o, _ = attend_blocks(q, gather(k), gather(v), meta, tuple(gather(x) for x in meta), scale, chunk, block)
    return o


def chunked_neighbour_attention(q, k, v, meta, scale, chunk, axis, n: int, block: int = 512):
    """Inside a shard_map over `axis`: a chunked layer's local queries, each of the device's two
    pieces against itself and the last C−1 rows of the piece before it (module docstring)."""
    c = q.shape[1] // 2
    w = chunk - 1
    r = jax.lax.axis_index(axis)
    kvm = (k, v, *meta)
    first = tuple(x[:, :c] for x in kvm)
    second = tuple(x[:, c:] for x in kvm)
    fwd = [(j, (j + 1) % n) for j in range(n)]
    back = [(j, (j - 1) % n) for j in range(n)]
    prev_first = jax.lax.ppermute(tuple(x[:, c - w:] for x in first), axis, fwd)
    prev_second = jax.lax.ppermute(tuple(x[:, c - w:] for x in second), axis, back)
    own_first_tail = tuple(x[:, c - w:] for x in first)
    last = r == n - 1
    prev_second = tuple(jnp.where(last, a, b) for a, b in zip(own_first_tail, prev_second))
    # Device 0's first piece has no predecessor (what arrived is the row's middle): hide it.
    pk, pv, pi, pp, ps = prev_first
    prev_first = (pk, pv, pi, pp, jnp.where(r == 0, -2, ps))
    outs = []
    for own, prev, qh in ((first, prev_first, q[:, :c]), (second, prev_second, q[:, c:])):
        keys = tuple(jnp.concatenate([a, b], axis=1) for a, b in zip(prev, own))
        qmeta = own[2:]
        o, _ = attend_blocks(qh, keys[0], keys[1], qmeta, keys[2:], scale, chunk, block)
        outs.append(o)
    return jnp.concatenate(outs, axis=1)


# --- the entry point -------------------------------------------------------------------------
def context_attention(q, k, v, pos, seg, scale, chunk, *, axes: tuple[str, ...], mode: str = "auto",
                      block: int = 512):
    """Attention of q [B, L, K, G, Dh], k, v [B, L, K, Dh] whose L is split (zig-zag) over the
    mesh axes `axes`; everything else as `attention.Attention` computes it. → o [B, L, K, G, Dh]."""
    mesh = jax.sharding.get_abstract_mesh()
    n = math.prod(mesh.shape[a] for a in axes)
    L = q.shape[1]
    if L % (2 * n):
        raise ValueError(f"sequence length {L} is not a multiple of 2 × {n} context shards (zig-zag layout)")
    c = L // (2 * n)
    K, G = q.shape[2], q.shape[3]
    axis = axes[0] if len(axes) == 1 else axes
    if chunk is not None and chunk - 1 <= c:
        kind = "chunked"
    else:
        kind = choose_mode(mode, n, K * G, K)

    def body(q, k, v, pos, seg):
        r = jax.lax.axis_index(axis)
        idx = jnp.broadcast_to(local_rows(r, n, c), pos.shape)
        meta = (idx, pos, seg)
        if kind == "chunked":
            o = chunked_neighbour_attention(q, k, v, meta, scale, chunk, axis, n, block)
        elif kind == "ring":
            o = ring_attention(q, k, v, meta, scale, chunk, axis, n, block)
        else:
            o = gather_attention(q, k, v, meta, scale, chunk, axis, block)
        return o.astype(q.dtype)

    spec = P(None, axes)
    fn = jax.shard_map(body, in_specs=(spec,) * 5, out_specs=spec, axis_names=set(axes), check_vma=False)
    return fn(q, k, v, pos, seg)
