"""Mixture of Experts: router, dispatch paths, shared expert, load balancing and its metrics.

Routers (`MoEConfig.router`; router math always in float32 whatever the compute dtype):
  - `sigmoid` (Llama 4, default): top-k on logits (+ selection bias), score = sigmoid(logit),
    the score multiplies the expert INPUT, no renormalisation.
  - `softmax` (Mixtral / DeepSeek style): top-k of the logits (+ selection bias), weights =
    softmax over the chosen logits (= renormalised top-k probabilities), applied to the expert OUTPUT.
Dispatch paths (`MoERuntime.dispatch`, or `MoE(...)(x, dispatch=...)`):
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

Load balancing (the block reports the statistics; the train step applies its coefficients):
  - Switch aux loss: E·Σ_e f_e·P_e, f = fraction of copies sent to e, P = mean router
    probability (softmax for the softmax router; sigmoid scores normalised over experts for the
    sigmoid router, as DeepSeek-V3). 1.0 at perfect balance. Per batch or per sequence.
  - z-loss: mean over tokens of logsumexp(logits)².
  - Aux-loss-free bias (DeepSeek-V3): `RouterBias` is added to the logits for selection only,
    never to a score, receives no gradient, and `MoE.update_bias` nudges it after each step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import expert_parallel
from .config import MoEConfig, MoERuntime
from .fp8 import SwiGLUScales, fp8_swiglu, record_swiglu, swiglu_scales
from .gmm import grouped_swiglu
from .layers import SwiGLU, param, plain_dot
from .quant import take_experts
from .routing import combine, expand_sorted, input_amax, route, router_metrics, sort_copies, unsort, weight_inputs

METRIC_KEYS = ("load", "row_load", "max_violation", "entropy", "aux_loss", "z_loss", "dropped_frac", "ep_overflow_frac")


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias: selection only, never gradient; updated by the train step."""


class Experts(nnx.Module):
    """E SwiGLU experts stored stacked: gate/up [E, D, F], down [E, F, D]. With `make_fp8` (the
    precision policy's FP8 grouped matmul maker) each of the three products runs in FP8.

    One device calls the module; expert parallelism runs its parts inside a shard_map: the FP8
    scales are taken from amaxes over the whole call (`fp8_scales`, before), `on_rows` is a pure
    function of the weights and scales (the shard_map body passes its local experts), and the one
    amax known only after the products is recorded by `record`."""

    def __init__(self, cfg: MoEConfig, dim: int, *, param_dtype, std: float, rngs: nnx.Rngs, make_fp8=None):
        E, F = cfg.num_experts, cfg.expert_ff
        self.gate = param(rngs, (E, dim, F), ("expert", "embed", "expert_mlp"), param_dtype, std=std)
        self.up = param(rngs, (E, dim, F), ("expert", "embed", "expert_mlp"), param_dtype, std=std)
        self.down = param(rngs, (E, F, dim), ("expert", "expert_mlp", "embed"), param_dtype, std=std)
        self.fp8 = nnx.List([make_fp8() for _ in range(3)]) if make_fp8 is not None else None

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.gate[...], self.up[...], self.down[...]

    def fp8_scales(self, a_x, dtype) -> SwiGLUScales | None:
        """The FP8 multipliers for one call whose input rows (in `dtype`) have amax `a_x` over
        the whole call (None without FP8); records the amaxes known before the products."""
        return None if self.fp8 is None else swiglu_scales(self.fp8, a_x, self.weights(), dtype)

    def record(self, a_h) -> None:
        """Record the amax `on_rows` returned (the down projection's input; no-op without FP8)."""
        if self.fp8 is not None:
            record_swiglu(self.fp8, a_h)

    @staticmethod
    def on_rows(xs_NxD, weights, sizes_E, scales: SwiGLUScales | None = None, *, impl=None, amax_axes=()):
        """The experts on expert-sorted rows (group e = the next sizes_E[e] rows; rows past the
        groups → 0) → (y_NxD, the down projection input's amax, 0 without FP8). `amax_axes`:
        the mesh axes the rows are split over, inside a shard_map."""
        if scales is None:
            return grouped_swiglu(xs_NxD, *weights, sizes_E, impl=impl), jnp.zeros((), jnp.float32)
        return fp8_swiglu(xs_NxD, *weights, sizes_E, scales, amax_axes)

    def __call__(self, xs_NxD, sizes_E, a_x, impl=None):
        """One device: the experts on all of a call's sorted rows, whose amax is `a_x`."""
        scales = self.fp8_scales(a_x, xs_NxD.dtype)
        ys_NxD, a_h = self.on_rows(xs_NxD, self.weights(), sizes_E, scales, impl=impl)
        self.record(a_h)
        return ys_NxD


# --- dispatch paths (each → (y_TxD, dropped fraction, ep overflow fraction)) ----------------
def dense_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, run: MoERuntime = None, impl=None):
    """Oracle: every expert on every token; unselected experts get weight 0 (`run`, `impl` unused)."""
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
    xs_NxD = weight_inputs(expand_sorted(x_TxD, order_N, inv_N, k), w_Txk.reshape(-1)[order_N], cfg)
    ys_NxD = ex(xs_NxD, sizes_E, input_amax(x_TxD, w_Txk, cfg), impl)
    y_TxD = combine(unsort(ys_NxD, order_N, inv_N), w_Txk, cfg)
    return y_TxD.astype(x_TxD.dtype), 1.0 - jnp.sum(sizes_E) / idx_Txk.size, 0.0


