"""Training throughput between two log rows, with eval and checkpoint time kept out of it.

The train step runs asynchronously: its time shows up wherever the host next waits for the device.
So the clock measures wall time since the window opened and subtracts the side phases (eval,
checkpoint save calls), whose callers first wait for the pending steps (`TrainClock.side`), so
that no training work is charged to them. Data loading and dispatch count as training: they are
part of every step. Each side phase's own time is reported as `time/<phase>_s` in the next row.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import jax


class TrainClock:
    def __init__(self):
        self._since: float | None = None  # None: no window open (before a stage's first step ends)
        self._excluded = 0.0  # side-phase seconds inside the open window
        self._side: dict[str, float] = {}  # side-phase seconds since the last row, by phase
        self.tokens = 0

    def restart(self) -> None:
        """Open a new window now (after a stage's first step, whose time is its compilation)."""
        self._since, self._excluded, self.tokens = time.perf_counter(), 0.0, 0

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    @contextmanager
    def side(self, phase: str, wait_for=None):
        """Time spent in here is not training. `wait_for` (device arrays) is waited on first,
        outside the phase: the pending train steps finish on the training clock."""
        if wait_for is not None:
            jax.block_until_ready(wait_for)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._excluded += dt
            self._side[phase] = self._side.get(phase, 0.0) + dt

    def row(self) -> tuple[float | None, dict[str, float]]:
        """(training tokens/s of the window, or None when it holds no timed step;
        {"time/<phase>_s": seconds} since the last row) and a new window from now."""
        now = time.perf_counter()
        tps = None
        if self._since is not None and self.tokens:
            tps = self.tokens / max(now - self._since - self._excluded, 1e-9)
        side = {f"time/{phase}_s": s for phase, s in self._side.items()}
        self._side = {}
        self._since, self._excluded, self.tokens = now, 0.0, 0
        return tps, side
