"""Mixture of Experts: router, dispatch paths, shared expert, load-balancing metrics.

Routers (router math always in float32):
  - `sigmoid` (Llama 4): top-k on logits (+ selection bias), score = sigmoid(logit), the score
    multiplies the expert INPUT, no renormalisation.
  - `softmax` (Mixtral / DeepSeek style): top-k of softmax probabilities, renormalised, the weight
    multiplies the expert OUTPUT.
Dispatch paths (`MoEConfig.dispatch`):
  - `dense`: every expert on every token, masked by the router — the test oracle, never fast.
  - `dropless`: sort token copies by expert, grouped matmuls over contiguous groups.
  - `capacity`: fixed per-expert capacity; overflow copies are dropped (residual/shared only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import MoEConfig
from .layers import DotFn, SwiGLU, default_dot, param


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias: selection only, never gradient; updated by the train step."""


def route(logits_TxE: jax.Array, bias_E: jax.Array, cfg: MoEConfig):
    """→ (expert ids [T,k] int32, combine weights [T,k] f32). Bias affects selection only."""
    _, idx_Txk = jax.lax.top_k(logits_TxE + bias_E, cfg.top_k)
    chosen_Txk = jnp.take_along_axis(logits_TxE, idx_Txk, axis=-1)
    if cfg.router == "sigmoid":
        w_Txk = jax.nn.sigmoid(chosen_Txk)
    else:
        probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
        w_Txk = jnp.take_along_axis(probs_TxE, idx_Txk, axis=-1)
        w_Txk = w_Txk / jnp.sum(w_Txk, axis=-1, keepdims=True)
    return idx_Txk.astype(jnp.int32), w_Txk


def router_metrics(logits_TxE, idx_Txk, cfg: MoEConfig, seq_len: int, dropped_frac):
    """Load statistics and the auxiliary losses (raw, without coefficients)."""
    T, E = logits_TxE.shape
    counts_E = jnp.zeros((E,), jnp.float32).at[idx_Txk.reshape(-1)].add(1.0)
    load_E = counts_E / (T * cfg.top_k)
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    if cfg.aux_loss_level == "sequence":  # Switch loss per sequence, averaged over sequences
        S = T // seq_len
        onehot = jax.nn.one_hot(idx_Txk, E, dtype=jnp.float32).sum(1).reshape(S, seq_len, E)
        f_SxE = onehot.mean(1) / cfg.top_k
        aux = E * jnp.mean(jnp.sum(f_SxE * probs_TxE.reshape(S, seq_len, E).mean(1), -1))
    else:
        aux = E * jnp.sum(load_E * probs_TxE.mean(0))
    z = jnp.mean(jax.nn.logsumexp(logits_TxE, axis=-1) ** 2)
    entropy = -jnp.mean(jnp.sum(probs_TxE * jnp.log(probs_TxE + 1e-9), axis=-1))
    return {
        "load": load_E,
        "max_violation": jnp.max(load_E) * E - 1.0,
        "entropy": entropy,
        "aux_loss": aux,
        "z_loss": z,
        "dropped_frac": jnp.asarray(dropped_frac, jnp.float32),
    }


class Experts(nnx.Module):
    """E SwiGLU experts stored stacked: gate/up [E, D, F], down [E, F, D]."""

    def __init__(self, cfg: MoEConfig, dim: int, *, param_dtype, std: float, rngs: nnx.Rngs):
        E, F = cfg.num_experts, cfg.expert_ff
        self.gate = param(rngs, (E, dim, F), ("expert", "embed", "expert_mlp"), param_dtype, std=std)
        self.up = param(rngs, (E, dim, F), ("expert", "embed", "expert_mlp"), param_dtype, std=std)
        self.down = param(rngs, (E, F, dim), ("expert", "expert_mlp", "embed"), param_dtype, std=std)


# --- grouped matmul ---------------------------------------------------------------------
def grouped_matmul(x_NxD: jax.Array, w_ExDxF: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """Rows of x sorted by expert, group e is the next sizes_E[e] rows: y = x_g @ w[e]."""
    return jax.lax.ragged_dot(x_NxD, w_ExDxF.astype(x_NxD.dtype), sizes_E)


def _swiglu_grouped(ex: Experts, x_NxD, sizes_E):
    g = grouped_matmul(x_NxD, ex.gate[...], sizes_E)
    u = grouped_matmul(x_NxD, ex.up[...], sizes_E)
    return grouped_matmul(jax.nn.silu(g) * u, ex.down[...], sizes_E)


# --- dispatch paths ------------------------------------------------------------------------
def dense_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig):
    """Oracle: every expert on every token; unselected experts get weight 0."""
    E = cfg.num_experts
    w_TxE = jnp.zeros((x_TxD.shape[0], E), jnp.float32).at[
        jnp.arange(x_TxD.shape[0])[:, None], idx_Txk].add(w_Txk)
    dt = x_TxD.dtype
    if cfg.router == "sigmoid":
        x_ExTxD = (w_TxE.T[:, :, None] * x_TxD.astype(jnp.float32)[None]).astype(dt)
    else:
        x_ExTxD = jnp.broadcast_to(x_TxD[None], (E, *x_TxD.shape))
    g = jnp.einsum("etd,edf->etf", x_ExTxD, ex.gate[...].astype(dt))
    u = jnp.einsum("etd,edf->etf", x_ExTxD, ex.up[...].astype(dt))
    y_ExTxD = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * u, ex.down[...].astype(dt))
    if cfg.router == "sigmoid":
        return jnp.sum(y_ExTxD.astype(jnp.float32), 0).astype(dt), 0.0
    return jnp.einsum("te,etd->td", w_TxE, y_ExTxD.astype(jnp.float32)).astype(dt), 0.0


