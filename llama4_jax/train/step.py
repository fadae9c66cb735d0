"""train_step / eval_step: pure functions of (state, batch) returning a flat metrics dict.

The non-finite guard lives here: a step whose loss or gradient norm is not finite changes
nothing (params, optimizer state, router biases, FP8 scales) except the counters.

Gradient accumulation (`StepConfig.microbatches` = N > 1): the global batch is split inside the
jitted step into N microbatches of B/N rows (microbatch i = rows i, i+N, i+2N, ..., so each
device's shard of the batch feeds every microbatch equally), run one after another in a
`lax.scan` that sums their gradients; the optimizer and the router biases update once, from the
sums. What each quantity becomes:
  - cross entropy: each microbatch's token-loss sum is divided by the token count of the whole
    batch, so loss and gradients are the full batch's (token-weighted, not a mean of means);
    per-source sums are taken over the whole batch's token losses as before;
  - MoE statistics (load, entropy, z-loss, dropped / overflow fractions, sequence-level aux
    loss): means over equal-sized microbatches, i.e. the full batch's values; max_violation is
    recomputed from the merged load (routing.merge_metrics), and the bias update sees it too;
  - the batch-level Switch aux loss (E·Σ f·P, a product of batch means) is defined per
    microbatch: the loss term is the mean of the N microbatches' own aux losses, as if each were
    a batch. It differs from the full batch's; `aux_loss_level: sequence` does not;
  - capacity dispatch computes its capacity from, and drops within, each microbatch (T/N tokens);
  - FP8 delayed scaling sees each microbatch as one forward pass (its amax history advances N
    entries per step).
The data order and what a checkpoint holds do not change: the step consumes the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..model.routing import merge_metrics
from .loss import chunked_token_losses, token_losses
from .state import TrainState


# The step's batch: field → rank ([B, L] token fields, [B] row fields), as data/pipeline.py makes it.
BATCH_RANKS = {"inputs": 2, "targets": 2, "segment_ids": 2, "positions": 2, "loss_mask": 2, "source_ids": 1}
# The optional (media) fields a batch with image or audio rows adds, and their ranks
# (data/pipeline.py; model/multimodal.py places the features).
MEDIA_RANKS = {"pixel_values": 5, "image_index": 2, "audio_values": 3, "audio_index": 2}


def media_fields(batch) -> tuple[str, ...]:
    """The media fields `batch` carries, in MEDIA_RANKS order (empty: a text-only batch). The
    trainer runs one jitted step per distinct tuple, so a text batch runs the text program."""
    return tuple(k for k in MEDIA_RANKS if k in batch)


def batch_ranks(fields: tuple[str, ...]) -> dict[str, int]:
    """The ranks of a batch with these media fields (jit's in_shardings)."""
    return {**BATCH_RANKS, **{k: MEDIA_RANKS[k] for k in fields}}


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
    # > 0: cross entropy from the hidden states, this many rows of logits at a time (train/loss.py).
    # An FP8 head keeps the plain loss: its dot updates one amax history from the whole [B·L, D]
    # activation per forward pass, which per-chunk calls would turn into per-chunk observations.
    loss_chunk_rows: int = 0
    microbatches: int = 1  # gradient accumulation (module docstring)


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


def _forward(graphdef, params, extra, batch, chunk_rows: int = 0):
    # copy=True: fresh Variables at this trace level (merge would otherwise reuse the outer
    # trace's Variable objects, which nnx.scan over layers rejects).
    model = nnx.merge(graphdef, params, extra, copy=True)
    # Image tiles per row [B, T, C, S, S], audio clips per row [B, K, S] and, from the data
    # pipeline, where each feature goes (model/multimodal.py); text-only batches have none and
    # run the text model's program.
    images = {k: batch[k] for k in media_fields(batch)}
    if chunk_rows and not model.fp8_head:
        h_BxLxD, aux = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"], **images)
        B, L, D = h_BxLxD.shape
        tok_BxL = chunked_token_losses(h_BxLxD.reshape(B * L, D), model.head_weight(),
                                       batch["targets"].reshape(B * L), chunk_rows).reshape(B, L)
    else:
        logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], return_aux=True, **images)
        tok_BxL = token_losses(logits, batch["targets"])
    # The forward pass updates non-parameter state in place (FP8 amax histories): hand it back.
    new_extra = jax.lax.stop_gradient(nnx.state(model, nnx.Not(nnx.Param)))
    return tok_BxL * batch["loss_mask"], aux, new_extra


