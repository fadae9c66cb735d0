"""Preemption and checkpoint-on-demand signals, agreed between processes.

SIGTERM/SIGINT end the run after the current step with a checkpoint (exit 0); SIGUSR1 asks for a
checkpoint and carries on; `LLAMA4_JAX_STOP_AT_STEP=k` (tests, debugging) acts like a SIGTERM
right after global step k.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

STOP_ENV = "LLAMA4_JAX_STOP_AT_STEP"  # tests/debugging: behave as if preempted after this global step


class Preemption:
    """SIGTERM/SIGINT: finish the step, save, wait for the save, exit 0. A second SIGINT aborts
    at once (os._exit: no save; the last complete checkpoint stays the one to resume from).
    SIGUSR1: save a checkpoint after this step and carry on (checkpoint on demand)."""

    def __init__(self):
        self.requested = False
        self.save_requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR1:
            self.save_requested = True
            return
        if self.requested and signum == signal.SIGINT:
            print("llama4-jax: second interrupt, aborting without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print(f"llama4-jax: {signal.Signals(signum).name} received; saving a checkpoint after this step "
              "(interrupt again to abort without saving)", file=sys.stderr, flush=True)

    def agree(self) -> None:
        """With several processes, a request any of them received holds for all (signals reach
        processes at different steps; saving is collective, so they must stop at the same one)."""
        if jax.process_count() == 1:
            return
        mine = np.array([self.requested, self.save_requested], np.int32)
        req, save = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2).max(axis=0)
        self.requested, self.save_requested = bool(req), bool(save)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stop_at_step() -> int | None:
    v = os.environ.get(STOP_ENV)
    return int(v) if v else None