def _sorted_copies(idx_Txk, E):
    flat_N = idx_Txk.reshape(-1)
    order_N = jnp.argsort(flat_N, stable=True)
    sizes_E = jnp.bincount(flat_N, length=E).astype(jnp.int32)
    return order_N, sizes_E


def dropless_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig):
    T, D = x_TxD.shape
    k, dt = cfg.top_k, x_TxD.dtype
    order_N, sizes_E = _sorted_copies(idx_Txk, cfg.num_experts)
    tok_N = order_N // k
    w_N = w_Txk.reshape(-1)[order_N]
    xs_NxD = x_TxD[tok_N]
    if cfg.router == "sigmoid":
        xs_NxD = (xs_NxD.astype(jnp.float32) * w_N[:, None]).astype(dt)
    ys_NxD = _swiglu_grouped(ex, xs_NxD, sizes_E).astype(jnp.float32)
    if cfg.router != "sigmoid":
        ys_NxD = ys_NxD * w_N[:, None]
    y_TxD = jnp.zeros((T, D), jnp.float32).at[tok_N].add(ys_NxD)
    return y_TxD.astype(dt), 0.0


def capacity_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig):
    """Per-expert buffers of static capacity; copies past capacity are dropped (earlier tokens win)."""
    T, D = x_TxD.shape
    E, k, dt = cfg.num_experts, cfg.top_k, x_TxD.dtype
    cap = max(1, int(-(-cfg.capacity_factor * T * k // E)))
    flat_N = idx_Txk.reshape(-1)  # copy n = t·k + j: token-major, so earlier tokens win
    onehot_NxE = jax.nn.one_hot(flat_N, E, dtype=jnp.int32)
    slot_N = jnp.sum((jnp.cumsum(onehot_NxE, axis=0) - 1) * onehot_NxE, axis=-1)
    keep_N = slot_N < cap
    w_N = w_Txk.reshape(-1)
    xin_NxD = x_TxD[jnp.arange(T * k) // k]
    if cfg.router == "sigmoid":
        xin_NxD = (xin_NxD.astype(jnp.float32) * w_N[:, None]).astype(dt)
    dest = jnp.where(keep_N, flat_N * cap + slot_N, E * cap)  # dropped → scratch row
    buf_ExCxD = jnp.zeros((E * cap + 1, D), dt).at[dest].set(xin_NxD)[:-1].reshape(E, cap, D)
    g = jnp.einsum("ecd,edf->ecf", buf_ExCxD, ex.gate[...].astype(dt))
    u = jnp.einsum("ecd,edf->ecf", buf_ExCxD, ex.up[...].astype(dt))
    out_ExCxD = jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, ex.down[...].astype(dt))
    out_NxD = jnp.concatenate([out_ExCxD.reshape(E * cap, D), jnp.zeros((1, D), dt)])[dest]
    out_NxD = out_NxD.astype(jnp.float32) * keep_N[:, None]
    if cfg.router != "sigmoid":
        out_NxD = out_NxD * w_N[:, None]
    y_TxD = out_NxD.reshape(T, k, D).sum(1)
    return y_TxD.astype(dt), 1.0 - jnp.mean(keep_N.astype(jnp.float32))


DISPATCH = {"dense": dense_dispatch, "dropless": dropless_dispatch, "capacity": capacity_dispatch}


class MoE(nnx.Module):
    def __init__(self, cfg: MoEConfig, dim: int, *, param_dtype, std: float, rngs: nnx.Rngs,
                 dot: DotFn = default_dot):
        self.cfg = cfg
        self.router = param(rngs, (dim, cfg.num_experts), ("embed", "router"), param_dtype, std=std)
        self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32), logical_axes=("router",))
        self.experts = Experts(cfg, dim, param_dtype=param_dtype, std=std, rngs=rngs)
        self.shared = (SwiGLU(dim, cfg.expert_ff, param_dtype=param_dtype, rngs=rngs, std=std, dot=dot)
                       if cfg.shared_expert else None)

    def __call__(self, x_BxLxD: jax.Array, dispatch: str | None = None):
        B, L, D = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(B * L, D)
        logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), self.router[...].astype(jnp.float32))
        idx_Txk, w_Txk = route(logits_TxE, self.bias[...], self.cfg)
        y_TxD, dropped = DISPATCH[dispatch or self.cfg.dispatch](self.experts, x_TxD, idx_Txk, w_Txk, self.cfg)
        y_BxLxD = y_TxD.reshape(B, L, D)
        if self.shared is not None:
            y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
        return y_BxLxD, router_metrics(logits_TxE, idx_Txk, self.cfg, L, dropped)
