"""Mixture of Experts: router, dispatch paths, shared expert, load balancing and its metrics.

Routers (`MoEConfig.router`; router math always in float32 whatever the compute dtype):
  - `sigmoid` (Llama 4, default): top-k on logits (+ selection bias), score = sigmoid(logit),
    the score multiplies the expert INPUT, no renormalisation.
  - `softmax` (Mixtral / DeepSeek style): top-k of the logits (+ selection bias), weights =
    softmax over the chosen logits (= renormalised top-k probabilities), applied to the expert OUTPUT.
Dispatch paths (`MoEConfig.dispatch`, or `MoE(...)(x, dispatch=...)`):
  - `dense`: every expert on every token, masked by the router — the test oracle, never fast.
  - `dropless` (default): sort the T·k token copies by expert, grouped matmuls (gmm.py) over the
    contiguous groups, nothing dropped. Cost ≈ the active FLOPs whatever E (see gmm.py).
  - `gather` (decoding): the dropless formula with each copy's expert weights gathered, for a
    few tokens; see gather_dispatch.
  - `capacity`: each expert takes at most C = ⌈capacity_factor·T·k/E⌉ copies. Copy n = t·k + j
    (token-major; j = rank of the expert in the token's top-k) has slot #{m < n : expert(m) =
    expert(n)} at its expert and is DROPPED if that slot is ≥ C: earlier tokens win. A dropped
    copy contributes nothing (the residual and the shared expert still carry the token). It runs
    on the dropless machinery with the groups cut to C rows (the dropped copies sorted past every
    group), so it costs what dropless costs; the classic [E, C, D] buffer einsum it replaced
    measured 3.9× a dense MLP at E=64 on CPU, against 1.6-1.7× now.
Expert parallelism: when the ambient mesh (`jax.set_mesh`) has an `expert` axis of size > 1, the
`dropless` path runs expert_parallel.py instead (tokens travel to the experts' devices and back).
`dense` and `capacity` stay global formulas that XLA partitions itself.

Load balancing (each off unless its MoEConfig field is set; the trainer applies coefficients):
  - Switch aux loss: E·Σ_e f_e·P_e, f = fraction of copies sent to e, P = mean router
    probability (softmax for the softmax router; sigmoid scores normalised over experts for the
    sigmoid router, as DeepSeek-V3). 1.0 at perfect balance. Per batch or per sequence.
  - z-loss: mean over tokens of logsumexp(logits)².
  - Aux-loss-free bias (DeepSeek-V3): `RouterBias` is added to the logits for selection only,
    never to a score, receives no gradient, and `update_router_biases` nudges it after each step.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from .config import MoEConfig
from .gmm import grouped_swiglu
from .layers import DotFn, SwiGLU, param

METRIC_KEYS = ("load", "max_violation", "entropy", "aux_loss", "z_loss", "dropped_frac", "ep_overflow_frac")


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias: selection only, never gradient; updated by the train step."""


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


def router_metrics(logits_TxE, idx_Txk, cfg: MoEConfig, seq_len: int, dropped_frac, ep_overflow_frac=0.0):
    """Load statistics and the auxiliary losses (raw, without coefficients), all float32."""
    T, E = logits_TxE.shape
    k = cfg.top_k
    counts_E = jnp.zeros((E,), jnp.float32).at[idx_Txk.reshape(-1)].add(1.0)
    load_E = counts_E / (T * k)
    probs_TxE = router_probs(logits_TxE, cfg)
    if cfg.aux_loss_level == "sequence":  # Switch loss per sequence, averaged over sequences
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
        "max_violation": jnp.max(load_E) * E - 1.0,
        "entropy": entropy,
        "aux_loss": aux,
        "z_loss": z,
        "dropped_frac": f32(dropped_frac),
        "ep_overflow_frac": f32(ep_overflow_frac),
    }


class Experts(nnx.Module):
    """E SwiGLU experts stored stacked: gate/up [E, D, F], down [E, F, D]. With `make_fp8` (the
    precision policy's FP8 grouped matmul maker) each of the three products runs in FP8."""

    def __init__(self, cfg: MoEConfig, dim: int, *, param_dtype, std: float, rngs: nnx.Rngs, make_fp8=None):
        E, F = cfg.num_experts, cfg.expert_ff
        self.gate = param(rngs, (E, dim, F), ("expert", "embed", "expert_mlp"), param_dtype, std=std)
        self.up = param(rngs, (E, dim, F), ("expert", "embed", "expert_mlp"), param_dtype, std=std)
        self.down = param(rngs, (E, F, dim), ("expert", "expert_mlp", "embed"), param_dtype, std=std)
        self.fp8 = nnx.List([make_fp8() for _ in range(3)]) if make_fp8 is not None else None

    def swiglu(self, xs_NxD, sizes_E, impl=None):
        """The experts on expert-sorted rows (group e = the next sizes_E[e] rows)."""
        if self.fp8 is None:
            return grouped_swiglu(xs_NxD, self.gate[...], self.up[...], self.down[...], sizes_E, impl=impl)
        fg, fu, fd = self.fp8
        h = jax.nn.silu(fg(xs_NxD, self.gate[...], sizes_E)) * fu(xs_NxD, self.up[...], sizes_E)
        return fd(h, self.down[...], sizes_E)


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
    inv_N = jnp.zeros((N,), jnp.int32).at[order_N].set(jnp.arange(N, dtype=jnp.int32))
    return order_N, inv_N, sizes_E


