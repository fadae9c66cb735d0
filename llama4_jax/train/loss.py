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

from functools import partial

import jax
import jax.numpy as jnp


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


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_token_losses(h_NxD, w_DxV, targets_N, chunk_rows: int):
    """Per-row cross entropy [N] float32 of logits h·w, C = chunk_rows rows at a time."""
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


chunked_token_losses.defvjp(_fwd, _bwd)
