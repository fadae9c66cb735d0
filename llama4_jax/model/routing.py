"""Routing and the token-copy permutation shared by every MoE dispatch path (single device and
expert parallel): top-k selection and weights, load statistics and balancing-loss terms,
ordering copies by expert and back, weighting a copy, combining copies into tokens."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .config import MoEConfig


# --- router ---------------------------------------------------------------------------------
def route(logits_TxE: jax.Array, bias_E: jax.Array, cfg: MoEConfig):
    """→ (expert ids [T,k] int32, weights [T,k] f32). The bias changes which experts are chosen only."""
    logits_TxE = logits_TxE.astype(jnp.float32)
    _, idx_Txk = jax.lax.top_k(logits_TxE + jax.lax.stop_gradient(bias_E), cfg.top_k)
    chosen_Txk = jnp.take_along_axis(logits_TxE, idx_Txk, axis=-1)
    if cfg.router == "sigmoid":
        w_Txk = jax.nn.sigmoid(chosen_Txk)
    else:
        w_Txk = jax.nn.softmax(chosen_Txk, axis=-1)
    return idx_Txk.astype(jnp.int32), w_Txk


def router_probs(logits_TxE: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The per-token distribution over experts that the aux loss and the entropy measure."""
    if cfg.router == "sigmoid":
        s_TxE = jax.nn.sigmoid(logits_TxE)
        return s_TxE / jnp.sum(s_TxE, axis=-1, keepdims=True)
    return jax.nn.softmax(logits_TxE, axis=-1)


def router_metrics(logits_TxE, idx_Txk, cfg: MoEConfig, seq_len: int, dropped_frac, ep_overflow_frac=0.0,
                   aux_level: str = "batch"):
    """Load statistics and the auxiliary losses (raw, without coefficients), all float32.

    `row_load` [B, E] (B = T / seq_len rows of the batch): the fraction of each row's copies sent
    to each expert, so the train step can split the load by the data source of each row."""
    T, E = logits_TxE.shape
    k = cfg.top_k
    counts_E = jnp.zeros((E,), jnp.float32).at[idx_Txk.reshape(-1)].add(1.0)
    load_E = counts_E / (T * k)
    B = T // seq_len
    row_Txk = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None] // seq_len, idx_Txk.shape)
    row_load_BxE = jnp.zeros((B, E), jnp.float32).at[row_Txk, idx_Txk].add(1.0) / (seq_len * k)
    probs_TxE = router_probs(logits_TxE, cfg)
    if aux_level == "sequence":  # Switch loss per sequence, averaged over sequences
        S = T // seq_len
        hits_SxLxE = jax.nn.one_hot(idx_Txk, E, dtype=jnp.float32).sum(1).reshape(S, seq_len, E)
        f_SxE = hits_SxLxE.mean(1) / k
        aux = E * jnp.mean(jnp.sum(f_SxE * probs_TxE.reshape(S, seq_len, E).mean(1), -1))
    else:
        aux = E * jnp.sum(load_E * probs_TxE.mean(0))
    z = jnp.mean(jax.nn.logsumexp(logits_TxE, axis=-1) ** 2)
    entropy = -jnp.mean(jnp.sum(probs_TxE * jnp.log(probs_TxE + 1e-9), axis=-1))
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return {
        "load": load_E,
        "row_load": row_load_BxE,
        "max_violation": max_violation(load_E),
        "entropy": entropy,
        "aux_loss": aux,
        "z_loss": z,
        "dropped_frac": f32(dropped_frac),
        "ep_overflow_frac": f32(ep_overflow_frac),
    }


def max_violation(load_E: jax.Array) -> jax.Array:
    """How far the busiest expert is over its fair share: max(load)·E − 1 (0 = perfect balance)."""
    return jnp.max(load_E, axis=-1) * load_E.shape[-1] - 1.0


def merge_metrics(metrics_GxX: dict, copies_per_group: int) -> dict:
    """`router_metrics` of G equal-sized token groups (stacked on axis 0; each routed
    `copies_per_group` = T·k copies per layer) → those of all their tokens together. Every
    statistic is a mean over the group's tokens (or copies), so their mean over groups is the
    whole's: entropy, z-loss, dropped and overflow fractions, the sequence-level aux loss (a mean
    over sequences). The load is merged from the groups' integer counts, so it is bit for bit the
    whole's (the bias update takes signs of load − mean: a rounding-level difference at a tie
    would flip it); max_violation is recomputed from it. The batch-level aux loss E·Σ_e f_e·P_e
    is a product of two means, not a mean: merged, it is the mean of the groups' own
    batch-level losses (each group is "a batch")."""
    out = {k: jnp.mean(v, axis=0) for k, v in metrics_GxX.items()}
    if "load" in out:
        G = metrics_GxX["load"].shape[0]
        counts = jnp.round(metrics_GxX["load"] * copies_per_group).sum(0)
        out["load"] = counts / (G * copies_per_group)  # router_metrics: counts_E / (T·k)
        out["max_violation"] = max_violation(out["load"])
    return out


