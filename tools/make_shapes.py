"""Writes the synthetic shapes image-text set (llama4_jax/data/shapes.py) that
experiments/multimodal_tiny*.yaml train on.

    PYTHONPATH=. python tools/make_shapes.py data/shapes [--n 4000] [--seed 0] [--size 32]
"""

from __future__ import annotations

import argparse

from llama4_jax.data.shapes import write_shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    out = write_shapes(args.out, args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} images and captions under {out}")


if __name__ == "__main__":
    main()
