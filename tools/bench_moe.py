"""MoE block vs a dense SwiGLU of the same active FLOPs: fwd+bwd time ratio as E grows.

    python tools/bench_moe.py --threads=1   # one core, one XLA thread (load-robust)
    python tools/bench_moe.py               # XLA's default threads (both cores)

Both sides, jitted, compute a scalar loss and its gradient w.r.t. the input and every parameter
(router and expert weights for the MoE); the MoE has NO shared expert and the dense MLP has
ff = top_k·expert_ff, so the active matmul FLOPs are equal. They run alternately in the same
process (so machine noise hits both), and the ratio is median(MoE) / median(dense) over
`--repeats` timed runs after `--warmup` runs. Tokens ~ N(0, 1), router initialised N(0, 0.02²)
as in the model: the moderately unbalanced routing of early training (at E=128, top-1 the
groups hold 13-68 copies for a mean of 32).

"E-sized floor" times a jitted pass that reads the three expert weight arrays and writes arrays
of the same size — what any fwd+bwd that produces expert-weight gradients must at least do,
whatever its dispatch; it is the part of the MoE time that grows with E at fixed tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def _single_thread():
    """One core, one XLA:CPU thread: a load-robust measure of per-core efficiency (the shared
    2-core machine this was measured on had other jobs running; a 2-thread matmul suffers more
    from that than a 1-thread loop, which would flatter the MoE)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


if __name__ == "__main__" and "--threads=1" in sys.argv:
    _single_thread()

from llama4_jax.parallel.hostmem import tune_host_allocator  # noqa: E402

if __name__ == "__main__" and "--malloc=default" not in sys.argv:
    tune_host_allocator()  # what `llama4-jax` does: reuse freed large blocks (see hostmem.py)

import jax  # noqa: E402  (after the thread setup)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llama4_jax.model.config import MoEConfig  # noqa: E402
from llama4_jax.model.layers import SwiGLU  # noqa: E402
from llama4_jax.model.moe import MoE  # noqa: E402


