"""FP8 matmuls (dense and grouped) and their scaling state.

Numerics policy (the rest of the model follows it): parameters are stored in `param_dtype`
(f32 master weights by default) and cast to `compute_dtype` at each matmul; router logits and
top-k, softmax, norms, the MoE combine, logits and the loss stay in float32 whatever the compute
dtype.

FP8 (per matmul family: attention, mlp, experts, head): operands are quantised per tensor to
float8_e4m3fn in the forward pass and the incoming gradient to float8_e5m2 in the backward pass;
the products run on float8 operands (`dot_general` / `ragged_dot` with float8 inputs and a float32
accumulator: real FP8 GEMMs on Hopper-class GPUs, simulated on CPU) and are rescaled afterwards.

Scaling (`precision.fp8.scaling`):
  - `current`: scale = fp8_max / amax(x) of the tensor itself. Exact range use, no state, but the
    GEMM waits for a reduction over its input.
  - `delayed`: the forward operands use the max over an amax history of past steps (kept in
    `Fp8State` variables, part of the train state and checkpointed), so the GEMM does not wait
    for a reduction; a value above the recorded range saturates until the history catches up.
    Gradients always use current scaling: their range moves too fast for a stale scale (a
    saturated gradient is silently wrong), and they have no history to warm up on the first step.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .gmm import gmm, match_varying, tgmm
from .layers import plain_dot

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
E5M2_MAX = float(jnp.finfo(E5M2).max)  # 57344


class Fp8State(nnx.Variable):
    """Amax history of an FP8 matmul operand (not a parameter: no gradient, no weight decay)."""


def amax(x) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def scale_for(a: jax.Array, fmax: float) -> jax.Array:
    """Quantisation multiplier mapping |x| ≤ a onto the format's range (1 when a is 0/non-finite)."""
    ok = jnp.isfinite(a) & (a > 0)
    return jnp.where(ok, fmax / jnp.where(ok, a, 1.0), 1.0)


def quantize(x, scale, dtype, fmax):
    return jnp.clip(x.astype(jnp.float32) * scale, -fmax, fmax).astype(dtype)


def _dims(x_dims, w_dims):
    return ((tuple(x_dims), tuple(w_dims)), ((), ()))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fp8_dot(x, w, x_scale, w_scale, x_dims, w_dims):
    """y ≈ x·w with e4m3 operands; scales are the quantisation multipliers of x and w."""
    return _fp8_fwd(x, w, x_scale, w_scale, x_dims, w_dims)[0]