# --- token copies ↔ expert-sorted rows (gathers both ways; XLA:CPU scatters are slow) ----------
@partial(jax.custom_vjp, nondiff_argnums=(3,))
def expand_sorted(x_TxD, order_N, inv_N, k):
    """Row n of the result is token order_N[n] // k (copy order_N[n] = t·k + j, sorted by expert)."""
    return x_TxD[order_N // k]


def _expand_fwd(x_TxD, order_N, inv_N, k):
    return expand_sorted(x_TxD, order_N, inv_N, k), (order_N, inv_N)


def _expand_bwd(k, res, dxs_NxD):
    _, inv_N = res
    T = inv_N.shape[0] // k
    return dxs_NxD[inv_N].reshape(T, k, -1).sum(1), None, None


expand_sorted.defvjp(_expand_fwd, _expand_bwd)


@jax.custom_vjp
def unsort(ys_NxD, order_N, inv_N):
    """Inverse permutation: row n of the result is copy n (token-major) again."""
    return ys_NxD[inv_N]


def _unsort_fwd(ys_NxD, order_N, inv_N):
    return ys_NxD[inv_N], (order_N, inv_N)


def _unsort_bwd(res, dy_NxD):
    order_N, _ = res
    return dy_NxD[order_N], None, None


unsort.defvjp(_unsort_fwd, _unsort_bwd)


def sort_copies(idx_Txk: jax.Array, E: int, cap: int | None = None):
    """Order the copies n = t·k + j by expert, token-major inside an expert (stable sort).

    With a capacity `cap` = C, only each expert's first C copies keep their place; the others move past
    every group (the grouped matmul gives them 0). → (order_N, inv_N, group sizes_E)."""
    flat_N = idx_Txk.reshape(-1)
    N = flat_N.shape[0]
    order_N = jnp.argsort(flat_N, stable=True).astype(jnp.int32)
    sizes_E = jnp.bincount(flat_N, length=E).astype(jnp.int32)
    if cap is not None:
        e_N = flat_N[order_N]
        rank_N = jnp.arange(N, dtype=jnp.int32) - (jnp.cumsum(sizes_E) - sizes_E)[e_N]
        order_N = order_N[jnp.argsort(jnp.where(rank_N < cap, e_N, E), stable=True)]
        sizes_E = jnp.minimum(sizes_E, cap)
    return order_N, inverse_permutation(order_N), sizes_E


def scale_rows(x_NxD, w_N):
    return (x_NxD.astype(jnp.float32) * w_N[:, None]).astype(x_NxD.dtype)


def combine(y_copies_NxD, w_Txk, cfg: MoEConfig):
    """Copies (token-major [T·k, D]) back to tokens: sum over k, weighted here for softmax (the
    sigmoid router weighted the expert input instead)."""
    T, k = w_Txk.shape
    y_TxkxD = y_copies_NxD.reshape(T, k, -1).astype(jnp.float32)
    if cfg.router == "sigmoid":
        return y_TxkxD.sum(1)
    return jnp.einsum("tkd,tk->td", y_TxkxD, w_Txk)


def weight_inputs(x_NxD, w_N, cfg: MoEConfig):
    """The expert input of each copy: scaled by its router weight for the sigmoid router (Llama 4
    scales the INPUT), unchanged for softmax (which weights the output in `combine`)."""
    return scale_rows(x_NxD, w_N) if cfg.router == "sigmoid" else x_NxD


def input_amax(x_TxD, w_Txk, cfg: MoEConfig) -> jax.Array:
    """max |·| over every copy's expert input (`weight_inputs` rows) without forming the T·k
    copies: a row's amax times its largest weight, rounded to x's dtype as `scale_rows` rounds
    (rounding is monotone, so this is exactly the amax of the rows themselves). Copies that a
    capacity drops still count: they are rows of the grouped matmul's input too."""
    a_T = jnp.max(jnp.abs(x_TxD.astype(jnp.float32)), axis=-1)
    if cfg.router == "sigmoid":
        a_T = (a_T * jnp.max(jnp.abs(w_Txk), axis=-1)).astype(x_TxD.dtype).astype(jnp.float32)
    return jnp.max(a_T)


def inverse_permutation(order_N: jax.Array) -> jax.Array:
    """inv with inv[order[n]] = n (a gather-friendly inverse; XLA:CPU scatters are slow only at scale)."""
    N = order_N.shape[0]
    return jnp.zeros((N,), order_N.dtype).at[order_N].set(jnp.arange(N, dtype=order_N.dtype))