def _scale_rows(x_NxD, w_N):
    return (x_NxD.astype(jnp.float32) * w_N[:, None]).astype(x_NxD.dtype)


def _combine(y_copies_NxD, w_Txk, cfg: MoEConfig):
    """Copies back to tokens: sum over k, weighted here for softmax (sigmoid weighted the input)."""
    T, k = w_Txk.shape
    y_TxkxD = y_copies_NxD.reshape(T, k, -1).astype(jnp.float32)
    if cfg.router == "sigmoid":
        return y_TxkxD.sum(1)
    return jnp.einsum("tkd,tk->td", y_TxkxD, w_Txk)


# --- dispatch paths (each → (y_TxD, dropped fraction, ep overflow fraction)) ----------------
def dense_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, impl=None):
    """Oracle: every expert on every token; unselected experts get weight 0 (`impl` unused)."""
    T, E, dt = x_TxD.shape[0], cfg.num_experts, x_TxD.dtype
    w_TxE = jnp.zeros((T, E), jnp.float32).at[jnp.arange(T)[:, None], idx_Txk].add(w_Txk)
    if cfg.router == "sigmoid":
        x_ExTxD = (w_TxE.T[:, :, None] * x_TxD.astype(jnp.float32)[None]).astype(dt)
    else:
        x_ExTxD = jnp.broadcast_to(x_TxD[None], (E, *x_TxD.shape))
    g = jnp.einsum("etd,edf->etf", x_ExTxD, ex.gate[...].astype(dt))
    u = jnp.einsum("etd,edf->etf", x_ExTxD, ex.up[...].astype(dt))
    y_ExTxD = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * u, ex.down[...].astype(dt)).astype(jnp.float32)
    if cfg.router == "sigmoid":
        return jnp.sum(y_ExTxD, 0).astype(dt), 0.0, 0.0
    return jnp.einsum("te,etd->td", w_TxE, y_ExTxD).astype(dt), 0.0, 0.0


def _grouped_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, cap, impl):
    k = cfg.top_k
    order_N, inv_N, sizes_E = sort_copies(idx_Txk, cfg.num_experts, cap)
    xs_NxD = expand_sorted(x_TxD, order_N, inv_N, k)
    if cfg.router == "sigmoid":
        xs_NxD = _scale_rows(xs_NxD, w_Txk.reshape(-1)[order_N])
    ys_NxD = ex.swiglu(xs_NxD, sizes_E, impl)
    y_TxD = _combine(unsort(ys_NxD, order_N, inv_N), w_Txk, cfg)
    return y_TxD.astype(x_TxD.dtype), 1.0 - jnp.sum(sizes_E) / idx_Txk.size, 0.0


def dropless_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, impl=None):
    return _grouped_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg, None, impl)


def capacity(cfg: MoEConfig, num_tokens: int) -> int:
    """C = ⌈capacity_factor · T · k / E⌉ copies per expert."""
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


def capacity_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, impl=None):
    """The dropless machinery with each group cut to its first C copies (which: module docstring)."""
    return _grouped_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg, capacity(cfg, x_TxD.shape[0]), impl)


def gather_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, impl=None):
    """The dropless formula for a handful of tokens (decoding: T = batch): each copy n = t·k + j
    against its own expert's weights, gathered, as batched matrix-vector products. No sort and no
    expert loop, so it compiles in a fraction of the tiled path's time and runs T·k weight slices
    instead of walking all E experts; it copies those slices, so it is no path for long inputs."""
    if ex.fp8 is not None:  # the FP8 grouped dots exist only for the grouped layout
        return dropless_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg, impl)
    dt, e_N = x_TxD.dtype, idx_Txk.reshape(-1)
    xs_NxD = jnp.repeat(x_TxD, cfg.top_k, axis=0)
    if cfg.router == "sigmoid":
        xs_NxD = _scale_rows(xs_NxD, w_Txk.reshape(-1))
    take = lambda w: jnp.take(w[...], e_N, axis=0).astype(dt)
    g = jnp.einsum("nd,ndf->nf", xs_NxD, take(ex.gate), preferred_element_type=jnp.float32)
    u = jnp.einsum("nd,ndf->nf", xs_NxD, take(ex.up), preferred_element_type=jnp.float32)
    ys_NxD = jnp.einsum("nf,nfd->nd", (jax.nn.silu(g) * u).astype(dt), take(ex.down), preferred_element_type=jnp.float32)
    return _combine(ys_NxD.astype(dt), w_Txk, cfg).astype(dt), 0.0, 0.0


