"""train_step / eval_step: pure functions of (state, batch) returning a flat metrics dict.

The non-finite guard lives here: a step whose loss or gradient norm is not finite changes
nothing (params, optimizer state, router biases, FP8 scales) except the counters.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .state import TrainState


@dataclass(frozen=True)
class BalancingConfig:
    """MoE load-balancing terms the step applies (the model reports the raw statistics)."""

    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # > 0: aux-loss-free bias updates (DeepSeek-V3)


@dataclass(frozen=True)
class StepConfig:
    num_sources: int
    balancing: BalancingConfig = BalancingConfig()


def moe_loss(metrics: dict, cfg: BalancingConfig) -> jax.Array:
    """aux_loss_coef·Σ aux + z_loss_coef·Σ z over MoE layers (metrics stacked over layers)."""
    loss = jnp.zeros((), jnp.float32)
    if not metrics:
        return loss
    if cfg.aux_loss_coef:
        loss = loss + cfg.aux_loss_coef * jnp.sum(metrics["aux_loss"])
    if cfg.z_loss_coef:
        loss = loss + cfg.z_loss_coef * jnp.sum(metrics["z_loss"])
    return loss


def token_losses(logits_BxLxV, targets_BxL):
    """Cross entropy per token in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return lse - gold


def _forward(graphdef, params, extra, batch):
    # copy=True: fresh Variables at this trace level (merge would otherwise reuse the outer
    # trace's Variable objects, which nnx.scan over layers rejects).
    model = nnx.merge(graphdef, params, extra, copy=True)
    logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], return_aux=True)
    # The forward pass updates non-parameter state in place (FP8 amax histories): hand it back.
    new_extra = jax.lax.stop_gradient(nnx.state(model, nnx.Not(nnx.Param)))
    return token_losses(logits, batch["targets"]) * batch["loss_mask"], aux, new_extra


def _per_source(tok_loss_BxL, batch, num_sources):
    rows = batch["source_ids"]
    loss = jax.ops.segment_sum(tok_loss_BxL.sum(1), rows, num_sources)
    toks = jax.ops.segment_sum(batch["loss_mask"].sum(1), rows, num_sources)
    count = jax.ops.segment_sum(jnp.ones_like(rows), rows, num_sources)
    return loss, toks, count


def _moe_metrics(aux: dict) -> dict:
    return {f"moe/{k}": v for k, v in aux.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig):
    def train_step(state: TrainState, batch: dict):
        def loss_fn(params):
            tok_loss, aux, new_extra = _forward(graphdef, params, state.extra, batch)
            ce = tok_loss.sum() / jnp.maximum(batch["loss_mask"].sum(), 1.0)
            extra_loss = moe_loss(aux, cfg.balancing) if aux else jnp.zeros((), jnp.float32)
            return ce + extra_loss, (ce, extra_loss, tok_loss, aux, new_extra)

        (loss, (ce, extra_loss, tok_loss, aux, new_extra)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = new_extra
        if aux and cfg.balancing.bias_update_rate > 0:
            # copy=True: merge otherwise shares the state's Variables, so the in-place bias
            # update would also change the "old" biases that a non-finite step must keep.
            model = nnx.merge(graphdef, state.params, new_extra, copy=True)
            model.update_router_biases(jax.lax.stop_gradient(aux["load"]), cfg.balancing.bias_update_rate)
            extra = nnx.state(model, nnx.Not(nnx.Param))
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        ok = finite.astype(jnp.int32)
        new_state = TrainState(
            step=state.step + ok, params=pick(params, state.params), extra=pick(extra, state.extra),
            opt_state=pick(opt_state, state.opt_state), bad_streak=(state.bad_streak + 1) * (1 - ok),
            skipped=state.skipped + 1 - ok)
        src_loss, src_tokens, src_rows = _per_source(tok_loss, batch, cfg.num_sources)
        metrics = {"loss": ce, "total_loss": loss, "moe_loss": extra_loss, "grad_norm": gnorm,
                   "finite": finite, "src_loss_sum": src_loss, "src_tokens": src_tokens, "src_rows": src_rows,
                   "tokens": batch["loss_mask"].sum(), **_moe_metrics(aux)}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    def eval_step(state: TrainState, batch: dict):
        tok_loss, _, _ = _forward(graphdef, state.params, state.extra, batch)
        return tok_loss.sum(), batch["loss_mask"].sum()

    return eval_step
