"""`llama4-jax` command line: train | data | convert | generate | eval | quantize | prune | bench.

User mistakes (bad YAML, missing files, impossible meshes, bad checkpoints) print one line on
stderr and exit 2; internal failures keep their traceback and exit 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax


from .bench.step import main as bench_main
from .compress.cli import add_parsers as add_compress_parsers
from .config import load_experiment
from .convert.hf import from_hf, to_hf
from .data import store as data_store
from .data.store_view import inspect_store
from .errors import RunError, UserError
from .evals.cli import add_parser as add_eval_parser
from .infer.cli import add_arguments as add_generate_arguments, generate_main
from .parallel import distributed
from .parallel.hostmem import tune_host_allocator
from .train.compile_plan import compiled_memory, describe as describe_compiled
from .train.loop import train_loop
from .train.run import Run, build_tokenizer, store_dir

USER_ERROR = 2


def _cmd_convert(args) -> int:
    if args.direction == "from-hf":
        cfg = from_hf(args.src, args.dst)
    else:
        cfg = to_hf(args.src, args.dst)
    print(f"wrote {args.dst} ({cfg.num_layers} layers, {cfg.moe.num_experts} experts)")
    return 0


def _cmd_train(args) -> int:
    if args.compile and not args.dry_run:
        raise RunError("--compile plans memory: use it with --dry-run")
    run = Run(args.experiment, overrides=args.overrides, workdir=args.workdir, resume=args.resume,
              plan_only=args.dry_run)
    if args.dry_run:
        print(run.describe(), flush=True)
        if args.compile:
            devices = math.prod(run.mesh_sizes.values())
            mem = compiled_memory(args.experiment, args.overrides, devices, args.compile_timeout)
            print("\n".join(describe_compiled(mem, run.exp.mesh.device_memory_gb, jax.devices()[0].device_kind)))
        return 0
    if jax.process_count() > 1:  # each process says who it is: the first line to look for in a job's logs
        print(f"llama4-jax: {run.processes}", flush=True)
    with distributed.fail_fast(passthrough=(UserError,)):
        return train_loop(run)


def _cmd_data(args) -> int:
    if args.action == "inspect":
        inspect_store(args.dir, rows=args.rows, seq_len=args.seq_len)
        return 0
    if args.beam_args and args.runner != "beam":
        raise RunError(f"pipeline options {' '.join(args.beam_args)} given without --runner beam")
    exp = load_experiment(args.experiment, args.overrides)
    out = Path(args.out) if args.out else store_dir(exp.data, Path("runs") / exp.name)
    reports = data_store.prepare_store(exp.data.sources, build_tokenizer(exp.data), out,
                                       workers=args.workers or exp.data.workers, show_progress=True,
                                       log=lambda msg: print(msg, flush=True), runner=args.runner,
                                       beam_args=args.beam_args)
    for report in reports:
        print(data_store.describe_report(report))
    print(f"token store: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama4-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment YAML")
    t.add_argument("experiment", help="path to an experiment YAML (see experiments/)")
    t.add_argument("--workdir", default=None, help="run directory (default: runs/<experiment name>)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable)")
    t.add_argument("--resume", choices=["auto", "never"], default="auto")
    t.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    t.add_argument("--compile", action="store_true",
                   help="with --dry-run: compile the real train step (fake devices on CPU) and print XLA's "
                        "per-device memory and the verdict against the budget")
    t.add_argument("--compile-timeout", type=float, default=600, metavar="S",
                   help="give up compiling after S seconds (default 600)")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("data", help="prepare or inspect a token store (llama4-jax data prepare|inspect)")
    dsub = d.add_subparsers(dest="action", required=True)
    dp = dsub.add_parser("prepare", help="tokenize an experiment's sources into a token store")
    dp.add_argument("experiment", help="path to an experiment YAML")
    dp.add_argument("--out", default=None, help="store directory (default: data.store_dir, "
                    "<data.cache_dir>/store, else runs/<name>/data-cache, where training looks)")
    dp.add_argument("--workers", type=int, default=None, help="processes over input files (default data.workers)")
    dp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    dp.add_argument("--runner", choices=["local", "beam"], default="local",
                    help="local processes (default) or an Apache Beam pipeline (the [beam] extra); "
                         "Beam pipeline options follow a `--`")
    dp.set_defaults(beam_args=[])  # what follows `--`: Beam pipeline options (see main)
    di = dsub.add_parser("inspect", help="a store's manifest and sample decoded rows per source")
    di.add_argument("dir", help="token store directory")
    di.add_argument("--rows", type=int, default=2, help="sample rows per source (default 2)")
    di.add_argument("--seq-len", type=int, default=256, help="tokens per sample row (default 256)")
    d.set_defaults(func=_cmd_data)

    c = sub.add_parser("convert", help="convert checkpoints to/from Hugging Face")
    c.add_argument("direction", choices=["from-hf", "to-hf"])
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=_cmd_convert)

    g = sub.add_parser("generate", help="generate text with a KV cache, streaming to stdout")
    add_generate_arguments(g)
    g.set_defaults(func=generate_main)

    add_eval_parser(sub)  # llama4_jax/evals/cli.py
    add_compress_parsers(sub)  # quantize, prune: llama4_jax/compress/cli.py

    sub.add_parser("bench", help="benchmark an experiment's train step (llama4-jax bench --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    tune_host_allocator()  # before JAX allocates: large host buffers are reused, not re-faulted
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # its own parser: see llama4_jax/bench/step.py
            return bench_main(argv[1:])
        extra = []
        if argv[:2] == ["data", "prepare"] and "--" in argv:  # Beam's own options, passed through
            argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        args = build_parser().parse_args(argv)
        if extra:
            args.beam_args = extra
        return args.func(args)
    except UserError as e:
        print(f"llama4-jax: error: {e}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
