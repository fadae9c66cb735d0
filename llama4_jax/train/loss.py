"""Cross entropy of the lm head: the plain formula, and a row-chunked one with its own VJP.

`token_losses(logits_BxLxV, targets_BxL)` is the plain formula on materialised logits.

`chunked_token_losses(h_NxD, w_DxV, targets_N, chunk_rows)` computes the same numbers from the
final hidden states and the head weight without ever holding the [N, V] float32 logits: rows go
through the head in chunks of C = chunk_rows (a `lax.scan`), each chunk's [C, V] logits are
reduced at once to its logsumexp and gold logit, and only the N logsumexps are kept for the
backward pass. The backward pass recomputes each chunk's logits and forms, chunk by chunk,

    dlogits_CxV = (softmax − onehot(target)) · dloss_C
    dh_CxD = dlogits · wᵀ,    dw_DxV += h_Cᵀ · dlogits   (accumulated in float32)

Cost: the head matmul runs once more (3 head matmuls → 4); memory: a few [C, V] float32 arrays
instead of several [N, V] ones. Values and gradients equal autodiff of the plain formula to
float rounding in float32 (tests/test_loss.py). With a bfloat16 compute dtype the products take
bfloat16 operands with float32 accumulation, as the plain head does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..model.vocab_parallel import row_axes, split_axes
from ..parallel.rules import active_mesh


def token_losses(logits_BxLxV, targets_BxL):
    """Cross entropy per token in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return lse - gold


