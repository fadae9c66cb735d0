"""Expert parallelism: experts sharded over the mesh's `expert` axis, tokens sent to them and back.

How the block finds the mesh: `MoE.__call__` reads the ambient mesh
(`jax.sharding.get_abstract_mesh()`, set by `with jax.set_mesh(mesh):` around the jitted step).
If it has an `expert` axis of size ep > 1 and the dispatch is `dropless`, this module runs;
otherwise the local path does. No mesh object is threaded through the model.

Inside one `jax.shard_map` over the whole mesh:
  - tokens (the flattened [T, D] activations, their router choices and weights) are split over
    the mesh axes of the rules table's `batch` entry (size > 1; by default data, fsdp, expert),
    as the activations already are, so each device routes T/n distinct tokens and the boundary
    moves nothing (`token_axes`); axes the rule leaves out (`tensor`, or `fsdp` when a user's
    `mesh.rules.batch` drops it) replicate this work;
  - expert weights are split over `expert` (each device holds E/ep experts, whole; an fsdp split
    of their embed dim is gathered at the shard_map boundary, as FSDP does for any weight);
  1. each device orders its T_l·k token copies by destination device (= expert // (E/ep)),
     token-major inside a destination, and packs them into a static send buffer [ep, C, D] with
     C = ⌈ep_buffer_factor · T_l·k / ep⌉ rounded up to 8 (fair share × factor);
  2. `all_to_all` over `expert` delivers each device the rows for its experts [ep, C, D];
  3. the device sorts those rows by local expert and runs the experts on them
     (`Experts.on_rows`, the same function the single-device path runs);
  4. a second `all_to_all` returns the results, which are combined into the token outputs.
The expert input (router weighting), the combine and the permutations are routing.py's, as on one
device. FP8 experts: the quantisation scales come from `Experts.fp8_scales` outside the
shard_map, from amaxes over the whole batch, so every device quantises as one device would; they
enter as an opaque pytree, and the one amax only known inside (the down projection's input, a
pmax over the token shards) comes out for `Experts.record`.
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

from ..parallel.rules import split_axes_of
from .config import MoEConfig, MoERuntime
from .gmm import vzeros
from .routing import combine, expand_sorted, input_amax, sort_copies, unsort, weight_inputs

EXPERT_AXIS = "expert"


def send_capacity(run: MoERuntime, local_copies: int, ep: int) -> int:
    """Static rows per (source, destination) pair: fair share × ep_buffer_factor, multiple of 8."""
    c = math.ceil(run.ep_buffer_factor * local_copies / ep)
    return max(8, -(-c // 8) * 8)


def token_axes(mesh, rules=None) -> tuple[str, ...]:
    """The mesh axes the tokens are split over: the `batch` rule's axes of `mesh` with size > 1,
    in the rule's order (the order decides which device holds which block, so it must match the
    activations'). `expert` is appended if the rule leaves it out: the devices along it must route
    different tokens (the boundary then slices the batch, and gathers the output back)."""
    # [B, L] flattened row-major: the batch axes, then the sequence's (context parallelism).
    tok = split_axes_of(mesh, ("batch", "length"), rules)
    return tok if EXPERT_AXIS in tok else (*tok, EXPERT_AXIS)


def _by_destination(dest_N, ep: int):
    """Copies ordered by destination device, token order within one → (order [N], copies per
    destination [ep], where each destination's run starts in the order [ep], each copy's rank
    among the copies to its destination [N])."""
    order_N, inv_N, count_P = sort_copies(dest_N, ep)
    start_P = jnp.cumsum(count_P) - count_P
    return order_N, count_P, start_P, inv_N - start_P[dest_N]


def _local_experts(recv_RxD, lid_R, E_l: int, run_experts):
    """Received rows (any order; empty slots have lid = E_l, which sorts them past every group)
    → (the experts' outputs in the same order, the down projection input's amax)."""
    order_R, inv_R, sizes_E = sort_copies(lid_R, E_l)
    ys_RxD, a_h = run_experts(expand_sorted(recv_RxD, order_R, inv_R, 1), sizes_E)
    return unsort(ys_RxD, order_R, inv_R), a_h


def _ep_body(x_TxD, idx_Txk, w_Txk, weights, scales, *, on_rows, cfg: MoEConfig, run: MoERuntime, ep: int,
             tok_axes):
    T_l, D = x_TxD.shape
    k, E_l = cfg.top_k, weights[0].shape[0]
    N = T_l * k
    C = send_capacity(run, N, ep)
    e_N = idx_Txk.reshape(-1)
    dest_N, lid_N = e_N // E_l, e_N % E_l
    xin_NxD = weight_inputs(jnp.repeat(x_TxD, k, axis=0), w_Txk.reshape(-1), cfg)
    order_N, count_P, start_P, rank_N = _by_destination(dest_N, ep)
    a2a = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)
    run_experts = lambda xs_RxD, sizes_E: on_rows(xs_RxD, weights, sizes_E, scales)

    def one_round(r):
        """Copies of rank [r·C, (r+1)·C) at their destination: send, compute there, return."""
        slot_C = r * C + jnp.arange(C)
        src_PxC = order_N[jnp.minimum(start_P[:, None] + slot_C[None], N - 1)]
        filled_PxC = slot_C[None] < count_P[:, None]
        send_PxCxD = jnp.where(filled_PxC[..., None], xin_NxD[src_PxC], 0)
        lid_PxC = jnp.where(filled_PxC, lid_N[src_PxC], E_l)  # E_l marks an empty slot
        recv_PxCxD, rlid_PxC = a2a(send_PxCxD), a2a(lid_PxC)
        out_RxD, a_h = _local_experts(recv_PxCxD.reshape(ep * C, D), rlid_PxC.reshape(-1), E_l, run_experts)
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

        def extra_rounds():
            # Each round rematerialised: its backward pass keeps nothing but the loop constants.
            y, a = skip()
            for r in range(1, rounds):
                y_r, a_r = jax.checkpoint(partial(one_round, r))()
                y, a = y + y_r, jnp.maximum(a, a_r)
            return y, a

        # ONE cond around every extra round, not a cond per round: each cond's backward hands
        # back a whole set of weight gradients (and its skip branch a set of zeros), and XLA
        # holds every set until they are summed — 3 rounds × 3 gathered expert matrices in
        # float32 per MoE layer, ~1.5 GiB per layer at Scout's size. A step that overflows runs
        # all extra rounds (the later ones on empty slots); most steps run none.
        y_x, a_x = jax.lax.cond(busiest > C, extra_rounds, skip)
        y_NxD, a_h = y_NxD + y_x, jnp.maximum(a_h, a_x)
    kept_N = rank_N < rounds * C
    y_TxD = combine(y_NxD, w_Txk, cfg)
    total = jax.lax.psum(jnp.float32(N), tok_axes)
    over = jax.lax.psum(jnp.sum((rank_N >= C).astype(jnp.float32)), tok_axes) / total
    dropped = jax.lax.psum(jnp.sum(1.0 - kept_N.astype(jnp.float32)), tok_axes) / total
    return y_TxD.astype(x_TxD.dtype), over, dropped, a_h


def ep_dispatch(ex, x_TxD, idx_Txk, w_Txk, cfg: MoEConfig, run: MoERuntime, impl=None):
    """Expert-parallel dropless dispatch of the `Experts` `ex` under the ambient mesh →
    (y_TxD, dropped, overflow)."""
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
    weights = ex.weights()
    # Taken here, where the whole batch is visible: None without FP8, else an opaque pytree.
    scales = ex.fp8_scales(input_amax(x_TxD, w_Txk, cfg), x_TxD.dtype)
    body = partial(_ep_body, on_rows=partial(ex.on_rows, impl=impl, amax_axes=tok), cfg=cfg, run=run, ep=ep,
                   tok_axes=tok)
    fn = jax.shard_map(body, in_specs=(tok_spec, tok_spec, tok_spec, (w_spec,) * len(weights),
                                       jax.tree.map(lambda _: P(), scales)),
                       out_specs=(tok_spec, P(), P(), P()))
    y_TxD, overflow, dropped, a_h = fn(x_TxD, idx_Txk, w_Txk, weights, scales)
    ex.record(a_h)
    return y_TxD, dropped, overflow