DISPATCH = {"dense": dense_dispatch, "dropless": dropless_dispatch, "capacity": capacity_dispatch,
            "gather": gather_dispatch}


def expert_axis_size() -> int:
    """Size of the ambient mesh's `expert` axis (1 without a mesh or inside a shard_map body)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names or "expert" in mesh.manual_axes:
        return 1
    return mesh.shape["expert"]


class MoE(nnx.Module):
    """Router + E experts (+ shared expert). __call__(x_BxLxD, dispatch=None) → (y_BxLxD, metrics)
    with the METRIC_KEYS float32 metrics (`load` [E], the rest scalars)."""

    def __init__(self, cfg: MoEConfig, dim: int, *, param_dtype, std: float, rngs: nnx.Rngs,
                 dot: DotFn | None = None, make_dot=None, make_fp8_experts=None, gmm_impl: str | None = None):
        self.cfg = cfg
        self.gmm_impl = gmm_impl  # None: by backend (gmm.default_impl); "tiles" or "ragged" to force
        self.router = param(rngs, (dim, cfg.num_experts), ("embed", "router"), param_dtype, std=std)
        self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32), logical_axes=("router",))
        self.experts = Experts(cfg, dim, param_dtype=param_dtype, std=std, rngs=rngs, make_fp8=make_fp8_experts)
        shared_dots = {"dot": dot} if dot is not None else ({"make_dot": make_dot} if make_dot is not None else {})
        self.shared = (SwiGLU(dim, cfg.expert_ff, param_dtype=param_dtype, rngs=rngs, std=std, **shared_dots)
                       if cfg.shared_expert else None)

    def __call__(self, x_BxLxD: jax.Array, dispatch: str | None = None):
        B, L, D = x_BxLxD.shape
        cfg = self.cfg
        x_TxD = x_BxLxD.reshape(B * L, D)
        logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), self.router[...].astype(jnp.float32))
        idx_Txk, w_Txk = route(logits_TxE, self.bias[...], cfg)
        dispatch = dispatch or cfg.dispatch
        if dispatch not in DISPATCH:
            raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose one of {sorted(DISPATCH)}")
        if dispatch == "dropless" and expert_axis_size() > 1:
            from .expert_parallel import ep_dispatch  # imported lazily: only meshes with experts need it

            y_TxD, dropped, overflow = ep_dispatch(self.experts, x_TxD, idx_Txk, w_Txk, cfg, self.gmm_impl)
        else:
            y_TxD, dropped, overflow = DISPATCH[dispatch](self.experts, x_TxD, idx_Txk, w_Txk, cfg, self.gmm_impl)
        y_BxLxD = y_TxD.reshape(B, L, D)
        if self.shared is not None:
            y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
        return y_BxLxD, router_metrics(logits_TxE, idx_Txk, cfg, L, dropped, overflow)


# --- training-loop helpers -------------------------------------------------------------------
def moe_loss(metrics: dict, cfg) -> jax.Array:
    """aux_loss_coef·Σ aux + z_loss_coef·Σ z over MoE layers (metrics stacked over layers).
    `cfg` is the MoEConfig (or anything with a `.moe` MoEConfig)."""
    cfg = getattr(cfg, "moe", cfg)
    loss = jnp.zeros((), jnp.float32)
    if not metrics:
        return loss
    if cfg.aux_loss_coef:
        loss = loss + cfg.aux_loss_coef * jnp.sum(metrics["aux_loss"])
    if cfg.z_loss_coef:
        loss = loss + cfg.z_loss_coef * jnp.sum(metrics["z_loss"])
    return loss


def bias_step(load_E: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 update: raise the bias of under-loaded experts, lower over-loaded ones."""
    return rate * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)


def update_router_biases(model, load_LxE: jax.Array, rate: float) -> None:
    """bias += rate·sign(mean(load) − load) for every MoE layer of a `Llama4`, in place.

    `load_LxE` is the model's stacked aux output `metrics["load"]` (MoE layers in layer order).
    Handles both layouts: per-layer blocks, and `scan_layers` where a block's variables carry a
    leading group axis (layer = group·period + j). Traceable: call it inside the jitted step.
    """
    from .store import layer_slot  # store imports the transformer, which imports this module

    cfg = model.cfg
    load_LxE = jax.lax.stop_gradient(load_LxE.astype(jnp.float32))
    if load_LxE.shape[0] != len(cfg.moe_layers):
        raise ValueError(f"load has {load_LxE.shape[0]} rows for {len(cfg.moe_layers)} MoE layers")
    delta_LxE = bias_step(load_LxE, rate)
    for row, layer in enumerate(cfg.moe_layers):
        (_, _, j), g = layer_slot(cfg, layer)
        bias = model.groups.blocks[j].ffn.bias
        if g is None:
            bias[...] = bias[...] + delta_LxE[row]
        else:
            bias[...] = bias[...].at[g].add(delta_LxE[row])