def _fwd_bwd(module, x):
    """jit(value_and_grad) over the module's Params and the input."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x):
        out = nnx.merge(graphdef, params, rest)(x)
        y = out[0] if isinstance(out, tuple) else out
        return jnp.mean(y.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: step(params, x)


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def measure(fns: dict, warmup: int, repeats: int) -> dict:
    """Median seconds per function; the functions take turns so drift hits all of them."""
    for fn in fns.values():
        for _ in range(warmup):
            _time(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def moe_block(E, k, args, dispatch="dropless", gmm_impl=None):
    cfg = MoEConfig(num_experts=E, top_k=k, expert_ff=args.expert_ff, shared_expert=False, dispatch=dispatch)
    return MoE(cfg, args.hidden, param_dtype=args.dtype, std=0.02, rngs=nnx.Rngs(0), gmm_impl=gmm_impl)


def dense_block(k, args):
    return SwiGLU(args.hidden, k * args.expert_ff, param_dtype=args.dtype, rngs=nnx.Rngs(0), std=0.02)


def tokens(args):
    """Tokens in --dtype: both sides compute in it (router math stays float32 in the MoE)."""
    L = min(args.tokens, 512)
    return jax.random.normal(jax.random.PRNGKey(1), (args.tokens // L, L, args.hidden), jnp.float32).astype(args.dtype)


def flat(x_BxLxD):
    """The dense MLP gets [T, D]: XLA:CPU runs its 2-D matmuls ~1.35× faster than the 3-D form
    (the MoE flattens its tokens itself), so the baseline is the faster one."""
    return x_BxLxD.reshape(-1, x_BxLxD.shape[-1])


def weight_floor(module):
    """Read every expert weight and write a same-sized array: the E-proportional memory traffic
    that any fwd+bwd with expert-weight gradients pays, whatever its dispatch."""
    ws = [module.experts.gate[...], module.experts.up[...], module.experts.down[...]]
    fn = jax.jit(lambda ws: [w * 2.0 for w in ws])
    return lambda: fn(ws)


def main_table(args) -> list[str]:
    x = tokens(args)
    rows = ["| E | top-k | MoE fwd+bwd (ms) | dense fwd+bwd (ms) | ratio | E-sized floor (ms) |",
            "|---:|---:|---:|---:|---:|---:|"]
    print(*rows, sep="\n")
    for k in args.top_k:
        for E in args.experts:
            moe = moe_block(E, k, args)
            t = measure({"moe": _fwd_bwd(moe, x), "dense": _fwd_bwd(dense_block(k, args), flat(x)),
                         "floor": weight_floor(moe)}, args.warmup, args.repeats)
            rows.append(f"| {E} | {k} | {t['moe'] * 1e3:.0f} | {t['dense'] * 1e3:.0f} | "
                        f"{t['moe'] / t['dense']:.2f} | {t['floor'] * 1e3:.0f} |")
            print(rows[-1], flush=True)
    return rows


def expert_mlp_only(E, k, args, padded: bool):
    """Just the expert MLP on expert-sorted token copies (routing of the block's initial router):
    the tiled kernel, or the design it replaced — per-expert buffers padded to a static
    capacity, here c = the largest group (rounded up to 8), i.e. that design's best case of a
    single round — as one batched einsum."""
    from llama4_jax.model.gmm import grouped_swiglu

    moe = moe_block(E, k, args)
    x_TxD = flat(tokens(args))
    _, idx = jax.lax.top_k(x_TxD @ moe.router[...], k)
    flat_N = idx.reshape(-1)
    order = jnp.argsort(flat_N, stable=True)
    sizes = jnp.bincount(flat_N, length=E).astype(jnp.int32)
    xs_NxD = x_TxD[order // k]
    ws = (moe.experts.gate[...], moe.experts.up[...], moe.experts.down[...])
    if not padded:
        def loss(xs, ws):
            return jnp.mean(grouped_swiglu(xs, *ws, sizes) ** 2)
    else:
        c = -(-int(sizes.max()) // 8) * 8
        starts = jnp.cumsum(sizes) - sizes
        slot = jnp.arange(c)
        src_ExC = jnp.minimum(starts[:, None] + slot[None], xs_NxD.shape[0] - 1)
        mask_ExC = slot[None] < sizes[:, None]

        def loss(xs, ws):
            buf = jnp.where(mask_ExC[..., None], xs[src_ExC], 0)
            h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, ws[0])) * jnp.einsum("ecd,edf->ecf", buf, ws[1])
            y = jnp.einsum("ecf,efd->ecd", h, ws[2])
            return jnp.sum(jnp.where(mask_ExC[..., None], y, 0) ** 2) / xs.size
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: step(xs_NxD, ws)


def contrast_table(args, E=64, k=1) -> list[str]:
    """Other paths and formulations at one E, for scale: the oracle, capacity, the expert MLP
    alone (tiles vs padded buffers), and raw ragged_dot (what XLA:CPU makes of it)."""
    x = tokens(args)
    fns = {"dense MLP (same active FLOPs)": _fwd_bwd(dense_block(k, args), flat(x)),
           "MoE block, dropless (tiled gmm)": _fwd_bwd(moe_block(E, k, args), x),
           "MoE block, capacity (factor 1.25)": _fwd_bwd(moe_block(E, k, args, "capacity"), x),
           "expert MLP only, tiled gmm": expert_mlp_only(E, k, args, padded=False),
           "expert MLP only, padded buffers c = max group": expert_mlp_only(E, k, args, padded=True)}
    t = measure(fns, args.warmup, args.repeats)
    # The slow two run last and alone: their multi-GB temporaries would perturb the others.
    slow = {"MoE block, dense dispatch (oracle)": _fwd_bwd(moe_block(E, k, args, "dense"), x),
            "MoE block, dropless on raw ragged_dot": _fwd_bwd(moe_block(E, k, args, gmm_impl="ragged"), x)}
    for name, fn in slow.items():
        t[name] = measure({name: fn}, 1, 1)[name]
    base = t["dense MLP (same active FLOPs)"]
    rows = [f"| E={E}, top-{k} | fwd+bwd (ms) | ÷ dense MLP |", "|---|---:|---:|"]
    rows += [f"| {name} | {s * 1e3:.0f} | {s / base:.2f} |" for name, s in t.items()]
    for r in rows:
        print(r, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-ff", type=int, default=512)
    ap.add_argument("--experts", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 64, 128])
    ap.add_argument("--top-k", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter and compute dtype of both sides (bfloat16 for the GPU run)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-contrast", dest="contrast", action="store_false")
    ap.add_argument("--threads", type=int, choices=(1, 0), default=0,
                    help="write --threads=1 for one core and one XLA thread (0: XLA's default)")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, {platform.machine()}), "
          f"tokens={args.tokens} hidden={args.hidden} expert_ff={args.expert_ff} {args.dtype}, no shared expert on "
          f"either side, "
          f"{'1 thread on 1 core' if args.threads == 1 else 'XLA default threads'}, "
          f"load average before: {os.getloadavg()[0]:.1f}\n", flush=True)
    main_table(args)
    if args.contrast:
        print()
        contrast_table(args)


if __name__ == "__main__":
    main()
