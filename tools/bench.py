"""Benchmark the train step of an experiment (same as `llama4-jax bench`).

    python tools/bench.py experiments/bench_cpu.yaml --peer hf
    python tools/bench.py --json
"""

import sys

from llama4_jax.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