def _fp8_fwd(x, w, x_scale, w_scale, x_dims, w_dims):
    xq, wq = quantize(x, x_scale, E4M3, E4M3_MAX), quantize(w, w_scale, E4M3, E4M3_MAX)
    y = jax.lax.dot_general(xq, wq, _dims(x_dims, w_dims), preferred_element_type=jnp.float32)
    y = (y / (x_scale * w_scale)).astype(x.dtype)
    return y, (xq, wq, x_scale, w_scale, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_bwd(x_dims, w_dims, res, dy):
    xq, wq, x_scale, w_scale, xt, wt = res
    g_scale = scale_for(amax(dy), E5M2_MAX)
    dyq = quantize(dy, g_scale, E5M2, E5M2_MAX)
    nx, nw = xq.ndim, wq.ndim
    x_free = [d for d in range(nx) if d not in x_dims]
    w_free = [d for d in range(nw) if d not in w_dims]
    # y dims = x_free ++ w_free. dx: contract dy's w_free part with w's free dims.
    dy_w = list(range(len(x_free), len(x_free) + len(w_free)))
    dx = jax.lax.dot_general(dyq, wq, ((dy_w, w_free), ((), ())), preferred_element_type=jnp.float32)
    # dx has dims x_free ++ w_contract (in w_dims order): permute back to x's layout.
    dx = _unpermute(dx, x_free, list(x_dims), nx) / (g_scale * w_scale)
    dy_x = list(range(len(x_free)))
    dw = jax.lax.dot_general(xq, dyq, ((x_free, dy_x), ((), ())), preferred_element_type=jnp.float32)
    # dw has dims x_contract (x_dims order) ++ w_free: permute to w's layout.
    dw = _unpermute(dw, list(w_dims), w_free, nw) / (x_scale * g_scale)
    zero = jnp.zeros((), jnp.float32)
    return dx.astype(xt.dtype), dw.astype(wt.dtype), zero, zero


def _unpermute(a, first, second, nd):
    """`a` has axes ordered (first ++ second) of an nd-array; return it in natural order 0..nd-1."""
    order = list(first) + list(second)
    inv = [order.index(d) for d in range(nd)]
    return jnp.transpose(a, inv)


fp8_dot.defvjp(lambda x, w, xs, ws, xd, wd: _fp8_fwd(x, w, xs, ws, xd, wd), _fp8_bwd)


class Fp8Dot(nnx.Module):
    """A drop-in `dot(x, w, x_dims, w_dims)` that runs in FP8 and owns its scaling state."""

    def __init__(self, scaling: str = "delayed", history: int = 16):
        self.scaling = scaling
        if scaling == "delayed":
            self.x_hist = Fp8State(jnp.zeros((history,), jnp.float32))
            self.w_hist = Fp8State(jnp.zeros((history,), jnp.float32))

    def _scale(self, hist: Fp8State, a_now):
        past = jnp.max(hist[...])
        _record(hist, a_now)
        return deferred_scale(past, a_now)

    def scales(self, x, w):
        """Quantisation multipliers of x and w (recording their amax when delayed)."""
        ax, aw = jax.lax.stop_gradient(amax(x)), jax.lax.stop_gradient(amax(w))
        return self.scale_of("x", ax), self.scale_of("w", aw)

    def scale_of(self, operand: str, a_now) -> jax.Array:
        """The multiplier for operand "x" or "w" whose amax now is `a_now` (recorded if delayed)."""
        if self.scaling == "delayed":
            return self._scale(self.x_hist if operand == "x" else self.w_hist, a_now)
        return scale_for(a_now, E4M3_MAX)

    # For an input whose amax is only known inside a computation this module does not run (the
    # experts' down projection): the caller takes the past amax in, computes
    # `deferred_scale(past, a_now)` in there, and records a_now afterwards.
    def x_past(self) -> jax.Array:
        return jnp.max(self.x_hist[...]) if self.scaling == "delayed" else jnp.zeros((), jnp.float32)

    def record_x(self, a_now) -> None:
        if self.scaling == "delayed":
            _record(self.x_hist, a_now)

    def __call__(self, x, w, x_dims, w_dims):
        w = w.astype(x.dtype)
        return fp8_dot(x, w, *self.scales(x, w), tuple(x_dims), tuple(w_dims))


def deferred_scale(past, a_now) -> jax.Array:
    """The e4m3 multiplier from the past amax; until a history exists (first step, or current
    scaling: past = 0) from the current amax."""
    return scale_for(jnp.where(past > 0, past, a_now), E4M3_MAX)


def _record(hist: Fp8State, a_now) -> None:
    hist[...] = jnp.roll(hist[...], 1).at[0].set(a_now)


def dot_factory(families: tuple[str, ...], scaling: str, history: int):
    """family → a maker of one dot per matmul site: an `Fp8Dot` (with its own scaling state) for
    the FP8 families, the plain dot otherwise."""
    def for_family(family: str):
        if family in families:
            return lambda: Fp8Dot(scaling, history)
        return plain_dot

    return for_family


# --- grouped (expert) matmuls ---------------------------------------------------------------
def _grouped(xq, wq, sizes, dt):
    """Grouped product of float8 operands with a float32 accumulator. Off-CPU, ragged_dot takes
    the float8 arrays themselves (FP8 tensor-core GEMMs); XLA:CPU has no grouped kernel, so there
    the values are upcast (exactly: every e4m3/e5m2 value is a bfloat16/float32 value) and the
    tiled CPU kernel runs them."""
    if jax.default_backend() != "cpu":
        return jax.lax.ragged_dot(xq, wq, sizes, preferred_element_type=jnp.float32)
    return gmm(xq.astype(dt), wq.astype(dt), sizes).astype(jnp.float32)


@jax.custom_vjp
def fp8_gmm(x_NxD, w_ExDxF, x_scale, w_scale, sizes_E):
    """Grouped matmul with e4m3 operands (per-tensor scales over all experts), e5m2 gradients."""
    return _fp8_gmm_fwd(x_NxD, w_ExDxF, x_scale, w_scale, sizes_E)[0]


def _fp8_gmm_fwd(x, w, sx, sw, sizes):
    xq, wq = quantize(x, sx, E4M3, E4M3_MAX), quantize(w, sw, E4M3, E4M3_MAX)
    y = _grouped(xq, wq, sizes, x.dtype) / (sx * sw)
    return y.astype(x.dtype), (xq, wq, sx, sw, sizes, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_gmm_bwd(res, dy):
    xq, wq, sx, sw, sizes, xt, wt = res
    g = scale_for(amax(dy), E5M2_MAX)
    dyq = quantize(dy, g, E5M2, E5M2_MAX)
    dx = _grouped(dyq, jnp.swapaxes(wq, 1, 2), sizes, xt.dtype) / (g * sw)
    # dw[e] = x_eᵀ·dy_e on the quantised operands, upcast to bfloat16 (exact: e4m3 and e5m2 values
    # are bfloat16 values; float32 copies of [N, D] and [N, F] would double the memory), float32 sums.
    dw = tgmm(xq.astype(jnp.bfloat16), dyq.astype(jnp.bfloat16), sizes, out_dtype=jnp.float32) / (sx * g)
    zero = jnp.zeros((), jnp.float32)
    return dx.astype(xt.dtype), dw.astype(wt.dtype), zero, zero, None


fp8_gmm.defvjp(_fp8_gmm_fwd, _fp8_gmm_bwd)


class Fp8GroupedDot(Fp8Dot):
    """`gmm(x_NxD, w_ExDxF, sizes_E)` in FP8 with the same scaling options as `Fp8Dot`."""

    def __call__(self, x_NxD, w_ExDxF, sizes_E):
        w_ExDxF = w_ExDxF.astype(x_NxD.dtype)
        return fp8_gmm(x_NxD, w_ExDxF, *self.scales(x_NxD, w_ExDxF), sizes_E)


# --- the experts' SwiGLU in FP8 -------------------------------------------------------------
class SwiGLUScales(NamedTuple):
    """One call's quantisation multipliers for the experts' three grouped matmuls. The down
    projection's input h is made inside the call, so only its past amax is known beforehand."""

    gate_x: jax.Array
    gate_w: jax.Array
    up_x: jax.Array
    up_w: jax.Array
    down_w: jax.Array
    down_x_past: jax.Array


def swiglu_scales(sites: Sequence[Fp8GroupedDot], a_x, weights, dtype) -> SwiGLUScales:
    """The multipliers for one call of the experts (gate, up, down sites; `weights` in that
    order) whose input rows, in `dtype`, have amax `a_x` over ALL rows of the call (every
    device's under expert parallelism: each device must quantise with the scale one device
    would use). Records a_x and the weight amaxes (of the weights cast to `dtype`, as the
    matmuls see them) in the sites' histories."""
    fg, fu, fd = sites
    sg = jax.lax.stop_gradient
    a_x = sg(a_x)
    a_w = [sg(amax(w.astype(dtype))) for w in weights]
    return SwiGLUScales(fg.scale_of("x", a_x), fg.scale_of("w", a_w[0]), fu.scale_of("x", a_x),
                        fu.scale_of("w", a_w[1]), fd.scale_of("w", a_w[2]), fd.x_past())


def record_swiglu(sites: Sequence[Fp8GroupedDot], a_h) -> None:
    """Record the amax of the down projection's input that `fp8_swiglu` returned."""
    sites[2].record_x(a_h)


def fp8_swiglu(xs_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, sizes_E, scales: SwiGLUScales, amax_axes=()):
    """down(silu(x·gate) ⊙ x·up) per group on expert-sorted rows, every product in FP8 →
    (y_NxD, amax of the down projection's input). When the rows are split over mesh axes (a
    shard_map body), `amax_axes` names them: h's amax is a pmax over them, so every shard
    quantises h with the one global scale."""
    dt = xs_NxD.dtype
    gmm8 = lambda x, w, sx, sw: fp8_gmm(*match_varying(x, w.astype(dt)), sx, sw, sizes_E)
    h_NxF = jax.nn.silu(gmm8(xs_NxD, w_gate_ExDxF, scales.gate_x, scales.gate_w)) * gmm8(
        xs_NxD, w_up_ExDxF, scales.up_x, scales.up_w)
    a_h = jax.lax.stop_gradient(amax(h_NxF))
    if amax_axes:
        a_h = jax.lax.pmax(a_h, amax_axes)
    return gmm8(h_NxF, w_down_ExFxD, deferred_scale(scales.down_x_past, a_h), scales.down_w), a_h
