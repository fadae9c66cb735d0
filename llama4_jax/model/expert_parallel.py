"""Expert parallelism: experts sharded over the mesh's `expert` axis, tokens sent to them and back.

How the block finds the mesh: `MoE.__call__` reads the ambient mesh
(`jax.sharding.get_abstract_mesh()`, set by `with jax.set_mesh(mesh):` around the jitted step).
If it has an `expert` axis of size ep > 1 and the dispatch is `dropless`, this module runs;
otherwise the local path does. No mesh object is threaded through the model.

Inside one `jax.shard_map` over the whole mesh:
  - tokens (the flattened [T, D] activations, their router choices and weights) are split over
    every mesh axis in TOKEN_AXES with size > 1 (the project's `batch` rule: data, fsdp, expert),
    so each device routes T/n distinct tokens; `tensor` replicates this work;
  - expert weights are split over `expert` (each device holds E/ep experts, whole; an fsdp split
    of their embed dim is gathered at the shard_map boundary, as FSDP does for any weight);
  1. each device orders its T_l·k token copies by destination device (= expert // (E/ep)),
     token-major inside a destination, and packs them into a static send buffer [ep, C, D] with
     C = ⌈ep_buffer_factor · T_l·k / ep⌉ rounded up to 8 (fair share × factor);
  2. `all_to_all` over `expert` delivers each device the rows for its experts [ep, C, D];
  3. the device sorts those rows by local expert and runs the grouped SwiGLU (gmm.py);
  4. a second `all_to_all` returns the results, which are combined into the token outputs.
Overflow (a source holding more than C copies for one destination), by `MoERuntime.ep_overflow`:
  - "rounds" (default, dropless): copies of rank [r·C, (r+1)·C) at their destination go in round
    r. Round 0 always runs; round r ≥ 1 runs under `lax.cond` only if some source anywhere holds
    more than r·C copies for one destination (a pmax over the token shards, so every device takes
    the same branch and the collectives match). Balanced routing pays one round; skew pays extra
    rounds. ⌈N/C⌉ rounds cover the worst case (every copy to one device); `ep_max_rounds`
    (default 4: up to 4 × ep_buffer_factor × the fair share) caps how many are compiled, and
    copies past the cap are dropped and counted in `dropped_frac` (0 = no cap: never drops).
  - "drop": only round 0; the copies past C get no expert output (earlier tokens win, as in the
    capacity path) and count in `dropped_frac`.
`ep_overflow_frac` = the fraction of copies past C (sent in extra rounds, or dropped), over the
whole batch — never silent.

`jax.lax.ragged_all_to_all` would make the buffer exact, but XLA:CPU (jax 0.10.2) cannot compile
it ("ragged-all-to-all is not supported by XLA:CPU"), so the static all_to_all is the one
implementation here, on every backend.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .config import MoEConfig, MoERuntime
from .fp8 import amax, deferred_scale, fp8_gmm
from .gmm import grouped_swiglu, match_varying, vzeros

TOKEN_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"


def send_capacity(run: MoERuntime, local_copies: int, ep: int) -> int:
    """Static rows per (source, destination) pair: fair share × ep_buffer_factor, multiple of 8."""
    c = math.ceil(run.ep_buffer_factor * local_copies / ep)
    return max(8, -(-c // 8) * 8)


def _by_destination(dest_N, ep: int):
    """Copies ordered by destination device, token order within one → (order [N], copies per
    destination [ep], where each destination's run starts in the order [ep], each copy's rank
    among the copies to its destination [N])."""
    N = dest_N.shape[0]
    order_N = jnp.argsort(dest_N, stable=True)
    count_P = jnp.bincount(dest_N, length=ep)
    start_P = jnp.cumsum(count_P) - count_P
    rank_N = jnp.zeros((N,), jnp.int32).at[order_N].set(jnp.arange(N, dtype=jnp.int32)) - start_P[dest_N]
    return order_N, count_P, start_P, rank_N


def _local_experts(recv_RxD, lid_R, E_l: int, wg, wu, wd, impl, fp8=None, amax_axes=()):
    """Received rows (any order, empty slots have lid = E_l) → (expert outputs in the same order,
    the global amax of the down projection's input when `fp8` is given, else 0).

    `fp8` = (x scale, gate w scale, x scale, up w scale, down w scale, down input's past amax):
    the scales are computed outside the shard_map from global amaxes (so every device quantises
    with the same scale, as one device would); the down projection's input only exists in here,
    so its amax is a pmax over `amax_axes` and its scale follows `deferred_scale`."""
    order_R = jnp.argsort(lid_R, stable=True)  # empty slots sort last: past every group
    inv_R = jnp.zeros_like(order_R).at[order_R].set(jnp.arange(order_R.shape[0], dtype=order_R.dtype))
    sizes_E = jnp.bincount(lid_R, length=E_l + 1)[:E_l].astype(jnp.int32)
    xs_RxD = recv_RxD[order_R]
    if fp8 is None:
        return grouped_swiglu(xs_RxD, wg, wu, wd, sizes_E, impl=impl)[inv_R], jnp.zeros((), jnp.float32)
    sxg, swg, sxu, swu, swd, past_h = fp8
    dt = xs_RxD.dtype
    gmm8 = lambda x, w, sx, sw: fp8_gmm(*match_varying(x, w.astype(dt)), sx, sw, sizes_E)
    h_RxF = jax.nn.silu(gmm8(xs_RxD, wg, sxg, swg)) * gmm8(xs_RxD, wu, sxu, swu)
    a_h = jax.lax.pmax(jax.lax.stop_gradient(amax(h_RxF)), amax_axes)
    return gmm8(h_RxF, wd, deferred_scale(past_h, a_h), swd)[inv_R], a_h


def _ep_body(x_TxD, idx_Txk, w_Txk, wg, wu, wd, fp8, *, cfg: MoEConfig, run: MoERuntime, ep: int, tok_axes, impl):
    T_l, D = x_TxD.shape
    k, E_l = cfg.top_k, wg.shape[0]
    N = T_l * k
    C = send_capacity(run, N, ep)
    e_N = idx_Txk.reshape(-1)
    dest_N, lid_N = e_N // E_l, e_N % E_l
    xin_NxD = jnp.repeat(x_TxD, k, axis=0)
    if cfg.router == "sigmoid":  # Llama 4 scales the expert input
        xin_NxD = (xin_NxD.astype(jnp.float32) * w_Txk.reshape(-1)[:, None]).astype(x_TxD.dtype)
    order_N, count_P, start_P, rank_N = _by_destination(dest_N, ep)
    a2a = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)

    def one_round(r):
        """Copies of rank [r·C, (r+1)·C) at their destination: send, compute there, return."""
        slot_C = r * C + jnp.arange(C)
        src_PxC = order_N[jnp.minimum(start_P[:, None] + slot_C[None], N - 1)]
        filled_PxC = slot_C[None] < count_P[:, None]
        send_PxCxD = jnp.where(filled_PxC[..., None], xin_NxD[src_PxC], 0)
        lid_PxC = jnp.where(filled_PxC, lid_N[src_PxC], E_l)  # E_l marks an empty slot
        recv_PxCxD, rlid_PxC = a2a(send_PxCxD), a2a(lid_PxC)
        out_RxD, a_h = _local_experts(recv_PxCxD.reshape(ep * C, D), rlid_PxC.reshape(-1), E_l, wg, wu, wd,
                                      impl, fp8, tok_axes)
        back_PxCxD = a2a(out_RxD.reshape(ep, C, D))
        mine_N = (rank_N >= r * C) & (rank_N < (r + 1) * C)
        got_NxD = back_PxCxD[dest_N, jnp.clip(rank_N - r * C, 0, C - 1)]
        return jnp.where(mine_N[:, None], got_NxD, 0).astype(jnp.float32), a_h

    rounds = 1
    if run.ep_overflow == "rounds":
        rounds = -(-N // C)  # worst case: all N copies to one destination
        rounds = min(rounds, run.ep_max_rounds) if run.ep_max_rounds > 0 else rounds
    y_NxD, a_h = one_round(0)
    if rounds > 1:
        # Every device must run the same collectives: the round count comes from the largest
        # (source, destination) count anywhere, agreed by a pmax over every token shard.
        busiest = jax.lax.pmax(jnp.max(count_P), tok_axes)
        skip = lambda: (vzeros(y_NxD.shape, y_NxD.dtype, y_NxD), jnp.zeros_like(a_h))
        for r in range(1, rounds):
            y_r, a_r = jax.lax.cond(busiest > r * C, partial(one_round, r), skip)
            y_NxD, a_h = y_NxD + y_r, jnp.maximum(a_h, a_r)
    kept_N = rank_N < rounds * C
    y_TxkxD = y_NxD.reshape(T_l, k, D)
    if cfg.router == "sigmoid":
        y_TxD = y_TxkxD.sum(1)
    else:
        y_TxD = jnp.einsum("tkd,tk->td", y_TxkxD, w_Txk)
    total = jax.lax.psum(jnp.float32(N), tok_axes)
    over = jax.lax.psum(jnp.sum((rank_N >= C).astype(jnp.float32)), tok_axes) / total
    dropped = jax.lax.psum(jnp.sum(1.0 - kept_N.astype(jnp.float32)), tok_axes) / total
    return y_TxD.astype(x_TxD.dtype), over, dropped, a_h


def token_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def ep_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, run: MoERuntime, impl=None):
    """Expert-parallel dropless dispatch under the ambient mesh → (y_TxD, dropped, overflow)."""
    mesh = jax.sharding.get_abstract_mesh()
    ep = mesh.shape[EXPERT_AXIS]
    tok = token_axes(mesh)
    n_tok = math.prod(mesh.shape[a] for a in tok)
    T = x_TxD.shape[0]
    if cfg.num_experts % ep:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the expert axis ({ep})")
    if T % n_tok:
        raise ValueError(f"{T} tokens cannot be split over mesh axes {tok} ({n_tok} shards)")
    tok_spec, w_spec = P(tok), P(EXPERT_AXIS)

    fp8, ex_fp8 = None, getattr(ex, "fp8", None)
    wg, wu, wd = ex.gate[...], ex.up[...], ex.down[...]
    if ex_fp8 is not None:
        fg, fu, fd = ex_fp8
        # The experts' input: x scaled by the router score (sigmoid) or x itself; its amax over
        # every copy is the row amax times the largest score of the row.
        sg = jax.lax.stop_gradient
        row_a = jnp.max(jnp.abs(x_TxD.astype(jnp.float32)), axis=-1)
        if cfg.router == "sigmoid":
            row_a = row_a * jnp.max(jnp.abs(w_Txk), axis=-1)
        a_x = sg(jnp.max(row_a))
        fp8 = (fg.scale_of("x", a_x), fg.scale_of("w", sg(amax(wg))), fu.scale_of("x", a_x),
               fu.scale_of("w", sg(amax(wu))), fd.scale_of("w", sg(amax(wd))), fd.x_past())

    def body(*args):
        return _ep_body(*args, cfg=cfg, run=run, ep=ep, tok_axes=tok, impl=impl)

    fp8_spec = None if fp8 is None else (P(),) * len(fp8)
    fn = jax.shard_map(body, in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, w_spec, fp8_spec),
                       out_specs=(tok_spec, P(), P(), P()))
    y_TxD, overflow, dropped, a_h = fn(x_TxD, idx_Txk, w_Txk, wg, wu, wd, fp8)
    if ex_fp8 is not None:
        ex_fp8[2].record_x(a_h)
    return y_TxD, dropped, overflow
