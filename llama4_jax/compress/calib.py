"""Calibration data for AWQ and pruning, and the per-block activations traced on it.

Data (`--calib DATA`): a `.jsonl` file (each line an object with a "text" field), any other
text file (one document), or a training run's workdir (a sample of its training mixture, the
first batch of its data pipeline: what the trainer saw). Without --calib, SOURCE itself must be
a training run. Documents are tokenized, joined with EOS and cut into `rows` rows of `seq_len`.

`trace_blocks` runs the float model one block at a time (the block itself computes the output
passed on, the pieces below only record what each linear saw) and yields, per block, its
inputs and the activations every quantized linear takes, as host arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data.pipeline import build_mixture
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..evals.loading import load_tokenizer
from ..infer.source import run_dir
from ..evals.perplexity import held_out_of_run
from ..model.attention import chunked_attention, global_attention
from ..model.routing import route, weight_inputs


class CalibError(UserError):
    """Calibration data cannot be read or is too small."""


def _texts(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibError(f"{path}: cannot read calibration data ({type(e).__name__})") from None
    if path.suffix != ".jsonl":
        return [raw]
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append(str(rec["text"]))
        except (ValueError, KeyError, TypeError):
            raise CalibError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
    return out


def calib_tokens(source: str | Path, data: str | Path | None, rows: int, seq_len: int,
                 tokenizer: Tokenizer | None = None) -> np.ndarray:
    """[rows, seq_len] int32 token ids (fewer rows if the data is short; at least one)."""
    src = Path(data) if data is not None else Path(source)
    work = run_dir(src) if src.is_dir() else None
    if src.is_dir():
        if work is None:
            raise CalibError(f"{src}: calibration data must be a .txt/.jsonl file or a training run "
                             "(pass --calib DATA)")
        tok = tokenizer or load_tokenizer(source if data is None else src)
        held = held_out_of_run(work, seq_len=seq_len, batch_size=rows)
        it = build_mixture(held.sources, tok, seed=held.seed, seq_len=seq_len, global_batch=rows, prefetch=False)
        try:
            return np.asarray(next(it)["inputs"], np.int32)
        finally:
            it.close()
    if not src.is_file():
        raise CalibError(f"{src}: calibration data not found")
    tok = tokenizer or load_tokenizer(source)
    ids: list[int] = []
    for t in _texts(src):
        ids += tok.encode(t) + [tok.eos_id]
        if len(ids) >= rows * seq_len:
            break
    n = min(rows, len(ids) // seq_len)
    if n == 0:
        raise CalibError(f"{src}: {len(ids)} tokens, fewer than one row of {seq_len}")
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


@dataclass
class BlockTrace:
    """What one block saw on the calibration tokens (T = rows·seq_len; k copies per token)."""

    x_in: np.ndarray  # [T, D] the block's input (residual stream)
    x_out: np.ndarray  # [T, D] its output
    attn_in: np.ndarray  # [T, D] attn_norm output: q, k, v input
    o_in: np.ndarray  # [T, H·Dh] attention output: o input
    ffn_in: np.ndarray  # [T, D] ffn_norm output: dense / shared gate, up and router input
    hidden: np.ndarray  # [T, F] dense (or shared expert) down input
    copies: np.ndarray | None = None  # [T·k, D] routed expert inputs (score-scaled for sigmoid)
    expert_of: np.ndarray | None = None  # [T·k] expert of each copy


def _attend(attn, x, pos):
    q, k, v = attn.project(x, pos)
    args = (q, k, v, pos, jnp.zeros_like(pos), q.shape[-1] ** -0.5, attn.chunk)
    L = x.shape[1]
    o = chunked_attention(*args) if attn.chunk is not None and L > 2 * attn.chunk else global_attention(*args)
    return o.reshape(*o.shape[:2], -1)


@nnx.jit
def _trace(blk, x, pos):
    """One block on [B, L, D] → (output, the activations of BlockTrace)."""
    a_in = blk.attn_norm(x)
    o_in = _attend(blk.attn, a_in, pos)
    x1 = x + blk.attn._out(o_in.reshape(*o_in.shape[:2], -1, blk.attn.rope[0]))  # rope[0]: head_dim
    f_in = blk.ffn_norm(x1)
    if blk.is_moe:
        ffn = blk.ffn
        y, _ = ffn(f_in, "dropless")
        T = f_in.shape[0] * f_in.shape[1]
        f_TxD = f_in.reshape(T, -1)
        logits = jnp.dot(f_TxD.astype(jnp.float32), ffn.router[...].astype(jnp.float32))
        idx, w = route(logits, ffn.bias[...], ffn.cfg)
        copies = weight_inputs(jnp.repeat(f_TxD, ffn.cfg.top_k, axis=0), w.reshape(-1), ffn.cfg)
        sh = ffn.shared
        hidden = (jax.nn.silu(f_in @ sh.gate[...]) * (f_in @ sh.up[...])) if sh is not None else f_in[..., :0]
        extra = (copies, idx.reshape(-1))
    else:
        y = blk.ffn(f_in)
        hidden = jax.nn.silu(f_in @ blk.ffn.gate[...]) * (f_in @ blk.ffn.up[...])
        extra = (None, None)
    return x1 + y, (a_in, o_in, f_in, hidden, *extra)


def embed(model, tokens_BxL) -> jax.Array:
    return jnp.take(model.embed[...], jnp.asarray(tokens_BxL), axis=0).astype(jnp.float32)


def trace_blocks(model, tokens_BxL: np.ndarray):
    """Yield (layer, BlockTrace) for every block of an unrolled float model, in order."""
    x = embed(model, tokens_BxL)
    B, L = tokens_BxL.shape
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    flat = lambda a: None if a is None else np.asarray(a).reshape(-1, a.shape[-1]) if a.ndim > 1 else np.asarray(a)
    for i, blk in enumerate(model.groups.blocks):
        y, (a_in, o_in, f_in, hidden, copies, expert_of) = _trace(blk, x, pos)
        yield i, BlockTrace(flat(x), flat(y), flat(a_in), flat(o_in), flat(f_in), flat(hidden),
                            flat(copies), flat(expert_of))
        x = y
