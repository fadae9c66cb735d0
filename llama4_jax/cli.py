"""`llama4-jax` command line: train | eval | convert | generate | bench.

User mistakes (bad YAML, missing files, impossible meshes, bad checkpoints) print one line on
stderr and exit 2; internal failures keep their traceback and exit 1.
"""

from __future__ import annotations

import argparse
import sys

USER_ERROR = 2


class UserError(Exception):
    """Raised anywhere for a mistake the user can fix; the CLI prints str() and exits 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [UserError]
    for mod, name in (("llama4_jax.config", "ConfigError"), ("llama4_jax.convert.hf", "ConvertError"),
                      ("llama4_jax.data.sources", "DataError"), ("llama4_jax.train.checkpoint", "CheckpointError"),
                      ("llama4_jax.train.run", "RunError"),  # raised during training too (init_from)
                      ("llama4_jax.infer", "GenerateError")):
        try:
            module = __import__(mod, fromlist=[name])
            types.append(getattr(module, name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _cmd_convert(args) -> int:
    from .convert.hf import from_hf, to_hf

    if args.direction == "from-hf":
        cfg = from_hf(args.src, args.dst)
    else:
        cfg = to_hf(args.src, args.dst)
    print(f"wrote {args.dst} ({cfg.num_layers} layers, {cfg.moe.num_experts} experts)")
    return 0


def _cmd_train(args) -> int:
    from .train.run import train_main

    return train_main(args)


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
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("convert", help="convert checkpoints to/from Hugging Face")
    c.add_argument("direction", choices=["from-hf", "to-hf"])
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=_cmd_convert)

    from .infer.cli import add_arguments as add_generate_arguments, generate_main

    g = sub.add_parser("generate", help="generate text with a KV cache, streaming to stdout")
    add_generate_arguments(g)
    g.set_defaults(func=generate_main)

    sub.add_parser("bench", help="benchmark an experiment's train step (llama4-jax bench --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .hostmem import tune_host_allocator

    tune_host_allocator()  # before JAX allocates: large host buffers are reused, not re-faulted
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: see llama4_jax/benchmark.py
        from .benchmark import main as bench_main

        argv, func = argv[1:], bench_main
        try:
            return func(argv)
        except _user_error_types() as e:
            print(f"llama4-jax: error: {e}", file=sys.stderr)
            return USER_ERROR
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_error_types() as e:
        print(f"llama4-jax: error: {e}", file=sys.stderr)
        return USER_ERROR
    except FileNotFoundError as e:
        print(f"llama4-jax: error: {e}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