def _chunks(x, C: int):
    """[N, ...] → [n, C, ...] with n = ⌈N/C⌉, zero-padded at the end (padded rows get dloss 0).

    Chunk i takes rows i, i + n, i + 2n, ... (strided, not contiguous): the rows of a batch
    sharded over devices are contiguous blocks of N, and the strided layout keeps that split on
    the C axis, so every device works on its own rows in every scan step (a contiguous chunk
    would live on one device and leave the others idle)."""
    n = -(-x.shape[0] // C)
    pad = n * C - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return jnp.swapaxes(x.reshape(C, n, *x.shape[1:]), 0, 1)


def _unchunk(x_nxC, N: int):
    """Inverse of `_chunks`, padding dropped."""
    x = jnp.swapaxes(x_nxC, 0, 1)
    return x.reshape(-1, *x.shape[2:])[:N]


def _head(h_CxD, w_DxV):
    """The head matmul as the model's plain head does it: operands in h's dtype, f32 result."""
    return jax.lax.dot_general(h_CxD, w_DxV.astype(h_CxD.dtype), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def chunked_token_losses(h_NxD, w_DxV, targets_N, chunk_rows: int):
    """Per-row cross entropy [N] float32 of logits h·w, C = chunk_rows rows at a time; split
    over the vocabulary (`vocab_parallel_token_losses`) when the ambient mesh shards the head."""
    mesh = active_mesh()
    rows = row_axes(mesh, h_NxD.shape[0], ("batch", "length")) if mesh is not None else None
    plan = split_axes(mesh, w_DxV.shape, ("embed", "vocab"), rows) if rows else None
    if plan is None:
        return _chunked(h_NxD, w_DxV, targets_N, chunk_rows)
    return vocab_parallel_token_losses(h_NxD, w_DxV, targets_N, chunk_rows, mesh, rows, *plan)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(h_NxD, w_DxV, targets_N, chunk_rows: int):
    return _fwd(h_NxD, w_DxV, targets_N, chunk_rows)[0]


def _fwd(h_NxD, w_DxV, targets_N, chunk_rows):
    def chunk(_, xs):
        h_CxD, t_C = xs
        logits_CxV = _head(h_CxD, w_DxV)
        lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
        gold_C = jnp.take_along_axis(logits_CxV, t_C[:, None], axis=-1)[:, 0]
        return None, (lse_C - gold_C, lse_C)

    _, (loss_nxC, lse_nxC) = jax.lax.scan(chunk, None, (_chunks(h_NxD, chunk_rows), _chunks(targets_N, chunk_rows)))
    N = h_NxD.shape[0]
    return _unchunk(loss_nxC, N), (h_NxD, w_DxV, targets_N, lse_nxC)


def _bwd(chunk_rows, res, dloss_N):
    h_NxD, w_DxV, targets_N, lse_nxC = res
    (N, D), V = h_NxD.shape, w_DxV.shape[1]
    dt = h_NxD.dtype

    def chunk(dw_DxV, xs):
        h_CxD, t_C, lse_C, d_C = xs
        p_CxV = jnp.exp(_head(h_CxD, w_DxV) - lse_C[:, None])
        dlogits_CxV = (p_CxV - jax.nn.one_hot(t_C, V, dtype=jnp.float32)) * d_C[:, None]
        dh_CxD = jax.lax.dot_general(dlogits_CxV.astype(dt), w_DxV.astype(dt), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32).astype(dt)
        dw_DxV = dw_DxV + jax.lax.dot_general(h_CxD, dlogits_CxV.astype(dt), (((0,), (0,)), ((), ())),
                                              preferred_element_type=jnp.float32)
        return dw_DxV, dh_CxD

    xs = (_chunks(h_NxD, chunk_rows), _chunks(targets_N, chunk_rows), lse_nxC,
          _chunks(dloss_N.astype(jnp.float32), chunk_rows))
    dw_DxV, dh_nxCxD = jax.lax.scan(chunk, jnp.zeros((D, V), jnp.float32), xs)
    return _unchunk(dh_nxCxD, N), dw_DxV.astype(w_DxV.dtype), None


_chunked.defvjp(_fwd, _bwd)


# --- the vocab-parallel head ----------------------------------------------------------------
# Under FSDP the head [D, V] is sharded along D; the row-chunked loss above would make each
# device gather the whole [D, V] (3.9 GiB at Llama 4's size in float32) and accumulate a whole
# float32 dW. Here the head is split along V instead, over the head's D axes G (which also split
# the rows) and any axes its V dim already uses; each device keeps a [D, V/|G·V|] slice. Per
# chunk of its own rows a device
#   - gathers the chunk's hidden states and targets from the devices of G → [C·|G|, D];
#   - forms logits against its V slice and reduces the log-sum-exp and the gold logit across the
#     V slices (pmax, psum);
#   - keeps the losses of its own rows.
# The backward pass recomputes the chunk's logits, forms its slice of dlogits, accumulates its
# own dW slice locally and reduce-scatters dh back to the rows' owners. Nothing [D, V]-sized
# exists on any device; the moving is C·D per chunk instead of the whole head.


def vocab_parallel_token_losses(h_NxD, w_DxV, targets_N, chunk_rows, mesh, rows, g_axes, v_axes):
    """`chunked_token_losses` with the head split over the vocabulary (see above): rows split
    over the mesh axes `rows`, the head's D axes `g_axes` (⊆ rows), extra V axes `v_axes`."""
    split = (*g_axes, *v_axes)
    n_split = math.prod(mesh.shape[a] for a in split)
    if w_DxV.shape[1] % n_split:
        return _chunked(h_NxD, w_DxV, targets_N, chunk_rows)
    C_l = max(1, -(-chunk_rows // math.prod(mesh.shape[a] for a in rows)))
    return _vp(h_NxD, w_DxV, targets_N, _VP(C_l, mesh, tuple(rows), tuple(g_axes), tuple(v_axes)))


@dataclass(frozen=True)
class _VP:
    C: int  # local rows per chunk
    mesh: object
    rows: tuple
    g: tuple
    v: tuple

    def specs(self):
        return P(self.rows, None), P(None, (*self.g, *self.v)), P(self.rows)

    def shard_map(self, body, in_specs, out_specs):
        return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _vp_chunk_logits(s: _VP, h_CxD, t_C, w_DxVl):
    """A chunk's gathered rows, targets and logits against the local V slice."""
    hg = jax.lax.all_gather(h_CxD, s.g, axis=0, tiled=True)
    tg = jax.lax.all_gather(t_C, s.g, axis=0, tiled=True)
    V_l = w_DxVl.shape[1]
    local = tg - jax.lax.axis_index((*s.g, *s.v)) * V_l
    return hg, local, _head(hg, w_DxVl)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _vp(h_NxD, w_DxV, targets_N, s: _VP):
    return _vp_fwd(h_NxD, w_DxV, targets_N, s)[0]


def _vp_fwd(h_NxD, w_DxV, targets_N, s: _VP):
    split = (*s.g, *s.v)

    def body(h_l, w_l, t_l):
        def chunk(_, xs):
            h_C, t_C = xs
            _, local, logits = _vp_chunk_logits(s, h_C, t_C, w_l)
            m = jax.lax.pmax(jnp.max(logits, axis=-1), split)
            lse = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[:, None]), axis=-1), split))
            inside = (local >= 0) & (local < logits.shape[1])
            gold = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[1] - 1)[:, None], axis=-1)[:, 0]
            gold = jax.lax.psum(jnp.where(inside, gold, 0.0), split)
            mine = jax.lax.axis_index(s.g) * s.C
            own = lambda x: jax.lax.dynamic_slice_in_dim(x, mine, s.C)
            return None, (own(lse - gold), own(lse))

        _, (loss, lse) = jax.lax.scan(chunk, None, (_chunks(h_l, s.C), _chunks(t_l, s.C)))
        return _unchunk(loss, h_l.shape[0]), _unchunk(lse, h_l.shape[0])

    h_spec, w_spec, t_spec = s.specs()
    loss_N, lse_N = s.shard_map(body, (h_spec, w_spec, t_spec), (t_spec, t_spec))(h_NxD, w_DxV, targets_N)
    return loss_N, (h_NxD, w_DxV, targets_N, lse_N)