def _split(x_BxX, n: int):
    """[B, ...] → [n, B/n, ...]: microbatch i takes rows i, i+n, i+2n, ..."""
    return jnp.swapaxes(x_BxX.reshape(x_BxX.shape[0] // n, n, *x_BxX.shape[1:]), 0, 1)


def _unsplit(x_nxBxX):
    """Inverse of `_split`."""
    x = jnp.swapaxes(x_nxBxX, 0, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _value_and_grads(graphdef, cfg: StepConfig, params, extra, batch):
    """→ (total loss, (ce, MoE loss, token losses [B, L], MoE metrics, new extra), gradients),
    over the whole batch in one pass or accumulated over cfg.microbatches (module docstring)."""
    n = cfg.microbatches
    tokens = jnp.maximum(batch["loss_mask"].sum(), 1.0)

    def loss_fn(params, extra, mb):
        tok_loss, aux, new_extra = _forward(graphdef, params, extra, mb, cfg.loss_chunk_rows)
        ce = tok_loss.sum() / tokens
        extra_loss = moe_loss(aux, cfg.balancing) if aux else jnp.zeros((), jnp.float32)
        if n > 1:
            extra_loss = extra_loss / n  # the mean over microbatches of their balancing terms
        return ce + extra_loss, (ce, extra_loss, tok_loss, aux, new_extra)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        return grad_fn(params, extra, batch)

    def microbatch(carry, mb):
        grads, extra = carry
        (loss, (ce, extra_loss, tok_loss, aux, extra)), g = grad_fn(params, extra, mb)
        return (jax.tree.map(jnp.add, grads, g), extra), (loss, ce, extra_loss, tok_loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, new_extra), (loss, ce, extra_loss, tok_loss, aux) = jax.lax.scan(
        microbatch, (zeros, extra), jax.tree.map(lambda x: _split(x, n), batch))
    top_k = nnx.merge(graphdef, params, extra, copy=True).cfg.moe.top_k  # trace time only
    copies = batch["inputs"].size // n * top_k  # token copies routed per microbatch and layer
    if aux:
        # row_load is per row, not a mean over tokens: the microbatches' rows go back in place.
        row_load_nxBxNxE = jnp.moveaxis(aux["row_load"], 1, 2)
        aux = merge_metrics({k: v for k, v in aux.items() if k != "row_load"}, copies)
        aux["row_load"] = jnp.moveaxis(_unsplit(row_load_nxBxNxE), 0, 1)
    return (loss.sum(), (ce.sum(), extra_loss.sum(), _unsplit(tok_loss), aux, new_extra)), grads


def _per_source(tok_loss_BxL, batch, num_sources):
    rows = batch["source_ids"]
    loss = jax.ops.segment_sum(tok_loss_BxL.sum(1), rows, num_sources)
    toks = jax.ops.segment_sum(batch["loss_mask"].sum(1), rows, num_sources)
    count = jax.ops.segment_sum(jnp.ones_like(rows), rows, num_sources)
    return loss, toks, count


def load_by_source(row_load_NxBxE, batch, num_sources):
    """[N MoE layers, S sources, E]: each source's share of copies per expert, its rows weighted
    by their loss tokens (a row of padding says nothing about the source). A source without
    tokens in the batch gets a row of zeros."""
    toks_B = batch["loss_mask"].sum(1).astype(jnp.float32)
    weighted_BxNxE = jnp.moveaxis(row_load_NxBxE, 1, 0) * toks_B[:, None, None]
    sums_SxNxE = jax.ops.segment_sum(weighted_BxNxE, batch["source_ids"], num_sources)
    toks_S = jax.ops.segment_sum(toks_B, batch["source_ids"], num_sources)
    return jnp.moveaxis(sums_SxNxE / jnp.maximum(toks_S, 1.0)[:, None, None], 0, 1)


def _moe_metrics(aux: dict, batch, num_sources) -> dict:
    """The MoE layers' statistics (stacked over MoE layers) with the per-row load folded into
    sources: rows vary with the batch size, sources are what a reader compares."""
    out = {f"moe/{k}": v for k, v in aux.items() if k != "row_load"}
    if "row_load" in aux:
        out["moe/load_by_source"] = load_by_source(aux["row_load"], batch, num_sources)
    return out


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig):
    def train_step(state: TrainState, batch: dict):
        (loss, (ce, extra_loss, tok_loss, aux, new_extra)), grads = _value_and_grads(
            graphdef, cfg, state.params, state.extra, batch)
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
                   "tokens": batch["loss_mask"].sum(), "bad_streak": new_state.bad_streak,
                   **_moe_metrics(aux, batch, cfg.num_sources)}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, loss_chunk_rows: int = 0):
    def eval_step(state: TrainState, batch: dict):
        tok_loss, _, _ = _forward(graphdef, state.params, state.extra, batch, loss_chunk_rows)
        return tok_loss.sum(), batch["loss_mask"].sum()

    return eval_step
