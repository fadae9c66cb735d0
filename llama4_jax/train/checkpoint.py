"""Orbax checkpoints holding everything needed to continue a run exactly.

Each step directory `checkpoints/<step>/` has three items:
  - `state`: the TrainState pytree (params, optimizer state, router biases, FP8 scales, step,
    non-finite counters), saved asynchronously;
  - `data`: the data iterator, through Grain's own Orbax handler (its get_state/set_state);
  - `meta`: JSON — curriculum stage and position, long-tail sampler state, model config,
    resolved experiment.
Orbax writes into a temporary directory and renames it when complete, so a checkpoint that a
`kill -9` interrupted is never listed; a damaged one fails to restore and the previous one is
used instead, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint the user pointed us at cannot be used (one line, names the problem)."""


class Checkpointer:
    def __init__(self, directory: Path, *, keep_last: int, keep_steps: list[int] = (), async_save: bool = True):
        self.directory = Path(directory).absolute()
        policies = [ocp.checkpoint_managers.LatestN(keep_last)]
        if keep_steps:
            policies.append(ocp.checkpoint_managers.CustomSteps(list(keep_steps)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = True) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state, data_iter) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def read_meta(self, step: int) -> dict | None:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # damaged: restore_latest will report it and fall back
            return None

    def restore_latest(self, abstract_state, data_iter) -> tuple[int, Any, dict] | None:
        """Newest checkpoint that restores; damaged ones are skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state, data_iter)
                return step, state, meta
            except CheckpointError:
                raise
            except Exception as e:  # Orbax/tensorstore raise many types for damaged files
                log.warning("checkpoint %s is damaged (%s: %s); trying the previous one",
                            self.directory / str(step), type(e).__name__, str(e).splitlines()[0][:200])
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings=None):
    """ShapeDtypeStructs carrying the shardings the restored arrays must have."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract_state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
