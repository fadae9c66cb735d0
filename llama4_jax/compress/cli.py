"""`llama4-jax quantize awq SOURCE OUT` and `llama4-jax prune SOURCE OUT` (docs/compress.md).

Everything a user can get wrong (source, calibration data, group size, counts) is checked
before the output is written; the output directory appears whole or not at all."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from ..model.quant import QuantSpec
from ..model.store import config_to_dict, model_from_flat, save_params
from .awq import AWQConfig, awq_quantize
from .autoawq import write_autoawq
from .calib import calib_tokens
from .int4 import check_model, param_bytes, quantize_flat
from .io import CompressError, atomic_dir, check_out, load_float
from .prune import PruneSpec, check_prune, prune_model


OVERRIDES_FILE = "model_overrides.yaml"  # JSON is YAML


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None, metavar="DATA",
                   help="calibration data: a .txt or .jsonl file, or a training run (default: SOURCE, if a run)")
    p.add_argument("--calib-rows", type=int, default=32, metavar="N", help="calibration rows (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration row length (default 256)")


def add_parsers(sub) -> None:
    q = sub.add_parser("quantize", help="int4 weights: AWQ (or round to nearest) → a quantized checkpoint")
    q.add_argument("method", choices=["awq"])
    q.add_argument("source", help="HF directory, params checkpoint or training run (float weights)")
    q.add_argument("out", help="output params directory (must not exist or be empty)")
    _calib_args(q)
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4])
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--rtn", action="store_true", help="round to nearest, no activation-aware scaling (baseline)")
    q.add_argument("--no-clip", action="store_true", help="skip AWQ's clipping search")
    q.add_argument("--head", action="store_true", help="quantize the lm head too")
    q.add_argument("--autoawq", default=None, metavar="DIR", help="also write an HF directory in AutoAWQ's gemm layout")
    q.set_defaults(func=quantize_main)

    p = sub.add_parser("prune", help="structured pruning: experts, FFN width, layers → a smaller float model")
    p.add_argument("source", help="HF directory, params checkpoint or training run")
    p.add_argument("out", help="output params directory (must not exist or be empty)")
    _calib_args(p)
    p.add_argument("--experts", type=int, default=None, metavar="N", help="routed experts kept per MoE layer")
    p.add_argument("--ffn-keep", type=float, default=None, metavar="F",
                   help="fraction of FFN channels kept (dense, shared and routed experts)")
    p.add_argument("--drop-layers", type=int, default=0, metavar="K", help="drop the K least influential layers")
    p.set_defaults(func=prune_main)


def _copy_tokenizer(src, tmp: Path) -> None:
    if src.tokenizer_file is not None:
        shutil.copy(src.tokenizer_file, tmp / "tokenizer.json")


def quantize_main(args) -> int:
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, head=args.head, method="rtn" if args.rtn else "awq")
    out = check_out(args.out)
    if args.autoawq:
        check_out(args.autoawq)
        if spec.bits != 4:
            raise CompressError(f"--autoawq: AutoAWQ's gemm layout stores 4-bit codes, not {spec.bits}")
    src = load_float(args.source)
    check_model(src.cfg, src.flat, spec)
    if spec.method == "rtn":
        qflat = quantize_flat(src.cfg, src.flat, spec)
    else:
        tokens = calib_tokens(args.source, args.calib, args.calib_rows, args.seq_len)
        model = model_from_flat(src.cfg, src.flat, replace(src.rt, moe=replace(src.rt.moe, dispatch="dropless")))
        qflat = awq_quantize(model, src.flat, tokens, spec, AWQConfig(clip=not args.no_clip))
    rt = src.rt.replace(quant=spec, param_dtype="float32")
    with atomic_dir(out) as tmp:
        save_params(tmp, src.cfg, qflat, rt=rt, tokens=src.tokens)
        _copy_tokenizer(src, tmp)
    if args.autoawq:
        with atomic_dir(args.autoawq) as tmp:
            write_autoawq(tmp, src.cfg, qflat, spec, src.tokens)
    ratio = param_bytes(qflat) / param_bytes({k: v.astype("float32") for k, v in src.flat.items()})
    print(f"wrote {out} ({spec.method} w{spec.bits} g{spec.group_size}; parameter bytes {ratio:.3f} of float32)"
          + (f" and {args.autoawq}" if args.autoawq else ""), file=sys.stderr)
    return 0


def prune_main(args) -> int:
    spec = PruneSpec(experts=args.experts, ffn_keep=args.ffn_keep, drop_layers=args.drop_layers)
    out = check_out(args.out)
    src = load_float(args.source)
    check_prune(src.cfg, spec)
    tokens = calib_tokens(args.source, args.calib, args.calib_rows, args.seq_len)
    model = model_from_flat(src.cfg, src.flat, replace(src.rt, moe=replace(src.rt.moe, dispatch="dropless")))
    cfg, flat = prune_model(model, src.flat, tokens, spec)
    with atomic_dir(out) as tmp:
        save_params(tmp, cfg, flat, rt=src.rt, tokens=src.tokens)
        _copy_tokenizer(src, tmp)
        # what a recovery run's `model.overrides` must say (init_from refuses another architecture)
        (tmp / OVERRIDES_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1) + "\n")
    n0, n1 = (sum(v.size for k, v in f.items() if not k.endswith("ffn.bias")) for f in (src.flat, flat))
    print(f"wrote {out} ({cfg.num_layers} layers, {cfg.moe.num_experts} experts, expert_ff {cfg.moe.expert_ff}, "
          f"dense_ff {cfg.dense_ff}; {n1:,} of {n0:,} parameters, {n1 / n0:.1%})", file=sys.stderr)
    return 0
