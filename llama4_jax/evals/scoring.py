"""Batched, jitted token scoring, and the full-forward decoder the lm-eval adapter falls back on.

Shapes are bucketed so jit compiles once per (batch, length bucket), not once per request:
lengths round up to a power of two (at least `MIN_BUCKET`, at most the model's max length) and
every batch is padded to the full batch size with dummy rows. Padding goes on the right, where
causal attention keeps it from touching real positions (and the dropless MoE never drops a
token, so padding cannot push a real token out of an expert either).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_BUCKET = 16


def bucket(n: int, cap: int | None = None) -> int:
    b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return max(n, min(b, cap)) if cap else b


def _token_scores(graphdef, state, inputs_BxL, targets_BxL):
    """log p(target) at every position and whether the target is the argmax there."""
    model = nnx.merge(graphdef, state)
    logp_BxLxV = jax.nn.log_softmax(model(inputs_BxL), axis=-1)
    logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return logp_BxL, jnp.argmax(logp_BxLxV, axis=-1) == targets_BxL


def _next_token(graphdef, state, ids_BxT, last_B, key, temperature):
    """The token after position last_B[b] of each row: argmax, or a sample when temperature > 0."""
    model = nnx.merge(graphdef, state)
    logits_BxV = jnp.take_along_axis(model(ids_BxT), last_B[:, None, None], axis=1)[:, 0]
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    sampled_B = jax.random.categorical(key, logits_BxV / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


class Runner:
    """The model split once into (graphdef, state) with its two jitted programs."""

    def __init__(self, model, batch_size: int, max_length: int, pad_id: int = 0):
        self.graphdef, self.state = nnx.split(model)
        self.batch_size, self.max_length, self.pad_id = batch_size, max_length, pad_id
        self._scores = jax.jit(_token_scores, static_argnums=0)
        self._next = jax.jit(_next_token, static_argnums=0)

    def _pad(self, rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
        out = np.full((self.batch_size, length), self.pad_id, np.int32)
        for b, r in enumerate(rows):
            out[b, :len(r)] = r
        return out

    def score(self, rows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """rows: (tokens, n) with len(tokens) ≤ max_length + 1 → (sum of log p of the last n
        tokens given everything before them, whether each of those n is the argmax). At most
        `batch_size` rows; the caller batches."""
        L = bucket(max(len(t) - 1 for t, _ in rows), self.max_length)
        inputs = self._pad([t[:-1] for t, _ in rows], L)
        targets = self._pad([t[1:] for t, _ in rows], L)
        logp_BxL, greedy_BxL = jax.device_get(self._scores(self.graphdef, self.state, inputs, targets))
        out = []
        for b, (t, n) in enumerate(rows):
            end = len(t) - 1
            out.append((float(logp_BxL[b, end - n:end].astype(np.float64).sum()), bool(greedy_BxL[b, end - n:end].all())))
        return out

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_ids: Sequence[int],
                     temperature: float = 0.0, seed: int = 0,
                     stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Prompts (token ids) → new tokens of each, up to and including its first EOS id.

        The fallback where infer/'s KV-cache generation cannot run (scanned layers, lengths past
        max_position_embeddings): every step runs the full forward pass over the padded buffer,
        O(steps × length) per token. Same contract as `infer.generate_ids`; `stop(new_ids)` lets
        a row end early (a stop string)."""
        B = len(prompts)
        T = bucket(max(len(p) for p in prompts) + max_new_tokens)
        ids = self._pad(prompts, T)
        last = np.zeros(self.batch_size, np.int32)
        last[:B] = [len(p) - 1 for p in prompts]
        new: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        key = jax.random.key(seed)
        for _ in range(max_new_tokens):
            key, sub = jax.random.split(key)
            tok = np.asarray(self._next(self.graphdef, self.state, ids, last, sub, jnp.float32(temperature)))
            for b in np.flatnonzero(~done):
                new[b].append(int(tok[b]))
                last[b] += 1
                ids[b, last[b]] = tok[b]
                done[b] = tok[b] in eos_ids or (stop is not None and stop(new[b]))
            if done.all():
                break
        return new
