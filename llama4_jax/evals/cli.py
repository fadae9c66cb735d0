"""`llama4-jax eval SOURCE --tasks a,b [--limit N] [--batch-size B] [--output F.json]`
and `llama4-jax eval RUN --perplexity`: lm-evaluation-harness tasks, or per-source perplexity of
a training run's held-out data. Prints a table, writes JSON.

lm-eval is an optional extra and slow to import (seconds), so nothing here imports it at module
level: the `llama4-jax` entry point stays fast for every other command. The adapter class (whose
module must import lm-eval to subclass its LM) is reached through lm-eval's own model registry,
by name, the way lm-eval loads its own backends lazily.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path

from ..errors import EvalError
from .loading import load_model, load_tokenizer
from .perplexity import held_out_of_run, source_perplexity
from .tasks import local_task_names, task_manager

MODEL_NAME = "llama4_jax"
ADAPTER = "llama4_jax.evals.lm_adapter:Llama4LM"


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="evaluate a model with lm-evaluation-harness tasks, or a run's held-out perplexity")
    e.add_argument("source", help="HF directory, converted checkpoint, or training run (workdir / checkpoints / step)")
    e.add_argument("--tasks", default=None, help=f"comma-separated lm-eval tasks (shipped offline: {', '.join(local_task_names())})")
    e.add_argument("--perplexity", action="store_true", help="per-source loss / perplexity on a training run's held-out split")
    e.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    e.add_argument("--batch-size", type=int, default=None, help="requests per batch (default 8; --perplexity: the run's last stage)")
    e.add_argument("--tokenizer", default=None, help="tokenizer.json or .model (default: beside the weights, the run's, or bytes)")
    e.add_argument("--max-length", type=int, default=None, help="context length (default: the model's max_position_embeddings)")
    e.add_argument("--seq-len", type=int, default=None, help="--perplexity row length (default: the run's last stage)")
    e.add_argument("--max-batches", type=int, default=None, help="--perplexity batches per source (default: the run's eval.batches)")
    e.add_argument("--output", default=None, help="write the results as JSON here")
    e.set_defaults(func=run)
    return e


def _check_tasks(names: list[str], tm) -> None:
    known = set(tm.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, local_task_names() + sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EvalError(f"unknown task {name!r}{hint}; shipped offline: {', '.join(local_task_names())}")


def _adapter_class():
    from lm_eval.api.registry import get_model, model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ADAPTER)
    return get_model(MODEL_NAME)


def _run_tasks(args) -> dict:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise EvalError("--tasks is empty")
    tm = task_manager()
    _check_tasks(names, tm)
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    lm = _adapter_class()(source=args.source, tokenizer_path=args.tokenizer, batch_size=args.batch_size or 8,
                          max_length=args.max_length)
    # Code tasks are marked unsafe in their YAML; ours run generated code in evals/sandbox.py.
    res = lm_eval.simple_evaluate(model=lm, tasks=names, limit=args.limit, task_manager=tm,
                                  confirm_run_unsafe_code=True)
    print(make_table(res))
    keep = ("results", "versions", "n-shot", "higher_is_better", "n-samples")
    return json.loads(json.dumps({k: res[k] for k in keep if k in res}, default=handle_non_serializable))


def _run_perplexity(args) -> dict:
    held = held_out_of_run(args.source, seq_len=args.seq_len, batch_size=args.batch_size,
                           max_batches=args.max_batches)
    rows = source_perplexity(load_model(args.source), load_tokenizer(args.source, args.tokenizer), held)
    print(f"{'source':<24} {'loss':>10} {'perplexity':>12} {'tokens':>10}")
    for r in rows:
        print(f"{r.source:<24} {r.loss:>10.4f} {r.perplexity:>12.3f} {r.tokens:>10d}")
    return {"perplexity": {r.source: r.to_dict() for r in rows},
            "shape": {"seq_len": held.seq_len, "batch_size": held.batch_size, "max_batches": held.max_batches}}


def run(args) -> int:
    if not Path(args.source).exists():
        raise EvalError(f"{args.source}: no such model source (an HF directory, a converted checkpoint or a training run)")
    if bool(args.tasks) == bool(args.perplexity):
        raise EvalError("give --tasks a,b or --perplexity (one of them)")
    # Every dataset is a local file: never let datasets / huggingface_hub try the network.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = _run_perplexity(args) if args.perplexity else _run_tasks(args)
    out = {"source": str(args.source), **out}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=1, sort_keys=True))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
