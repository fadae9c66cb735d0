"""Long-tail sampler: mixture weights for the last curriculum stage.

It favours sources the model is still bad at (high recent loss) and sources it has rarely
seen. For sources s = 1..N with base weight b_s (normalised to sum 1):

    m_s  exponential moving average of the source's training loss,
             m_s ← ema · m_s + (1 − ema) · loss_s      (only on updates where s had rows)
         All averages start at the mean loss of the first update that reports any loss, a
         shared prior: the weights begin at the base weights and drift as evidence builds up,
         and a source never observed keeps the prior.
    u_s  = N · seen_s / Σ_t seen_t, the source's share of rows seen relative to an even share
         (0 before any rows are seen).
    r_s  = b_s · exp((m_s − max_t m_t) / temperature) · (1 + u_s) ** (−rare_boost)
    w    = r / Σ r, then every source with b_s > 0 is floored at min_weight (the floored
           sources get exactly min_weight, the rest share what is left in proportion to r).

The rarity factor is 1 for a source never seen, 2**−rare_boost for one seen at an even share,
and smaller still for a source that dominated; rare_boost = 0 turns it off, 0.5 is the usual
inverse-square-root count boost. Sources with base weight 0 stay at 0. Subtracting max m only
keeps exp() finite; the normalisation cancels it. The trainer calls `update` each step with the (process-global)
mean loss and row count per source; losses that are not finite are ignored.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from ..errors import DataError


class LongTailSampler:
    def __init__(self, source_names: Sequence[str], base_weights: Mapping[str, float], *,
                 temperature: float = 1.0, ema: float = 0.9, min_weight: float = 0.01,
                 rare_boost: float = 0.5):
        self.source_names = tuple(source_names)
        n = len(self.source_names)
        unknown = sorted(set(base_weights) - set(self.source_names))
        if unknown:
            raise DataError(f"unknown source(s) in base weights: {', '.join(unknown)}")
        base = np.array([float(base_weights.get(s, 0.0)) for s in self.source_names])
        if n == 0 or not np.all(np.isfinite(base)) or np.any(base < 0) or base.sum() <= 0:
            raise DataError(f"base weights must be finite, >= 0 and not all 0: {dict(base_weights)}")
        if temperature <= 0 or not 0 <= ema < 1 or rare_boost < 0:
            raise DataError("need temperature > 0, 0 <= ema < 1 and rare_boost >= 0")
        if not 0 <= min_weight * np.count_nonzero(base) <= 1:
            raise DataError(f"min_weight {min_weight} times the number of sources exceeds 1")
        self._base = base / base.sum()
        self.temperature, self.ema = temperature, ema
        self.min_weight, self.rare_boost = min_weight, rare_boost
        self._ema_loss: np.ndarray | None = None
        self._seen = np.zeros(n, np.int64)
        self._updates = 0

    def _index_values(self, values: Mapping[str, float], what: str) -> dict[int, float]:
        unknown = sorted(set(values) - set(self.source_names))
        if unknown:
            raise DataError(f"unknown source(s) in {what}: {', '.join(unknown)}")
        return {self.source_names.index(s): v for s, v in values.items()}

    def update(self, per_source_loss: Mapping[str, float], per_source_rows: Mapping[str, int]) -> None:
        """Adds one step's observations; a loss counts only where its source had rows."""
        rows = self._index_values(per_source_rows, "row counts")
        losses = {i: float(v) for i, v in self._index_values(per_source_loss, "losses").items()
                  if rows.get(i, 0) > 0 and math.isfinite(v)}
        for i, count in rows.items():
            self._seen[i] += int(count)
        if losses and self._ema_loss is None:
            self._ema_loss = np.full(len(self.source_names), np.mean(list(losses.values())))
        for i, loss in losses.items():
            self._ema_loss[i] = self.ema * self._ema_loss[i] + (1 - self.ema) * loss
        self._updates += 1

    def _raw_weights(self) -> np.ndarray:
        ema = np.zeros(len(self.source_names)) if self._ema_loss is None else self._ema_loss
        loss_factor = np.exp((ema - ema.max()) / self.temperature)
        total_seen = self._seen.sum()
        share = len(self.source_names) * self._seen / total_seen if total_seen else np.zeros_like(ema)
        rare_factor = (1.0 + share) ** -self.rare_boost
        return self._base * loss_factor * rare_factor

    def _floor(self, raw: np.ndarray) -> np.ndarray:
        eligible = self._base > 0
        floored = np.zeros_like(eligible)
        weights = raw / raw.sum()
        # Flooring one source lowers the others' share, which may push another below the floor;
        # at most N rounds.
        while True:
            low = eligible & ~floored & (weights < self.min_weight)
            if not low.any():
                return weights
            floored |= low
            rest = np.where(floored, 0.0, raw)
            free = 1.0 - self.min_weight * floored.sum()
            share = free * rest / rest.sum() if rest.sum() > 0 else rest
            weights = np.where(floored, self.min_weight, share)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.source_names, self._floor(self._raw_weights()).tolist()))

    def state_dict(self) -> dict:
        ema = None if self._ema_loss is None else dict(zip(self.source_names, self._ema_loss.tolist()))
        return {"ema_loss": ema, "seen_rows": dict(zip(self.source_names, self._seen.tolist())),
                "updates": self._updates}

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["seen_rows"]) != set(self.source_names):
            raise DataError(f"sampler state has sources {sorted(state['seen_rows'])}, "
                            f"expected {sorted(self.source_names)}")
        ema = state["ema_loss"]
        self._ema_loss = None if ema is None else np.array([float(ema[s]) for s in self.source_names])
        self._seen = np.array([int(state["seen_rows"][s]) for s in self.source_names], np.int64)
        self._updates = int(state["updates"])
