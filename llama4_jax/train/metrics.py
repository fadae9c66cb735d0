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


def published_peak(device_kind: str, compute_dtype: str, fp8: bool = False) -> tuple[float, str] | None:
    """(dense peak FLOP/s per chip, its label) from PUBLISHED_PEAKS, or None for an unknown chip.
    An FP8 run's matmuls run at the chip's FP8 rate, so MFU is taken against that peak where the
    chip has one (else against the compute dtype's, and the label says so)."""
    kind = device_kind.lower()
    wanted = ["float8", compute_dtype] if fp8 else [compute_dtype]
    for dt in wanted:
        for (name, table_dt), peak in PUBLISHED_PEAKS.items():
            if name in kind and table_dt == dt:
                note = " (FP8 run; this chip has no FP8 peak listed)" if fp8 and dt != "float8" else ""
                return peak, f"published {device_kind} {dt}{note}"
    return None


def device_peak_flops(compute_dtype: str, fp8: bool = False) -> tuple[float, str]:
    """(peak FLOP/s per device, how it was obtained); `fp8`: the run's matmuls use FP8."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_peak_flops(), "measured (f32 matmul)"
    got = published_peak(dev.device_kind, compute_dtype, fp8)
    if got is not None:
        return got
    return measure_peak_flops(4096), f"measured on {dev.device_kind}"


def _scalar(v) -> int | float | list:
    """Counts (stage_index, skipped_steps) stay JSON integers; everything else is a float; a
    vector (a source's load over experts) is a list of them."""
    a = np.asarray(v)
    if a.ndim:
        return [_scalar(x) for x in a]
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

    def write(self, step: int, scalars: dict, histograms: dict | None = None, images: dict | None = None) -> None:
        """One metrics.jsonl row of `scalars` (strings, numbers, vectors as lists; TensorBoard gets
        the numbers as scalars), plus TensorBoard-only histograms and HxWx3 uint8 images."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            row[k] = v if isinstance(v, str) else _scalar(v)
            if self.tb is not None and isinstance(row[k], (int, float)):
                self.tb.add_scalar(k, row[k], step)
        self.jsonl.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in (histograms or {}).items():
                self.tb.add_histogram(k, np.asarray(v), step)
            for k, img_HxWx3 in (images or {}).items():
                self.tb.add_image(k, img_HxWx3, step, dataformats="HWC")

    def text(self, tag: str, value: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
