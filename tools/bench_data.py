"""Benchmark of the token store (llama4_jax/data/store.py): prepare throughput, peak memory of
prepare and of training at two corpus sizes, and data-pipeline speed against the train step.

    nice python tools/bench_data.py [--gb 2] [--small-mb 20] [--workdir /tmp/bench_data] [--json]

1. Generates a text corpus of --gb GB (files of 32 MB, paragraphs of random words: one document
   per paragraph) and a --small-mb MB one, in --workdir (deleted at the end unless --keep).
2. `llama4-jax data prepare` of the big corpus with 1 and with 2 workers (tokens/s, peak RSS of
   the main process and of its worker processes), and of the small one.
3. `llama4-jax train` for 20 steps of the tiny model (the quickstart's, seq 128 x batch 8) on
   each prepared store: peak RSS (the goal: within +300 MB of each other).
4. The data pipeline alone on the big store at bench_cpu's shape (seq 512 x batch 8), no
   prefetch: tokens/s, divided by `llama4-jax bench experiments/bench_cpu.yaml`'s step tokens/s
   measured right after it (the goal: >= 20).
Every phase runs in its own process, so peak RSS is that phase's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FILE_BYTES = 32 << 20
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "also has had first one their its new after who they two her she been other when there all "
         "during into school time may years more most only over city some world would where later up "
         "such used many can state about national out known university united then made").split()

# Runs a llama4-jax command in this process and reports its peak RSS (self, and the largest of
# its child processes) on the last line.
WRAP = r"""
import json, resource, sys
from llama4_jax.cli import main
rc = main(sys.argv[1:])
print("RSS " + json.dumps({"rc": rc, "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), flush=True)
"""


def generate(folder: Path, total_bytes: int, seed: int) -> int:
    """Files of ~32 MB of paragraphs (4-60 lines of 3-15 words, each numbered so that no two are
    the same document); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pool = ["\n".join(" ".join(rng.choice(words, rng.integers(3, 16))) for _ in range(rng.integers(4, 60)))
            for _ in range(5000)]
    mean = sum(map(len, pool)) / len(pool)
    written, k = 0, 0
    while written < total_bytes:
        n = max(1, int(min(FILE_BYTES, total_bytes - written) / (mean + 12)))
        text = "\n\n".join(f"{k}.{j} {pool[i]}" for j, i in enumerate(rng.integers(0, len(pool), n).tolist()))
        data = text.encode()
        (folder / f"part{k:04d}.txt").write_bytes(data)
        written += len(data)
        k += 1
    return written


EXPERIMENT = """\
name: bench_data
seed: 0
model: {{preset: tiny, overrides: {{vocab_size: 264}}}}
mesh: {{data: -1}}
precision: {{param_dtype: float32, compute_dtype: float32}}
optimizer: {{lr: 3.0e-3, schedule: {{type: stages}}}}
data:
  store_dir: {store}
  workers: 1
  tokenizer: {{type: byte}}
  sources:
    web: {{kind: text, path: {corpus}, split: paragraph, eval_fraction: 0.001}}
curriculum:
  stages:
    - {{name: base, steps: 20, seq_len: 128, batch_size: 8, mixture: {{web: 1.0}}}}
checkpoint: {{every_steps: 1000000, keep_last: 1, keep_stage_final: false, async_save: false}}
logging: {{every_steps: 10, tensorboard: false, progress: false}}
eval: {{every_steps: 0}}
"""


# Times prepare_store alone (not the interpreter's start-up) and reports peak RSS.
PREPARE = r"""
import json, resource, sys, time
from llama4_jax.config import load_experiment
from llama4_jax.data import store
from llama4_jax.train.run import build_tokenizer
exp = load_experiment(sys.argv[1])
tok = build_tokenizer(exp.data)
t = time.perf_counter()
reports = store.prepare_store(exp.data.sources, tok, exp.data.store_dir, workers=int(sys.argv[2]), log=None)
print("RSS " + json.dumps({"rc": 0, "seconds": time.perf_counter() - t,
                           "written": sum(r.shards_written for r in reports),
                           "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                           "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), flush=True)
"""


def run_cli(args: list[str], env: dict, script: str = WRAP) -> tuple[float, dict, str]:
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines or not lines[-1].startswith("RSS "):
        raise SystemExit(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = json.loads(lines[-1][4:])
    if rss["rc"]:
        raise SystemExit(f"{args} exited {rss['rc']}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, rss, proc.stdout


def tokens_of(store: Path) -> int:
    m = json.loads((store / "web" / "manifest.json").read_text())
    return m["splits"]["train"]["tokens"] + m["splits"]["eval"]["tokens"]


PIPE = r"""
import json, sys, time
from llama4_jax.data import ByteTokenizer, Source, build_mixture
spec = Source(kind="text", path=sys.argv[1], split="paragraph", eval_fraction=0.001)
it = build_mixture({"web": spec}, ByteTokenizer(), seed=0, seq_len=512, global_batch=8,
                   store_dir=sys.argv[2], prefetch=0, log=None)
next(it)
n, t = 0, time.perf_counter()
while time.perf_counter() - t < 10:
    next(it); n += 1
dt = time.perf_counter() - t
print(json.dumps({"batches": n, "tokens_per_s": n * 8 * 512 / dt, "records": it.read_stats()["records"]}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--small-mb", type=float, default=20.0)
    p.add_argument("--workdir", default="/tmp/bench_data")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    out: dict = {"host": f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"}
    try:
        t = time.monotonic()
        big_bytes = generate(root / "big", int(args.gb * 1e9), 0)
        small_bytes = generate(root / "small", int(args.small_mb * 1e6), 1)
        out["corpus"] = {"big_bytes": big_bytes, "small_bytes": small_bytes, "generate_s": time.monotonic() - t}
        exps = {}
        for name in ("big", "small"):
            for workers in ((1, 2) if name == "big" else (1,)):
                store = root / f"store-{name}-w{workers}"
                exp = root / f"{name}-w{workers}.yaml"
                exp.write_text(EXPERIMENT.format(store=store, corpus=root / name))
                exps[name, workers] = exp
                _, rss, _ = run_cli([str(exp), str(workers)], env, PREPARE)
                tokens = tokens_of(store)
                out[f"prepare_{name}_w{workers}"] = {
                    "seconds": rss["seconds"], "tokens": tokens, "tokens_per_s": tokens / rss["seconds"],
                    "peak_rss_mb": rss["self_kb"] / 1024, "worker_peak_rss_mb": rss["children_kb"] / 1024}
                print(name, workers, out[f"prepare_{name}_w{workers}"], file=sys.stderr, flush=True)
        _, rss, _ = run_cli([str(exps["big", 1]), "1"], env, PREPARE)
        out["prepare_big_rerun"] = {"seconds": rss["seconds"], "shards_written": rss["written"]}
        shutil.rmtree(root / "store-big-w2")  # disk: the two stores are identical
        for name in ("big", "small"):
            wall, rss, _ = run_cli(["train", str(exps[name, 1]), "--workdir", str(root / f"run-{name}")], env)
            out[f"train20_{name}"] = {"wall_s": wall, "peak_rss_mb": rss["self_kb"] / 1024}
            print("train", name, out[f"train20_{name}"], file=sys.stderr, flush=True)
        out["train20_rss_delta_mb"] = out["train20_big"]["peak_rss_mb"] - out["train20_small"]["peak_rss_mb"]
        pipe = subprocess.run([sys.executable, "-c", PIPE, str(root / "big"), str(root / "store-big-w1")],
                              env=env, capture_output=True, text=True, check=True)
        out["pipeline"] = json.loads(pipe.stdout.strip().splitlines()[-1])
        bench = subprocess.run([sys.executable, "-m", "llama4_jax", "bench", str(REPO / "experiments" / "bench_cpu.yaml"),
                                "--steps", "2", "--warmup", "1", "--json"], env=env, capture_output=True, text=True, check=True)
        step = json.loads(bench.stdout.strip().splitlines()[-1])
        out["bench_cpu_step"] = {k: v for k, v in step.items() if "tok" in k or "step" in k}
        step_tps = next(v for k, v in step.items() if k in ("tokens_per_s", "ours_tokens_per_s"))
        out["pipeline_over_step"] = out["pipeline"]["tokens_per_s"] / step_tps
        out["host_end"] = f"load average at end {os.getloadavg()[0]:.1f}"
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
