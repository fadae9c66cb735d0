"""Writes the synthetic DTMF audio-text set (llama4_jax/data/tones.py) that
experiments/audio_tiny*.yaml train on.

    PYTHONPATH=. python tools/make_tones.py data/tones [--n 4000] [--seed 0] [--sample-rate 8000]
"""

from __future__ import annotations

import argparse

from llama4_jax.data.tones import write_tones


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-rate", type=int, default=8000)
    ap.add_argument("--digit-seconds", type=float, default=0.128)
    args = ap.parse_args()
    out = write_tones(args.out, args.n, seed=args.seed, sample_rate=args.sample_rate,
                      digit_seconds=args.digit_seconds)
    print(f"wrote {args.n} clips and transcripts under {out}")


if __name__ == "__main__":
    main()
