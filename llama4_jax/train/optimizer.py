"""Optimizer: AdamW with a weight-decay mask, global-norm clipping, and the LR schedule.

Schedules (optimizer.schedule.type):
  - warmup_cosine: linear warmup, cosine to min_lr_ratio·lr over the whole curriculum;
  - wsd: warmup, stable at lr, linear decay over the last `decay_fraction` of the run;
  - stages: each curriculum stage's own `lr_phase` (warmup, then constant/cosine/linear between
    `start` and `end`, as fractions of lr), joined at the stage boundaries.

Frozen towers (a stage's `trainable`, e.g. [text] to keep a pretrained vision tower fixed):
`freeze_by_stage` wraps the optimizer; in a stage, the gradients of the towers it does not train
are zeroed before the chain (so they neither count in the clipping norm nor move the Adam
moments) and their updates zeroed after it (no weight decay, no momentum carried in from an
earlier stage), so a frozen parameter stays bit-identical. The stage is found from the wrapper's
own count of applied updates, as the schedule's is (a skipped non-finite step advances neither).
Towers: `vision` (model.vision), `projector` (model.projector), `audio` (model.audio, the audio
encoder), `audio_projector` (model.audio_projector), `text` (everything else). `vision.lr_scale`
multiplies the vision and projector updates (a fresh tower next to a text model learns slowly at
the text model's rate: its adapter and projector start small), `audio.lr_scale` the audio ones.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

TOWERS = ("text", "vision", "projector", "audio", "audio_projector")


def _phase(peak: float, steps: int, warmup: int, shape: str, start: float, end: float):
    parts, bounds = [], []
    if warmup:
        parts.append(optax.linear_schedule(0.0, peak * start, warmup))
        bounds.append(warmup)
    rest = max(steps - warmup, 1)
    if shape == "constant":
        parts.append(optax.constant_schedule(peak * start))
    elif shape == "linear":
        parts.append(optax.linear_schedule(peak * start, peak * end, rest))
    else:  # cosine from start to end
        lo, hi = peak * end, peak * start
        parts.append(lambda n: lo + 0.5 * (hi - lo) * (1 + jnp.cos(jnp.pi * jnp.minimum(n, rest) / rest)))
    return optax.join_schedules(parts, bounds) if bounds else parts[0]


def lr_schedule(opt, stages: list, total_steps: int) -> optax.Schedule:
    """`opt` is the experiment's optimizer section; `stages` the resolved curriculum stages."""
    s = opt.schedule
    if s.type == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, opt.lr, s.warmup_steps, max(total_steps, 1),
                                                  end_value=opt.lr * s.min_lr_ratio)
    if s.type == "wsd":
        decay = max(int(round(total_steps * s.decay_fraction)), 1)
        stable = max(total_steps - decay - s.warmup_steps, 0)
        parts = [optax.linear_schedule(0.0, opt.lr, max(s.warmup_steps, 1)),
                 optax.constant_schedule(opt.lr),
                 optax.linear_schedule(opt.lr, opt.lr * s.min_lr_ratio, decay)]
        return optax.join_schedules(parts, [s.warmup_steps, s.warmup_steps + stable])
    parts, bounds, at = [], [], 0
    for st in stages:
        p = st.lr_phase
        parts.append(_phase(opt.lr, st.steps, p.warmup_steps, p.shape, p.start, p.end))
        at += st.steps
        bounds.append(at)
    return optax.join_schedules(parts, bounds[:-1])


def decay_mask(params: nnx.State, exclude: list[str]) -> nnx.State:
    """True where weight decay applies, decided from each parameter's logical axes."""

    def decays(v):
        axes = v.get_metadata().get("logical_axes", ())
        if "norms" in exclude and axes == ("norm",):
            return False
        if "embeddings" in exclude and axes == ("vocab", "embed"):
            return False
        if "biases" in exclude and len(axes) == 1 and axes != ("norm",):  # norm scales are "norms"
            return False
        return True

    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build_optimizer(opt, params: nnx.State, schedule: optax.Schedule, opt_state_dtype=jnp.float32):
    chain = []
    if opt.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(opt.grad_clip))
    chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=decay_mask(params, opt.wd_exclude), mu_dtype=opt_state_dtype))
    return optax.chain(*chain)


def tower_of(path) -> str:
    """The tower a parameter belongs to, from its path in the model's state."""
    head = path[0] if path else None
    name = getattr(head, "key", getattr(head, "name", head))
    return name if name in TOWERS[1:] else "text"


class FreezeState(NamedTuple):
    count: jax.Array  # updates applied so far
    inner: optax.OptState


def freeze_by_stage(inner: optax.GradientTransformation, boundaries: Sequence[int],
                    trainable: Sequence[Sequence[str] | None],
                    scale: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """`inner` with, in stage i (updates [boundaries[i-1], boundaries[i])), only the towers in
    trainable[i] (None: all) changing, each tower's updates multiplied by `scale[tower]`
    (default 1: e.g. a faster-learning fresh vision tower) (module docstring)."""
    scale = dict(scale or {})
    table = np.array([[(t is None or tower in t) * scale.get(tower, 1.0) for tower in TOWERS] for t in trainable],
                     np.float32)
    ends = np.asarray(boundaries, np.int32)

    def multipliers(tree, count):
        stage = jnp.minimum(jnp.searchsorted(ends, count, side="right"), len(ends) - 1)
        row = jnp.asarray(table)[stage]
        return jax.tree_util.tree_map_with_path(lambda p, _: row[TOWERS.index(tower_of(p))], tree)

    def keep(tree, mult, scaled: bool):
        def one(x, m):
            return jnp.where(m == 0, jnp.zeros_like(x), (x * m).astype(x.dtype) if scaled else x)
        return jax.tree.map(one, tree, mult)

    def init(params):
        return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

    def update(grads, state, params=None):
        mult = multipliers(grads, state.count)
        updates, inner_state = inner.update(keep(grads, mult, False), state.inner, params)
        return keep(updates, mult, True), FreezeState(state.count + 1, inner_state)

    return optax.GradientTransformation(init, update)
