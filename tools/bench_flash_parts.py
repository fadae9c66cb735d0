"""Where a block pair's time goes in the flash kernel on this host (model/flash.py).

    python tools/bench_flash_parts.py [--len 4096] [--block 512]

1. The kernel's three loops separately, per visited causal block pair, on a global layer of the
   tiny preset's shape (4 query heads, 2 KV heads, 16 dims, batch 1): the forward, the backward's
   key-major sweep (dK, dV) and its query-major sweep (dQ).
2. The products and elementwise passes of one pair ([B·K, G·T, Dh] blocks, float32), each in a
   16-step loop whose small operand changes every step, so nothing is hoisted: the plain forms
   the kernel uses (NT: S = Q·Kᵀ; NN: P·V, Pᵀ·dO on a transposed block), the transposed-operand
   form it avoids (TN: Pᵀ·dO on a [queries, keys] block), and exp / row max over a score block.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llama4_jax.model import flash  # noqa: E402

K, G, DH = 2, 2, 16


def best_of(f, *args, reps: int = 3) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def loops(L: int, T: int) -> None:
    n = L // T
    rng = np.random.default_rng(0)
    qh = jnp.asarray(rng.normal(size=(n, K, G * T, DH)), jnp.float32)
    kh, vh = (jnp.asarray(rng.normal(size=(n, K, T, DH)), jnp.float32) for _ in range(2))
    posb = jnp.arange(L, dtype=jnp.int32).reshape(n, 1, T)
    segb = jnp.zeros_like(posb)
    scale = DH ** -0.5
    fwd = jax.jit(lambda *a: flash._flash_fwd(*a, scale, None))
    o, res = fwd(qh, kh, vh, posb, segb)
    do = jnp.asarray(rng.normal(size=o.shape), jnp.float32)
    pairs = n * (n + 1) // 2
    parts = {"forward": (fwd, (qh, kh, vh, posb, segb)),
             "backward, dK dV sweep": (jax.jit(lambda r, d: flash._flash_bwd(scale, None, r, d)[1:3]), (res, do)),
             "backward, dQ sweep": (jax.jit(lambda r, d: flash._flash_bwd(scale, None, r, d)[0]), (res, do))}
    for name, (f, args) in parts.items():
        print(f"| {name} | {best_of(f, *args) / pairs * 1e3:.2f} ms |", flush=True)


def products(T: int, steps: int = 16) -> None:
    rng = np.random.default_rng(0)
    X = K  # batch 1 · K heads
    q = jnp.asarray(rng.normal(size=(X, G * T, DH)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(X, T, DH)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(X, G * T, T)), jnp.float32)  # [queries, keys]
    st = jnp.asarray(rng.normal(size=(X, T, G * T)), jnp.float32)  # [keys, queries]

    def timed(name, f, big, small):
        def run(big, small):
            out = jax.eval_shape(f, big, small)

            def body(i, acc):
                return acc + f(big, small + i.astype(small.dtype) * 1e-7)

            return jax.lax.fori_loop(0, steps, body, jnp.zeros(out.shape, out.dtype))

        print(f"| {name} | {best_of(jax.jit(run), big, small) / steps * 1e3:.2f} ms |", flush=True)

    timed("NT S = Q·Kᵀ → [G·T, T] (+ accumulate it)", lambda k, q: jnp.einsum("xqd,xkd->xqk", q, k), k, q)
    timed("NN P·V, contracting T", lambda s, k: jnp.einsum("xqk,xkd->xqd", s, k), s, k)
    timed("NN Pᵀ·dO on a [keys, queries] block, contracting G·T", lambda st, q: jnp.einsum("xkq,xqd->xkd", st, q),
          st, q)
    timed("TN Pᵀ·dO on a [queries, keys] block", lambda s, q: jnp.einsum("xqk,xqd->xkd", s, q), s, q)
    timed("exp(S − row max) (+ accumulate it)", lambda s, q: jnp.exp(s - q[..., :1]), s, q)
    timed("row max", lambda s, q: jnp.max(s - q[..., :1], -1), s, q)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--len", type=int, default=4096)
    p.add_argument("--block", type=int, default=512)
    args = p.parse_args(argv)
    print(f"| loop (L = {args.len}, block {args.block}) | per visited block pair |\n|---|---:|")
    loops(args.len, args.block)
    print(f"\n| one pair's piece (block {args.block}) | time |\n|---|---:|")
    products(args.block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
