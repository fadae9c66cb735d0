"""Parameter counts and training FLOPs per token of a model preset.

    python tools/param_count.py scout --seq-len 8192

Prints total parameters, active parameters per token (everything except the routed experts a
token is not sent to; embedding and lm head included) and training FLOPs per token:

    6 · N_matmul + Σ_layers 12 · heads · head_dim · keys_per_query
    keys_per_query = min(L, chunk) / 2 on chunked (RoPE) layers, L / 2 on global (NoPE) layers

where N_matmul is the active count without the embedding gather and the norm scales. The formula
lives in `llama4_jax/model/flops.py` (the trainer's MFU uses the same function). Pure arithmetic:
nothing is allocated, so the 400B preset counts instantly.
"""

from __future__ import annotations

import argparse
import sys

from llama4_jax.model.config import PRESETS, preset
from llama4_jax.model.flops import flops_per_token, param_counts

FLOP_UNITS = ("T", "G", "M", "K")


def _human(n: float, units=("T", "B", "M", "K")) -> str:
    for unit, div in zip(units, (1e12, 1e9, 1e6, 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--seq-len", type=int, default=8192, help="sequence length for the attention FLOPs")
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    total, active = param_counts(cfg)
    fl = flops_per_token(cfg, args.seq_len)
    print(f"preset            {args.preset}")
    print(f"total params      {total:,} ({_human(total)})")
    print(f"active params     {active:,} ({_human(active)}) per token")
    print(f"train FLOPs/token {fl:.4g} ({_human(fl, FLOP_UNITS)}FLOP) at seq_len {args.seq_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
