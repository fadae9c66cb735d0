"""Batched generation with a KV cache: one prefill of the right-padded prompts, then one token per
row per step at each row's own position, until max_new_tokens or every row has hit an EOS id.

Two compiled programs serve every request of a shape bucket (prompt length rounded up to PROMPT_BUCKET,
cache length to kv_cache.BUCKET): `_prefill`, and the decode step — either `_decode_one` (one
token, for streaming) or `_decode_loop` (all tokens in one `lax.while_loop`, nothing returns to
Python until the end). The loop carry, cache included, is donated, so the cache is updated in place.
Rows that finished emit `pad_id` from then on.

A model whose weights are sharded over a mesh (`load_hf(..., mesh=...)`) decodes on that mesh: the
programs are traced under it, so the model's sharding constraints hold and the cache is laid out
by the rules table (rows over the batch axes, KV heads over `tensor`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model import kv_cache
from . import GenerateError
from .sampling import Sampling, sample

PROMPT_BUCKET = 64  # prompt lengths are padded to a multiple: one compiled prefill per bucket
EOS_SLOTS = 8  # EOS id lists are padded to a multiple (with -1, never a token)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Loop:
    """The decode loop's carry; `out` holds every generated token so far (column = step)."""

    cache: kv_cache.KVCache
    token_B: jax.Array  # last token of each row (the next decode input)
    pos_B: jax.Array  # its position
    done_B: jax.Array
    out_BxN: jax.Array
    step: jax.Array  # tokens generated so far (the first came from the prefill)
    key: jax.Array


@dataclass(frozen=True)
class Generated:
    texts: list[str]
    token_ids: list[list[int]]  # per prompt: the new tokens, up to and including the first EOS


def _choose(logits_BxV, key, step, done_B, eos_E, pad_id, sampling):
    token_B = jnp.where(done_B, pad_id, sample(logits_BxV, jax.random.fold_in(key, step), *sampling))
    return token_B, done_B | jnp.isin(token_B, eos_E)


@partial(jax.jit, static_argnames=("graphdef", "total", "out_len", "kv"))
def _prefill(graphdef, state, ids_BxL, lengths_B, key, eos_E, pad_id, sampling, *, total, out_len, kv):
    model = nnx.merge(graphdef, state)
    cache = kv_cache.init_cache(model.cfg, ids_BxL.shape[0], total, model.rt.dtype, kv)
    logits_BxV, cache = model.prefill(ids_BxL, lengths_B, cache)
    done_B = jnp.zeros(lengths_B.shape, bool)
    token_B, done_B = _choose(logits_BxV, key, 0, done_B, eos_E, pad_id, sampling)
    out_BxN = jnp.full((ids_BxL.shape[0], out_len), pad_id, jnp.int32).at[:, 0].set(token_B)
    return Loop(cache, token_B, lengths_B, done_B, out_BxN, jnp.int32(1), key)


def _step(model, loop: Loop, eos_E, pad_id, sampling) -> Loop:
    logits_BxV, cache = model.decode(loop.token_B, loop.pos_B, loop.cache)
    token_B, done_B = _choose(logits_BxV, loop.key, loop.step, loop.done_B, eos_E, pad_id, sampling)
    out_BxN = jax.lax.dynamic_update_slice_in_dim(loop.out_BxN, token_B[:, None], loop.step, axis=1)
    return Loop(cache, token_B, loop.pos_B + 1, done_B, out_BxN, loop.step + 1, loop.key)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("loop",))
def _decode_one(graphdef, state, loop, eos_E, pad_id, sampling):
    return _step(nnx.merge(graphdef, state), loop, eos_E, pad_id, sampling)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("loop",))
def _decode_loop(graphdef, state, loop, n, eos_E, pad_id, sampling):
    model = nnx.merge(graphdef, state)
    return jax.lax.while_loop(lambda lp: (lp.step < n) & ~jnp.all(lp.done_B),
                              lambda lp: _step(model, lp, eos_E, pad_id, sampling), loop)


