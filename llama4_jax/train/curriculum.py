"""The stage loop: base → domain → long-tail, as data.

Global step s (batches consumed since the start) decides everything: the stage is the one whose
range [start, end) holds s, the mixture comes from that stage (or its long-tail sampler), and the
data iterator draws batch s. Stopping and resuming anywhere — inside a stage or exactly at a
boundary — therefore continues the same sequence of batches.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from ..data.sampler import LongTailSampler
from ..model.config import RopeScaling


@dataclass
class StagePlan:
    index: int
    name: str
    start: int  # first global step of the stage
    end: int  # one past its last step
    seq_len: int
    batch_size: int
    mixture: dict[str, float]
    sampler: object  # the experiment's Sampler section
    microbatches: int = 1  # gradient accumulation inside the step
    # The stage's RoPE scaling (llama3), or None for the model's: it changes the function, not the
    # parameters, so it may differ from stage to stage and on resume (stage_model_config).
    rope_scaling: RopeScaling | None = None

    @property
    def steps(self) -> int:
        return self.end - self.start


def plan_stages(curriculum) -> list[StagePlan]:
    """One plan per stage of a `config.Curriculum`, with the step ranges its `boundaries()` gives."""
    ends = curriculum.boundaries()
    starts = [0, *ends[:-1]]
    return [StagePlan(i, st.name, a, b, st.seq_len, st.batch_size, dict(st.mixture), st.sampler, st.microbatches,
                      RopeScaling(**st.rope_scaling) if st.rope_scaling is not None else None)
            for i, (st, a, b) in enumerate(zip(curriculum.resolved_stages(), starts, ends))]


def stage_model_config(cfg, plan: StagePlan):
    """The ModelConfig a stage runs: the experiment's, with the stage's RoPE scaling if it sets
    one. Checkpoints keep (and resume compares) the experiment's own config."""
    return cfg if plan.rope_scaling is None else cfg.replace(rope_scaling=plan.rope_scaling)


def stage_at(plans: list[StagePlan], step: int) -> StagePlan:
    """The stage that runs global step `step`; past the end, the last stage."""
    i = bisect.bisect_right([p.end for p in plans], step)
    return plans[min(i, len(plans) - 1)]


@dataclass
class MixtureControl:
    """Owns the mixture weights of the current stage, including the long-tail sampler's state."""

    source_names: tuple[str, ...]
    sampler: LongTailSampler | None = None
    stage_index: int = -1
    _pending_loss: list = field(default_factory=list)

    def enter(self, plan: StagePlan) -> dict[str, float]:
        """Weights at the start of (or on resuming inside) `plan`."""
        self.stage_index = plan.index
        self._pending_loss = []
        s = plan.sampler
        if s.type != "long_tail":
            self.sampler = None
            return plan.mixture
        self.sampler = LongTailSampler(self.source_names, plan.mixture, temperature=s.temperature, ema=s.ema,
                                       min_weight=s.min_weight, rare_boost=s.rare_boost)
        return self.sampler.weights()

    def observe(self, src_loss_sum, src_tokens, src_rows) -> None:
        """Queue one step's per-source sums (device arrays are fine: they are read lazily)."""
        if self.sampler is not None:
            self._pending_loss.append((src_loss_sum, src_tokens, src_rows))

    def maybe_update(self, step_in_stage: int, every: int) -> dict[str, float] | None:
        """Every `every` steps of a long-tail stage: feed the queued losses, return new weights."""
        if self.sampler is None or (step_in_stage + 1) % every or not self._pending_loss:
            return None
        loss, toks, rows = self._fold()
        self._pending_loss = []
        seen = {n: int(rows[i]) for i, n in enumerate(self.source_names) if rows[i] > 0}
        mean = {n: float(loss[i] / toks[i]) for i, n in enumerate(self.source_names) if toks[i] > 0}
        self.sampler.update(mean, seen)
        return self.sampler.weights()

    def _fold(self):
        """Left-fold of the queued sums in float64: the same order whether or not a checkpoint
        restored a partial fold in between, so resumed runs reweight bit-identically."""
        loss = sum(np.asarray(l, np.float64) for l, _, _ in self._pending_loss)
        toks = sum(np.asarray(t, np.float64) for _, t, _ in self._pending_loss)
        rows = sum(np.asarray(r, np.int64) for _, _, r in self._pending_loss)
        return loss, toks, rows

    def state(self) -> dict | None:
        if self.sampler is None:
            return None
        pending = None
        if self._pending_loss:
            loss, toks, rows = self._fold()
            pending = [loss.tolist(), toks.tolist(), rows.tolist()]
        return {"sampler": self.sampler.state_dict(), "pending": pending}

    def restore(self, saved: dict | None) -> None:
        if self.sampler is None or not saved:
            return
        self.sampler.load_state_dict(saved["sampler"])
        if saved.get("pending"):
            loss, toks, rows = saved["pending"]
            self._pending_loss = [(np.array(loss, np.float64), np.array(toks, np.float64), np.array(rows, np.int64))]
