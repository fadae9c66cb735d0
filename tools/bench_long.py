"""Long-context memory and speed of the train step's model part (fwd+bwd of the loss).

    python tools/bench_long.py --lengths 8192 32768 131072 262144 --run-upto 32768 [--attention flash]

For each length L (batch 1, the tiny preset with max_position_embeddings 262144, one packed
document): the compiled temporaries of fwd+bwd (AOT, nothing allocated), and, up to
`--run-upto`, the measured time per token and this process's peak RSS after running it. A
least-squares slope of temporaries vs L says whether memory grows linearly. Prints a Markdown
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama4_jax.parallel.hostmem import tune_host_allocator  # noqa: E402

tune_host_allocator()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama4_jax.model.config import RuntimeConfig, preset  # noqa: E402
from llama4_jax.model.transformer import Llama4  # noqa: E402


def step_fn(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, ids):
        logits = nnx.merge(graphdef, p, rest, copy=True)(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    return jax.jit(jax.value_and_grad(loss)), params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    p.add_argument("--run-upto", type=int, default=32768, help="run (not only compile) lengths up to this")
    p.add_argument("--attention", default="flash", choices=["auto", "xla", "flash"])
    p.add_argument("--block", type=int, default=512)
    args = p.parse_args(argv)
    cfg = preset("tiny", max_position_embeddings=262144)
    rt = RuntimeConfig(attention=args.attention, flash_block=args.block)
    model = Llama4(cfg, rt, rngs=nnx.Rngs(0))
    f, params = step_fn(model)
    rows = []
    for L in args.lengths:
        ids = jax.ShapeDtypeStruct((1, L), jnp.int32)
        t = time.perf_counter()
        compiled = f.lower(params, ids).compile()
        row = {"L": L, "compile_s": time.perf_counter() - t,
               "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
        if L <= args.run_upto:
            x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, L)), jnp.int32)
            jax.block_until_ready(compiled(params, x))
            t = time.perf_counter()
            jax.block_until_ready(compiled(params, x))
            row["s_per_token"] = (time.perf_counter() - t) / L
            row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows.append(row)
    Ls = np.array([r["L"] for r in rows], float)
    temps = np.array([r["temp_bytes"] for r in rows], float)
    slope, icpt = np.polyfit(Ls, temps, 1) if len(rows) > 1 else (float("nan"), float("nan"))
    print("| L | compiled temporaries | compile (s) | µs / token (fwd+bwd) | peak RSS |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        us = f"{r['s_per_token'] * 1e6:.0f}" if "s_per_token" in r else "–"
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in r else "–"
        print(f"| {r['L']:,} | {r['temp_bytes'] / 2**20:,.1f} MiB | {r['compile_s']:.1f} | {us} | {rss} |")
    fit = np.polyval([slope, icpt], Ls)
    worst = float(np.max(np.abs(fit - temps) / temps))
    print(f"linear fit: {slope:.0f} bytes per token + {icpt / 2**20:.1f} MiB (worst relative residual {worst:.2%})")
    print(json.dumps({"rows": rows, "slope_bytes_per_token": slope, "intercept_bytes": icpt,
                      "worst_residual": worst, "attention": args.attention, "block": args.block}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
