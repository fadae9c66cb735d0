"""Long-context memory and speed of the train step's model part (fwd+bwd of the loss).

    python tools/bench_long.py --lengths 8192 32768 131072 262144 --run-upto 32768 [--attention flash]

For each length L (batch 1, the tiny preset with max_position_embeddings 262144, one document),
in a fresh child process each (so peak RSS is that length's alone): the compiled temporaries of
fwd+bwd (AOT, nothing allocated), and, up to `--run-upto`, the time per token of one executed
step and the child's peak RSS. A least-squares line through temporaries vs L (and its worst
relative residual) says whether memory grows linearly.

Then the kernel alone: the flash kernel's fwd+bwd on one global layer's shapes at `--kernel-len`
rows, its GFLOP/s (FLOPs of the visited causal block pairs: 2 matmuls forward, 5 backward — the
textbook count; the kernel itself runs 2 more, the backward's second sweep recomputing S and dP)
next to this machine's float32 matmul rate (a 2048² jnp.dot), and the kernel this one replaced
(`_before`, kept here only for this comparison) on the same inputs, all in one process, timed
alternately. The host's load average is printed before and after.
Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama4_jax.parallel.hostmem import tune_host_allocator  # noqa: E402

tune_host_allocator()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama4_jax.model.config import AttentionImpl, RuntimeConfig, preset  # noqa: E402
from llama4_jax.model.flash import flash_attention  # noqa: E402
from llama4_jax.model.transformer import Llama4  # noqa: E402


def step_fn(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, ids):
        logits = nnx.merge(graphdef, p, rest, copy=True)(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    return jax.jit(jax.value_and_grad(loss)), params


def one_length(L: int, run: bool, attention: str, block: int) -> dict:
    cfg = preset("tiny", max_position_embeddings=262144)
    model = Llama4(cfg, RuntimeConfig(attention=attention, flash_block=block), rngs=nnx.Rngs(0))
    f, params = step_fn(model)
    t = time.perf_counter()
    compiled = f.lower(params, jax.ShapeDtypeStruct((1, L), jnp.int32)).compile()
    row = {"L": L, "compile_s": time.perf_counter() - t,
           "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
    if run:
        x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, L)), jnp.int32)
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, x))  # one step: at 128K it is minutes
        row["s_per_token"] = (time.perf_counter() - t) / L
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


# --- the blocked kernel before the CPU rework (commit 13cd28a), for the side-by-side only -------
def _before(q, k, v, pos, seg, scale, chunk=None, block=512):
    """flash_attention as it was: [B, T, K, G, Dh] blocks, scores [B, K, G, Tq, Tk], the mask built
    and applied on every visited pair, one backward sweep over key blocks with dQ carried over all
    rows (`dq.at[i].add`)."""
    from llama4_jax.model.flash import NEG_INF, _blocks, _first_block, _mask, _pad, _scores, block_grads

    L, B = q.shape[1], q.shape[0]
    T = min(block, -(-L // 8) * 8)
    n = -(-L // T)
    qb, kb, vb = (_blocks(_pad(x, n * T), T) for x in (q, k, v))
    posb, segb = _blocks(_pad(pos, n * T), T), _blocks(_pad(seg, n * T, -1), T)

    def visible(i, j):
        rows = lambda b: b * T + jnp.arange(T)
        return _mask(rows(i), rows(j), posb[i], posb[j], segb[i], segb[j], chunk)[:, None, None]

    def fwd(qb, kb, vb):
        K, G, Dh = qb.shape[3:]

        def one(i):
            def body(j, carry):
                m, l, acc = carry
                seen = visible(i, j)
                s = jnp.where(seen, _scores(qb[i], kb[j], scale), NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                acc = acc * corr[..., None] + jnp.einsum("bkgqm,bmkd->bkgqd", p, vb[j])
                return m_new, l * corr + jnp.sum(p, axis=-1), acc

            init = (jnp.full((B, K, G, T), NEG_INF), jnp.zeros((B, K, G, T)), jnp.zeros((B, K, G, T, Dh)))
            m, l, acc = jax.lax.fori_loop(_first_block(i, T, chunk), i + 1, body, init)
            l = jnp.where(l > 0, l, 1.0)
            return jnp.einsum("bkgqd->bqkgd", acc / l[..., None]), m + jnp.log(l)

        return jax.lax.map(one, jnp.arange(n))

    @jax.custom_vjp
    def attn(qb, kb, vb):
        return fwd(qb, kb, vb)[0]

    def attn_fwd(qb, kb, vb):
        o, lse = fwd(qb, kb, vb)
        return o, (qb, kb, vb, o, lse)

    def attn_bwd(res, do):
        qb, kb, vb, o, lse = res
        delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", do, o)

        def key_block(dq, j):
            last = n - 1 if chunk is None else jnp.minimum((j * T + T - 1 + chunk - 1) // T, n - 1)

            def body(i, carry):
                dq, dk, dv = carry
                gq, gk, gv = block_grads(qb[i], kb[j], vb[j], do[i], lse[i], delta[i], visible(i, j), scale)
                return dq.at[i].add(gq), dk + gk, dv + gv

            zeros = jnp.zeros(kb.shape[1:])
            dq, dk, dv = jax.lax.fori_loop(j, last + 1, body, (dq, zeros, zeros))
            return dq, (dk, dv)

        dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape), jnp.arange(n))
        return dq, dk, dv

    attn.defvjp(attn_fwd, attn_bwd)
    o = attn(qb, kb, vb)
    return jnp.moveaxis(o, 0, 1).reshape(B, n * T, *q.shape[2:])[:, :L]


def kernel_rate(L: int, block: int, reps: int = 3) -> dict:
    """The flash kernel's fwd+bwd on a global layer of the tiny shape, the kernel before the CPU
    rework on the same inputs (timed alternately with it), and the f32 matmul rate."""
    cfg = preset("tiny")
    K, G, Dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, L, K, G, Dh)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, L, K, Dh)), jnp.float32) for _ in range(2))
    pos = jnp.arange(L, dtype=jnp.int32)[None]
    seg = jnp.zeros_like(pos)

    def grad_of(kernel):
        loss = lambda q, k, v: jnp.sum(kernel(q, k, v, pos, seg, Dh ** -0.5, None, block=block) * q)
        return jax.jit(jax.grad(loss, (0, 1, 2)))

    fs = {"new": grad_of(flash_attention), "before": grad_of(_before)}
    outs = {name: jax.block_until_ready(f(q, k, v)) for name, f in fs.items()}
    worst = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(outs["new"], outs["before"]))
    best = {name: float("inf") for name in fs}
    for _ in range(reps):  # alternately, so both see the same load
        for name, f in fs.items():
            t = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            best[name] = min(best[name], time.perf_counter() - t)
    T = min(block, L)
    n = -(-L // T)
    pairs = n * (n + 1) // 2  # causal: block i visits key blocks 0..i
    flops = pairs * T * T * (K * G) * Dh * 2 * (2 + 5)  # 2 matmuls fwd, 5 bwd (QKᵀ recomputed, dV, dP, dK, dQ)
    a = jnp.asarray(rng.normal(size=(2048, 2048)), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    mm_reps = 5
    t = time.perf_counter()
    for _ in range(mm_reps):
        jax.block_until_ready(mm(a))
    mm_s = (time.perf_counter() - t) / mm_reps
    kernel_s = best["new"]
    return {"kernel_L": L, "kernel_block": T, "kernel_s": kernel_s, "kernel_gflops": flops / kernel_s / 1e9,
            "matmul_gflops": 2 * 2048 ** 3 / mm_s / 1e9, "block_pair_ms": kernel_s / pairs * 1e3,
            "before_s": best["before"], "before_block_pair_ms": best["before"] / pairs * 1e3,
            "speedup": best["before"] / kernel_s, "grads_rel_diff_vs_before": worst}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    p.add_argument("--run-upto", type=int, default=32768, help="run (not only compile) lengths up to this")
    p.add_argument("--attention", default="flash", choices=get_args(AttentionImpl))
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--kernel-len", type=int, default=8192, help="rows of the kernel-alone measurement (0: skip)")
    p.add_argument("--kernel-block", type=int, help="block of the kernel-alone measurement (default: --block)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_length(args.child, args.child <= args.run_upto, args.attention, args.block)))
        return 0
    load_before = os.getloadavg()
    print(f"# load average before: {load_before}", file=sys.stderr, flush=True)
    rows = []
    for L in args.lengths:
        cmd = [sys.executable, __file__, "--child", str(L), "--run-upto", str(args.run_upto),
               "--attention", args.attention, "--block", str(args.block)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"# L={L}: {rows[-1]}", file=sys.stderr, flush=True)
    Ls = np.array([r["L"] for r in rows], float)
    temps = np.array([r["temp_bytes"] for r in rows], float)
    slope, icpt = np.polyfit(Ls, temps, 1) if len(rows) > 1 else (float("nan"), float("nan"))
    print("| L | compiled temporaries | compile (s) | µs / token (fwd+bwd) | peak RSS |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        us = f"{r['s_per_token'] * 1e6:.0f}" if "s_per_token" in r else "– (AOT only)"
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in r else "–"
        print(f"| {r['L']:,} | {r['temp_bytes'] / 2**20:,.1f} MiB | {r['compile_s']:.1f} | {us} | {rss} |")
    fit = np.polyval([slope, icpt], Ls)
    worst = float(np.max(np.abs(fit - temps) / temps))
    print(f"linear fit: {slope:.0f} bytes per token + {icpt / 2**20:.1f} MiB (worst relative residual {worst:.2%})")
    kern = kernel_rate(args.kernel_len, args.kernel_block or args.block) if args.kernel_len else {}
    if kern:
        print(f"flash kernel fwd+bwd at L={kern['kernel_L']} (block {kern['kernel_block']}): {kern['kernel_s']:.2f} s, "
              f"{kern['kernel_gflops']:.2f} GFLOP/s = {kern['kernel_gflops'] / kern['matmul_gflops']:.1%} of the "
              f"f32 matmul rate ({kern['matmul_gflops']:.1f} GFLOP/s, 2048² dot); "
              f"{kern['block_pair_ms']:.1f} ms per block pair")
        print(f"kernel before the rework, same inputs, same process: {kern['before_s']:.2f} s, "
              f"{kern['before_block_pair_ms']:.1f} ms per block pair: {kern['speedup']:.1f}x "
              f"(gradients differ by {kern['grads_rel_diff_vs_before']:.1e} of the largest)")
    load_after = os.getloadavg()
    print(f"load average before: {load_before}, after: {load_after} (1, 5, 15 min)")
    print(json.dumps({"rows": rows, "slope_bytes_per_token": slope, "intercept_bytes": icpt,
                      "worst_residual": worst, "attention": args.attention, "block": args.block,
                      "load_before": load_before, "load_after": load_after, **kern}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
