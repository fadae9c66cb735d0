"""Compression benchmark: the bench_cpu shape trained with the quickstart recipe, then AWQ w4,
RTN w4 and structured pruning (−25 % / −40 % parameters) before and after recovery, and the
control for recovery: the unpruned model given the same recovery stage (so the reader can tell
recovery from extra training). Per model: held-out perplexity per source, an lm-eval task run
through the project's adapter (evals/lm_adapter.py; default the offline `l4j_mmlu_mini`:
accuracy, the mean log-probability of the gold choice among the four, and how often the model
picks what f32 picks), parameter bytes, greedy decode ms/token.

    PYTHONPATH=$PWD nice python tools/bench_compress.py --workdir runs/bench_compress [--steps 60]

Every step runs through the CLI (`train`, `quantize awq`, `prune`) as a user would; results go
to <workdir>/results.json and markdown tables on stdout (BENCHMARKS.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama4_jax.compress.int4 import param_bytes  # noqa: E402
from llama4_jax.evals.loading import load_model, load_tokenizer  # noqa: E402
from llama4_jax.evals.perplexity import held_out_of_run, source_perplexity  # noqa: E402
from llama4_jax.evals.tasks import task_manager  # noqa: E402
from llama4_jax.infer.generate import generate_ids  # noqa: E402
from llama4_jax.model.store import load_any  # noqa: E402


def cli(*args):
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llama4_jax", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - t


def experiment(steps: int, model_overrides: dict, extra: dict | None = None) -> dict:
    exp = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    exp["model"] = {"preset": "bench_cpu", "overrides": model_overrides}
    exp["optimizer"]["lr"] = 1.0e-3  # the bench_cpu width (256) wants a lower peak than tiny's 3e-3
    ov = exp["curriculum"]["overrides"]
    for stage in ("base", "domain", "long_tail"):
        ov[stage]["steps"] = steps
    exp["checkpoint"] = {"every_steps": 10**6, "keep_last": 1, "keep_stage_final": False, "async_save": False}
    exp["logging"] = {"every_steps": 20, "tensorboard": False, "progress": False}
    exp["eval"] = {"every_steps": 0, "batches": 4}
    exp.update(extra or {})
    return exp


def perplexity(model_dir: Path, run: Path, batches: int = 8) -> dict:
    model = load_model(model_dir)
    tok = load_tokenizer(run)
    res = source_perplexity(model, tok, held_out_of_run(run, seq_len=128, batch_size=8, max_batches=batches))
    total = sum(r.loss * r.tokens for r in res) / sum(r.tokens for r in res)
    return {"ppl": math.exp(total), **{r.source: r.perplexity for r in res}}


def lm_eval_task(model_dir: Path, run: Path, task: str) -> dict:
    """One lm-eval task through Llama4LM, offline: accuracy, the mean log-probability of the gold
    choice normalised over the choices (more sensitive than accuracy on a small model), and the
    choices made (compared with f32's by the caller)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    from llama4_jax.evals.lm_adapter import Llama4LM

    lm = Llama4LM(load_model(model_dir), load_tokenizer(run), batch_size=8)
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager(), log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    gold_lp, picks = [], []
    for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
        ll = np.array([float(r[0]) for r in s["filtered_resps"]])
        gold_lp.append(float(ll[int(s["target"])] - np.logaddexp.reduce(ll)))
        picks.append(int(np.argmax(ll)))
    return {"task": task, "acc": float(res["results"][task]["acc,none"]), "n": len(picks),
            "gold_logprob": float(np.mean(gold_lp)), "picks": picks}


def decode_ms(model_dir: Path, n: int = 64) -> float:
    model = load_model(model_dir)
    prompt = [list(b"def main():\n    ")]
    generate_ids(model, prompt, n)  # compile
    t = time.perf_counter()
    generate_ids(model, prompt, n)
    return 1000 * (time.perf_counter() - t) / n


def params_of(model_dir: Path) -> tuple[int, int]:
    _, flat, _ = load_any(model_dir)
    n = sum(int(np.prod(v.shape)) for k, v in flat.items() if not k.endswith("ffn.bias"))
    return n, param_bytes({k: np.asarray(v) for k, v in flat.items()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_compress")
    ap.add_argument("--steps", type=int, default=60, help="steps per quickstart stage (quickstart: 60)")
    ap.add_argument("--recover-steps", type=int, default=60)
    ap.add_argument("--prune", default="10,6", help="experts kept for the two pruning points")
    ap.add_argument("--task", default="l4j_mmlu_mini", help="lm-eval task (offline; evals/tasks/)")
    ap.add_argument("--ppl-batches", type=int, default=8, help="held-out batches of 8 x 128 per source")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode timing (a compile per model)")
    args = ap.parse_args()
    w = args.workdir.absolute()
    w.mkdir(parents=True, exist_ok=True)
    timings = {}
    base = w / "base"
    if not (base / "checkpoints").is_dir():
        (w / "base.yaml").write_text(yaml.safe_dump(experiment(args.steps, {"vocab_size": 8192})))
        timings["train"] = cli("train", w / "base.yaml", "--workdir", base)
    rows = {}
    results = w / "results.json"

    def measure(name: str, d: Path) -> None:
        n, b = params_of(d)
        rows[name] = {"params": n, "quantized": (d / "quantization.json").is_file(), "bytes": b, **perplexity(d, base, args.ppl_batches),
                      "eval": lm_eval_task(d, base, args.task),
                      "decode_ms_per_token": None if args.no_decode else decode_ms(d)}
        print(name, rows[name], flush=True)
        results.write_text(json.dumps({"rows": rows, "timings_s": timings}, indent=1))

    measure("f32", base)
    for name, extra in (("awq_w4", []), ("rtn_w4", ["--rtn"])):
        if not (w / name).is_dir():
            timings[name] = cli("quantize", "awq", base, w / name, "--calib-rows", "32", "--seq-len", "256", *extra)
        measure(name, w / name)
    keeps = [int(k) for k in args.prune.split(",")]
    for keep in keeps:
        name = f"pruned_e{keep}"
        if not (w / name).is_dir():
            timings[name] = cli("prune", base, w / name, "--experts", keep, "--calib-rows", "32", "--seq-len", "256")
        measure(name, w / name)

    def recover(name: str, init: Path, overrides: dict) -> None:
        """`init` given the recovery stage (curriculum/recover.yaml) through `llama4-jax train`."""
        rec = w / f"{name}_recovered"
        if not (rec / "checkpoints").is_dir():
            exp = experiment(args.steps, overrides, {"init_from": str(init)})
            exp["curriculum"] = {"include": "recover", "overrides": {"recover": {
                "steps": args.recover_steps, "seq_len": 128, "batch_size": 8}}}
            (w / f"{name}_recover.yaml").write_text(yaml.safe_dump(exp))
            timings[name + "_recover"] = cli("train", w / f"{name}_recover.yaml", "--workdir", rec)
        measure(name + "_recovered", rec)

    if args.recover_steps:
        recover("f32", base, {"vocab_size": 8192})  # the control: no pruning, the same extra steps
        for keep in keeps:
            name = f"pruned_e{keep}"
            recover(name, w / name, json.loads((w / name / "model_overrides.yaml").read_text()))
    f = rows["f32"]
    ctrl = rows.get("f32_recovered")
    print(f"| model | params | bytes vs f32 | held-out ppl | vs f32 | vs f32 + recovery | {args.task} acc | "
          "gold log-p | same pick as f32 | decode ms/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        vs_ctrl = f"{r['ppl'] / ctrl['ppl'] - 1:+.1%}" if ctrl and name.endswith("_recovered") else "—"
        e, same = r["eval"], np.mean(np.array(r["eval"]["picks"]) == np.array(f["eval"]["picks"]))
        params = "packed" if r["quantized"] else f"{r['params']:,} ({r['params'] / f['params']:.0%})"
        print(f"| {name} | {params} | {r['bytes'] / f['bytes']:.3f} | "
              f"{r['ppl']:.3f} | {r['ppl'] / f['ppl'] - 1:+.2%} | {vs_ctrl} | {e['acc']:.2f} ({e['n']}) | "
              f"{e['gold_logprob']:.3f} | {same:.0%} | {r['decode_ms_per_token'] or float('nan'):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