def dropless_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, run: MoERuntime, impl=None):
    if expert_axis_size() > 1:  # experts sharded over the mesh: tokens travel to them and back
        return expert_parallel.ep_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg, run, impl)
    return _grouped_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg, None, impl)


def capacity(cfg: MoEConfig, factor: float, num_tokens: int) -> int:
    """C = ⌈capacity_factor · T · k / E⌉ copies per expert."""
    return max(1, math.ceil(factor * num_tokens * cfg.top_k / cfg.num_experts))


def capacity_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, run: MoERuntime, impl=None):
    """The dropless machinery with each group cut to its first C copies (which: module docstring)."""
    cap = capacity(cfg, run.capacity_factor, x_TxD.shape[0])
    return _grouped_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg, cap, impl)


def gather_dispatch(ex: Experts, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, run: MoERuntime = None, impl=None):
    """The dropless formula for a handful of tokens (decoding: T = batch): each copy n = t·k + j
    against its own expert's weights, gathered, as batched matrix-vector products. No sort and no
    expert loop, so it compiles in a fraction of the tiled path's time and runs T·k weight slices
    instead of walking all E experts; it copies those slices, so it is no path for long inputs."""
    if ex.fp8 is not None:  # the FP8 grouped dots exist only for the grouped layout
        return dropless_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg, run or MoERuntime(), impl)
    dt, e_N = x_TxD.dtype, idx_Txk.reshape(-1)
    xs_NxD = weight_inputs(jnp.repeat(x_TxD, cfg.top_k, axis=0), w_Txk.reshape(-1), cfg)
    take = lambda w: take_experts(w, e_N).astype(dt)  # a QWeight dequantizes only these
    g = jnp.einsum("nd,ndf->nf", xs_NxD, take(ex.gate), preferred_element_type=jnp.float32)
    u = jnp.einsum("nd,ndf->nf", xs_NxD, take(ex.up), preferred_element_type=jnp.float32)
    ys_NxD = jnp.einsum("nf,nfd->nd", (jax.nn.silu(g) * u).astype(dt), take(ex.down), preferred_element_type=jnp.float32)
    return combine(ys_NxD.astype(dt), w_Txk, cfg).astype(dt), 0.0, 0.0


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
    with the METRIC_KEYS float32 metrics (`load` [E], `row_load` [B, E], the rest scalars). `run`
    says how it runs (dispatch path, capacity, EP buffers); `dispatch=` overrides the path for one
    call (tests)."""

    def __init__(self, cfg: MoEConfig, dim: int, *, run: MoERuntime = MoERuntime(), param_dtype, std: float,
                 rngs: nnx.Rngs, make_dot=plain_dot, make_fp8_experts=None,
                 gmm_impl: str | None = None):
        self.cfg, self.run = cfg, run
        self.gmm_impl = gmm_impl  # None: by backend (gmm.default_impl); "tiles" or "ragged" to force
        self.router = param(rngs, (dim, cfg.num_experts), ("embed", "router"), param_dtype, std=std)
        self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32), logical_axes=("router",))
        self.experts = Experts(cfg, dim, param_dtype=param_dtype, std=std, rngs=rngs, make_fp8=make_fp8_experts)
        self.shared = (SwiGLU(dim, cfg.expert_ff, param_dtype=param_dtype, rngs=rngs, std=std, make_dot=make_dot)
                       if cfg.shared_expert else None)

    def __call__(self, x_BxLxD: jax.Array, dispatch: str | None = None):
        B, L, D = x_BxLxD.shape
        cfg, run = self.cfg, self.run
        x_TxD = x_BxLxD.reshape(B * L, D)
        logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), self.router[...].astype(jnp.float32))
        idx_Txk, w_Txk = route(logits_TxE, self.bias[...], cfg)
        dispatch = dispatch or run.dispatch
        if dispatch not in DISPATCH:
            raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose one of {sorted(DISPATCH)}")
        y_TxD, dropped, overflow = DISPATCH[dispatch](self.experts, x_TxD, idx_Txk, w_Txk, cfg, run, self.gmm_impl)
        y_BxLxD = y_TxD.reshape(B, L, D)
        if self.shared is not None:
            y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
        return y_BxLxD, router_metrics(logits_TxE, idx_Txk, cfg, L, dropped, overflow, run.aux_loss_level)

    def update_bias(self, delta_E: jax.Array, group: int | None = None) -> None:
        """bias += delta (aux-loss-free balancing); `group` indexes the scan axis when stacked."""
        if group is None:
            self.bias[...] = self.bias[...] + delta_E
        else:
            self.bias[...] = self.bias[...].at[group].add(delta_E)


def bias_step(load_E: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 update: raise the bias of under-loaded experts, lower over-loaded ones."""
    return rate * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)