def _vp_bwd(s: _VP, res, dloss_N):
    h_NxD, w_DxV, targets_N, lse_N = res
    dt, wdt = h_NxD.dtype, w_DxV.dtype
    others = tuple(a for a in s.rows if a not in s.g)

    def body(h_l, w_l, t_l, lse_l, d_l):
        def chunk(dw, xs):
            h_C, t_C, lse_C, d_C = xs
            hg, local, logits = _vp_chunk_logits(s, h_C, t_C, w_l)
            lse_g = jax.lax.all_gather(lse_C, s.g, axis=0, tiled=True)
            d_g = jax.lax.all_gather(d_C, s.g, axis=0, tiled=True)
            onehot = (jnp.arange(logits.shape[1])[None] == local[:, None]).astype(jnp.float32)
            dlogits = (jnp.exp(logits - lse_g[:, None]) - onehot) * d_g[:, None]
            dh = jax.lax.dot_general(dlogits.astype(dt), w_l.astype(dt), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
            if s.v:
                dh = jax.lax.psum(dh, s.v)
            dh = jax.lax.psum_scatter(dh, s.g, scatter_dimension=0, tiled=True).astype(dt)
            dw = dw + jax.lax.dot_general(hg, dlogits.astype(dt), (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            return dw, dh

        xs = (_chunks(h_l, s.C), _chunks(t_l, s.C), _chunks(lse_l, s.C), _chunks(d_l.astype(jnp.float32), s.C))
        dw, dh = jax.lax.scan(chunk, jnp.zeros(w_l.shape, jnp.float32), xs)
        if others:
            dw = jax.lax.psum(dw, others)
        return _unchunk(dh, h_l.shape[0]), dw.astype(wdt)

    h_spec, w_spec, t_spec = s.specs()
    dh, dw = s.shard_map(body, (h_spec, w_spec, t_spec, t_spec, t_spec), (h_spec, w_spec))(
        h_NxD, w_DxV, targets_N, lse_N, dloss_N)
    return dh, dw, None


_vp.defvjp(_vp_fwd, _vp_bwd)
