"""Per-source loss and perplexity on a training run's held-out data.

Reads the run's `config.resolved.yaml` (its `data` section: tokenizer and sources), rebuilds the
same held-out split the trainer evaluates (`MixtureIterator.eval_batches`: each source's
`eval_fraction` of documents, packed into rows with segment ids, padded at the end) and reports,
per source, the mean token cross entropy and exp of it. With the trainer's seq_len, batch and
`eval.batches` it reproduces the run's logged `eval/loss/<source>`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data.pipeline import build_mixture
from ..data.sources import Source
from ..data.tokenizer import Tokenizer
from ..errors import EvalError
from ..infer.source import resolved_config, run_dir


@dataclass(frozen=True)
class SourcePerplexity:
    source: str
    loss: float  # mean cross entropy per target token (nats)
    perplexity: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeldOut:
    """What to evaluate on: the sources of a run and the trainer's eval shape."""

    sources: dict[str, Source]
    seed: int
    seq_len: int
    batch_size: int
    max_batches: int | None


def held_out_of_run(source: str | Path, *, seq_len: int | None = None, batch_size: int | None = None,
                    max_batches: int | None = None) -> HeldOut:
    """The held-out data of the training run behind `source`; shape defaults: the last stage's
    seq_len and batch size, the run's `eval.batches`."""
    work = run_dir(source)
    if work is None:
        raise EvalError(f"{source}: --perplexity needs a training run (a workdir with config.resolved.yaml)")
    cfg = resolved_config(work)
    base = {"base_dir": str(work)}
    try:
        sources = {name: Source.model_validate(spec, context=base) for name, spec in cfg["data"]["sources"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{work / 'config.resolved.yaml'}: data.sources: {str(e).splitlines()[0]}") from None
    stages = (cfg.get("curriculum") or {}).get("stages") or [{}]
    last = stages[-1]
    return HeldOut(sources, int(cfg.get("seed", 0)), int(seq_len or last.get("seq_len") or 512),
                   int(batch_size or last.get("batch_size") or 8),
                   max_batches if max_batches is not None else (cfg.get("eval") or {}).get("batches"))


def _loss_sums(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return -(logp * mask).sum(), mask.sum()


def source_perplexity(model, tokenizer: Tokenizer, held: HeldOut) -> list[SourcePerplexity]:
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise EvalError(f"tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary only {model.cfg.vocab_size}")
    data = build_mixture(held.sources, tokenizer, seed=held.seed, seq_len=held.seq_len,
                         global_batch=held.batch_size, prefetch=False)
    if not data.eval_source_names:
        raise EvalError("no data source of the run has held-out documents (eval_fraction > 0)")
    graphdef, state = nnx.split(model)
    step = jax.jit(_loss_sums, static_argnums=0)
    out = []
    try:
        for src in data.eval_source_names:
            total, count = 0.0, 0.0
            for batch in data.eval_batches(src, seq_len=held.seq_len, global_batch=held.batch_size,
                                           max_batches=held.max_batches):
                keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
                s, c = jax.device_get(step(graphdef, state, {k: np.asarray(batch[k]) for k in keys}))
                total, count = total + float(s), count + float(c)
            loss = total / max(count, 1.0)
            out.append(SourcePerplexity(src, loss, math.exp(loss), int(count)))
    finally:
        data.close()
    return out
