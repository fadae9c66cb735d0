"""Remat policies: compiled temporary bytes and fwd+bwd time per policy (BENCHMARKS.md).

    python tools/bench_remat.py                      # the tests/test_remat.py shape
    python tools/bench_remat.py --layers 8 --seq 1024

The program is the model's loss and its gradient w.r.t. every parameter (what the train step
differentiates), jitted once per policy on the same weights; temporaries come from XLA's
`memory_analysis()` of that compile, the time is the median of --repeats calls after one warm-up.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.model.config import RuntimeConfig, preset
from llama4_jax.model.remat import REMAT_POLICIES
from llama4_jax.model.transformer import Llama4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32, help="attention chunk size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", default=",".join(p for p in REMAT_POLICIES if jax.default_backend() != "cpu"
                                                   or p != "offload"))
    a = ap.parse_args()
    cfg = preset("tiny", vocab_size=a.vocab, num_layers=a.layers, hidden_size=a.hidden, attention_chunk_size=a.chunk,
                 max_position_embeddings=max(4096, a.seq))
    params = nnx.state(Llama4(cfg, RuntimeConfig(scan_layers=True), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids, targets = (jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.seq)), jnp.int32) for _ in range(2))
    print(f"tiny preset, {a.layers} layers (scanned), hidden {a.hidden}, vocab {a.vocab}, batch {a.batch} × {a.seq}, "
          f"attention chunk {a.chunk}, {jax.devices()[0].platform}")
    print("| policy | temp (MiB) | vs none | fwd+bwd (ms) |\n|---|---:|---:|---:|")
    base = None
    for name in a.policies.split(","):
        graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: Llama4(cfg, RuntimeConfig(remat=name, scan_layers=True), rngs=nnx.Rngs(0))))

        def loss(p, i, t, g=graphdef):
            logits = nnx.merge(g, p)(i)
            gold = jnp.take_along_axis(logits, t[..., None], -1)[..., 0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - gold)

        exe = jax.jit(jax.value_and_grad(loss)).lower(params, ids, targets).compile()
        temp = exe.memory_analysis().temp_size_in_bytes
        base = base or temp
        jax.block_until_ready(exe(params, ids, targets))
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(exe(params, ids, targets))
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {temp / 2**20:.1f} | {temp / base:.2f} | {1e3 * float(np.median(times)):.0f} |", flush=True)


if __name__ == "__main__":
    main()
