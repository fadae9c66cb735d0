"""Benchmark the train step of an experiment (same as `llama4-jax bench`).

    python tools/bench.py experiments/bench_cpu.yaml --peer hf
    python tools/bench.py --json
"""

import sys

from llama4_jax.parallel.hostmem import tune_host_allocator

tune_host_allocator()  # as the `llama4-jax` CLI does, before JAX starts (see llama4_jax/parallel/hostmem.py)

from llama4_jax.bench.step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
