"""Orbax checkpoints holding everything needed to continue a run exactly.

Each step directory `checkpoints/<step>/` has three items:
  - `state`: the TrainState pytree (params, optimizer state, router biases, FP8 scales, step,
    non-finite counters), saved asynchronously; restored onto whatever mesh the run has now
    (the abstract target carries the current shardings, Orbax reshards);
  - `data`: the data iterator's state as JSON (source cursors, step, stage shape, weights);
  - `meta`: JSON — curriculum stage and position, long-tail sampler state and pending loss
    sums, model config, resolved experiment.

Why the data state is JSON and not Grain's own handler: `grain.checkpoint.CheckpointSave`
writes one file per process, `process_{i}-of-{n}.json`, and restores only with the same
process count. Our iterator's state is global (every process holds the same cursors and takes
its slice of each global batch), so it is written once, by the primary host, and any process
count restores it. Training uses no RNG besides the data order, which is a pure function of
(seed, stage, step) and needs no state of its own.

Atomicity: Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when every item
is complete, so a checkpoint that `kill -9` interrupted is never listed, and the leftover
directory is deleted on the next start (`cleanup_tmp_directories`). A listed checkpoint that
fails to restore (truncated or corrupted file) is reported by name and the previous one is
used; the damaged ones newer than it are renamed to `<step>.damaged` so the run can save
those steps again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from ..errors import CheckpointError

log = logging.getLogger("llama4_jax")

STEP_ITEMS = ("state", "data", "meta")
DAMAGED_SUFFIX = ".damaged"


@dataclass
class Restored:
    step: int
    state: Any
    data_state: dict
    meta: dict


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class Checkpointer:
    def __init__(self, directory: Path, *, keep_last: int, keep_steps: list[int] = (), async_save: bool = True):
        self.directory = Path(directory).absolute()
        policies = [ocp.checkpoint_managers.LatestN(keep_last)]
        if keep_steps:
            policies.append(ocp.checkpoint_managers.CustomSteps(sorted(set(keep_steps))))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=STEP_ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # -- save ---------------------------------------------------------------------------
    def save(self, step: int, state, data_state: dict, meta: dict) -> bool:
        """Starts an (async) save. Device→host copies finish before it returns, so the caller
        may donate `state` to the next step right away."""
        if step in self.manager.all_steps():
            return False  # e.g. a stage end that a preemption request also asked for
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    # -- restore ------------------------------------------------------------------------
    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_latest(self, abstract_state, check_meta: Callable[[int, dict], None] = lambda s, m: None
                       ) -> Restored | None:
        """The newest checkpoint that restores; None when there is none.

        `check_meta(step, meta)` runs before the arrays are read and may raise CheckpointError
        (an incompatible model), which is passed on. Damaged checkpoints are skipped with a
        warning naming them; if none restores, CheckpointError names the newest.
        """
        steps = self.steps()
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # Orbax/tensorstore raise many types for damaged files
                damaged.append((step, _first_line(e)))
                self._warn_damaged(step, damaged[-1][1])
                continue
            check_meta(step, meta)
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as e:
                damaged.append((step, _first_line(e)))
                self._warn_damaged(step, damaged[-1][1])
                continue
            for bad, _ in damaged:
                self._set_aside(bad)
            return Restored(step, state, data_state, meta)
        if damaged:
            step, why = damaged[0]
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored; the newest, "
                                  f"{self.step_dir(step)}, fails with {why}")
        return None

    def _warn_damaged(self, step: int, why: str) -> None:
        log.warning("checkpoint %s is damaged (%s); trying the previous one", self.step_dir(step), why)

    def _set_aside(self, step: int) -> None:
        """Rename a damaged step directory so Orbax no longer lists it (kept for inspection)."""
        if jax.process_index() == 0:
            src = self.step_dir(step)
            dst, n = src.with_name(src.name + DAMAGED_SUFFIX), 1
            while dst.exists():
                dst, n = src.with_name(f"{src.name}{DAMAGED_SUFFIX}{n}"), n + 1
            src.rename(dst)
            log.warning("renamed damaged checkpoint %s to %s", src, dst.name)
        if jax.process_count() > 1:  # every process lists the steps after the rename
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"llama4_jax_set_aside_{step}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings=None):
    """ShapeDtypeStructs carrying the shardings the restored arrays must have."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract_state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
