"""Where metrics go: TensorBoard event files (tensorboardX), metrics.jsonl, a progress bar.

Floats are written to metrics.jsonl with Python's shortest round-trip repr, so two runs can be
compared bit for bit. Only process 0 writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def measure_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Sustained matmul FLOP/s of this host's default device, measured on a large f32 matmul."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# Published dense peaks (FLOP/s) per chip for the compute dtype, used off-CPU.
PUBLISHED_PEAKS = {
    ("h100", "bfloat16"): 989e12, ("h100", "float8"): 1979e12, ("h200", "bfloat16"): 989e12,
    ("h200", "float8"): 1979e12, ("a100", "bfloat16"): 312e12, ("tpu v5p", "bfloat16"): 459e12,
    ("tpu v5 lite", "bfloat16"): 197e12, ("tpu v4", "bfloat16"): 275e12, ("tpu v6", "bfloat16"): 918e12,
}


def device_peak_flops(compute_dtype: str) -> tuple[float, str]:
    """(peak FLOP/s per device, how it was obtained)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_peak_flops(), "measured (f32 matmul)"
    kind = dev.device_kind.lower()
    for (name, dt), peak in PUBLISHED_PEAKS.items():
        if name in kind and dt == compute_dtype:
            return peak, f"published {dev.device_kind} {dt}"
    return measure_peak_flops(4096), f"measured on {dev.device_kind}"


def _scalar(v) -> int | float:
    """Counts (stage_index, skipped_steps) stay JSON integers; everything else is a float."""
    a = np.asarray(v)
    return int(a) if np.issubdtype(a.dtype, np.integer) else float(a)


class MetricsWriter:
    def __init__(self, workdir: Path, tensorboard: bool = True, enabled: bool = True, resumed_at: int = 0):
        """`resumed_at`: the step restored from a checkpoint. Events a previous session logged
        after it (a run killed after its last checkpoint) are purged by TensorBoard's readers, as
        `metrics.jsonl` rows are trimmed, so the curves read like one uninterrupted run."""
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = {"purge_step": resumed_at + 1} if resumed_at > 0 else {}
            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"), flush_secs=10, **purge)
        self.jsonl = open(Path(workdir) / "metrics.jsonl", "a", buffering=1)

    def write(self, step: int, scalars: dict, histograms: dict | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            row[k] = v if isinstance(v, str) else _scalar(v)
            if self.tb is not None and not isinstance(v, str):
                self.tb.add_scalar(k, row[k], step)
        self.jsonl.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in (histograms or {}).items():
                self.tb.add_histogram(k, np.asarray(v), step)

    def text(self, tag: str, value: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