def _check(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    cfg = model.cfg
    if model.rt.scan_layers:
        raise GenerateError("generation needs the unrolled layer layout: load the model with scan_layers=False")
    if not prompts:
        raise GenerateError("no prompts given")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise GenerateError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                                f"the model's max_position_embeddings={cfg.max_position_embeddings}")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise GenerateError(f"prompt {i} has token ids outside the model's vocabulary 0..{cfg.vocab_size - 1}")


def _mesh_context(state):
    """`jax.set_mesh` of the mesh the weights are sharded over (a no-op context on one device)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return jax.set_mesh(sharding.mesh)
    return contextlib.nullcontext()


def _eos_array(eos_ids: Sequence[int]) -> jax.Array:
    n = max(EOS_SLOTS, -(-len(eos_ids) // EOS_SLOTS) * EOS_SLOTS)
    return jnp.asarray(list(eos_ids) + [-1] * (n - len(eos_ids)), jnp.int32)


def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 kv: str = "model") -> list[list[int]]:
    """Token-id prompts → the new tokens of each (up to and including its first EOS id).

    `kv` is the cache storage: "model" (the compute dtype), "int8" or "fp8" (8-bit codes with a
    scale per head vector, `model.kv_cache`).

    `on_tokens(tokens_B, done_B)`, if given, is called with every step's tokens as they are produced
    (one compiled step per token); without it all steps run in one compiled loop."""
    _check(model, prompts, max_new_tokens)
    if kv not in kv_cache.KV_STORAGE:
        raise GenerateError(f"unknown KV cache storage {kv!r}: expected one of {', '.join(kv_cache.KV_STORAGE)}")
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    L = kv_cache.bucket(int(lengths.max()), PROMPT_BUCKET)
    total = kv_cache.bucket(L + max_new_tokens)
    ids_BxL = np.full((B, L), pad_id, np.int32)
    for b, p in enumerate(prompts):
        ids_BxL[b, :len(p)] = p
    graphdef, state = nnx.split(model)
    with _mesh_context(state):
        loop = _run(graphdef, state, ids_BxL, lengths, total, max_new_tokens, sampling, seed, eos_ids, pad_id,
                    on_tokens, kv)
    return _trim(np.asarray(loop.out_BxN)[:, :max_new_tokens], set(eos_ids))


def _run(graphdef, state, ids_BxL, lengths, total, max_new_tokens, sampling, seed, eos_ids, pad_id, on_tokens, kv):
    eos_E, pad, knobs = _eos_array(eos_ids), jnp.int32(pad_id), sampling.arrays()
    loop = _prefill(graphdef, state, jnp.asarray(ids_BxL), jnp.asarray(lengths), jax.random.key(seed), eos_E, pad,
                    knobs, total=total, out_len=total, kv=kv)
    if on_tokens is None:
        return _decode_loop(graphdef, state, loop, jnp.int32(max_new_tokens), eos_E, pad, knobs)
    on_tokens(np.asarray(loop.token_B), np.asarray(loop.done_B))
    for _ in range(max_new_tokens - 1):
        if bool(np.all(np.asarray(loop.done_B))):
            break
        loop = _decode_one(graphdef, state, loop, eos_E, pad, knobs)
        on_tokens(np.asarray(loop.token_B), np.asarray(loop.done_B))
    return loop


def _trim(out_BxN: np.ndarray, eos: set[int]) -> list[list[int]]:
    rows = []
    for row in out_BxN.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] | None = None,
             on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None, kv: str = "model") -> Generated:
    """Text prompts → generated texts and token ids. `eos_ids` defaults to the tokenizer's eos id;
    temperature 0 is greedy. See `generate_ids` for `on_tokens`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    eos_ids = [tokenizer.eos_id] if eos_ids is None else list(eos_ids)
    ids = generate_ids(model, [tokenizer.encode(p) for p in prompts], max_new_tokens,
                       Sampling(temperature, top_k, top_p), seed, eos_ids, tokenizer.pad_id, on_tokens, kv)
    texts = [tokenizer.decode([t for t in row if t not in eos_ids]) for row in ids]
    return Generated(texts, ids)
