"""Plain vs row-chunked cross entropy (train/loss.py): compiled temporaries and time of the
loss's gradient w.r.t. the final hidden states and the head weight (BENCHMARKS.md).

    python tools/bench_loss.py --rows 4096 --hidden 64 --vocab 32768 --chunks 256,512,1024
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax.train.loss import chunked_token_losses, token_losses


def plain(h_NxD, w_DxV, t_N):
    logits_NxV = jax.lax.dot_general(h_NxD, w_DxV, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return token_losses(logits_NxV, t_N)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunks", default="256,512,1024")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((a.rows, a.hidden)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((a.hidden, a.vocab)) * 0.02, jnp.float32)
    t = jnp.asarray(rng.integers(0, a.vocab, a.rows), jnp.int32)
    print(f"{a.rows} rows, hidden {a.hidden}, vocab {a.vocab}, float32, {jax.devices()[0].platform}")
    print("| loss | temp (MiB) | grad time (ms) |\n|---|---:|---:|")
    variants = [("plain", plain)] + [(f"chunk_rows {c}", lambda h, w, t, c=int(c): chunked_token_losses(h, w, t, c))
                                     for c in a.chunks.split(",")]
    for name, f in variants:
        exe = jax.jit(jax.grad(lambda h, w, f=f: jnp.sum(f(h, w, t)), argnums=(0, 1))).lower(h, w).compile()
        jax.block_until_ready(exe(h, w))
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(exe(h, w))
            times.append(time.perf_counter() - t0)
        temp = exe.memory_analysis().temp_size_in_bytes
        print(f"| {name} | {temp / 2**20:.1f} | {1e3 * float(np.median(times)):.0f} |", flush=True)


if __name__ == "__main__":
    main()
