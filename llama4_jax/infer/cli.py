"""`llama4-jax generate SOURCE --prompt TEXT ...`: load a model and its tokenizer, stream completions.

SOURCE is a Hugging Face directory (config.json + safetensors; tokenizer.json beside it if present;
EOS ids from generation_config.json, else config.json), one of our params checkpoints
(`convert from-hf`), or a training run (its workdir, `checkpoints/` or one step; the tokenizer
named by the run's config.resolved.yaml). `--tokenizer` overrides the tokenizer: `byte`, a
tokenizer.json (or a directory holding one) or a SentencePiece .model (`infer/source.py`, shared
with eval and compress; no tokenizer found is an error here). All prompts run as one
batch; the first prompt's text streams as it is produced, each later one as soon as every prompt
before it has finished. Our checkpoints carry their EOS ids (model/special_tokens.py); HF
directories give theirs in generation_config.json / config.json; `--eos-id` overrides both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from ..convert.hf import read_hf_params
from ..errors import GenerateError, UserError
from ..model.kv_cache import KV_STORAGE
from ..model.store import CONFIG_FILE, load_any, load_special_tokens, model_from_flat, unrolled
from .generate import generate_ids
from .sampling import Sampling
from .source import load_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="HF directory, params checkpoint, or training workdir / checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", action="append", default=[], type=Path,
                   help="a file whose whole text is one prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 (default): no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="1 (default): no nucleus cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="byte | tokenizer.json (or its directory) | SentencePiece .model")
    p.add_argument("--kv-cache", choices=KV_STORAGE, default="model",
                   help="KV cache storage: model (compute dtype, default), int8 or fp8 (8-bit codes with a scale "
                        "per head vector: ~2x smaller than bf16, ~4x than f32)")
    p.add_argument("--eos-id", type=int, action="append", default=None,
                   help="stop token id (repeatable; replaces the source's EOS ids)")


# --- the source ---------------------------------------------------------------------------------
def hf_eos_ids(hf_dir: Path) -> list[int]:
    """eos_token_id (an int or a list) from generation_config.json, else config.json (or its text_config)."""
    for name in ("generation_config.json", "config.json"):
        path = hf_dir / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GenerateError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
        eos = raw.get("eos_token_id", (raw.get("text_config") or {}).get("eos_token_id"))
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def load_source(source: Path, tokenizer: str | None):
    """→ (model, tokenizer, default EOS ids)."""
    if not source.exists():
        raise GenerateError(f"{source}: not found")
    try:
        tok = load_tokenizer(source, tokenizer)
    except UserError as e:
        raise GenerateError(str(e)) from None
    if (source / "config.json").is_file():
        model = model_from_flat(*read_hf_params(source))
        eos = hf_eos_ids(source)
    else:
        if not (source / CONFIG_FILE).is_file() and not source.is_dir():
            raise GenerateError(f"{source}: not a Hugging Face directory, params checkpoint or training run")
        cfg, flat, rt = load_any(source)
        model = model_from_flat(cfg, *unrolled(cfg, flat, rt))
        saved = load_special_tokens(source).eos_token_id
        eos = None if saved is None else ([saved] if isinstance(saved, int) else list(saved))
    if tok is None:
        raise GenerateError(f"{source}: no tokenizer found beside it; pass --tokenizer (byte, tokenizer.json or .model)")
    return model, tok, (eos if eos is not None else [tok.eos_id])


# --- streaming ---------------------------------------------------------------------------------
class Streamer:
    """Writes row r's new text as soon as every row before it has finished (row 0: at once)."""

    def __init__(self, tokenizer, n_rows: int, eos_ids, out=None):
        self.tok, self.eos, self.out = tokenizer, set(eos_ids), out or sys.stdout
        self.ids = [[] for _ in range(n_rows)]
        self.done = [False] * n_rows
        self.printed = [0] * n_rows
        self.row = 0

    def __call__(self, tokens_B, done_B) -> None:
        for b, (t, d) in enumerate(zip(tokens_B.tolist(), done_B.tolist())):
            if not self.done[b]:
                self.ids[b].append(t)
                self.done[b] = bool(d)
        self.flush()

    def flush(self, final: bool = False) -> None:
        while self.row < len(self.ids):
            r = self.row
            text = self.tok.decode([t for t in self.ids[r] if t not in self.eos])
            finished = final or self.done[r]
            if not finished and text.endswith("\ufffd"):  # a character cut mid-way: wait for the rest
                text = text[:-1]
            self.out.write(text[self.printed[r]:])
            self.printed[r] = max(self.printed[r], len(text))
            if not finished:
                break
            self.out.write("\n" if r == len(self.ids) - 1 else "\n\n")
            self.row += 1
        self.out.flush()


def generate_main(args) -> int:
    prompts = list(args.prompt)
    for f in args.prompt_file:
        if not f.is_file():
            raise GenerateError(f"{f}: prompt file not found")
        prompts.append(f.read_text())
    if not prompts:
        raise GenerateError("no prompt: pass --prompt TEXT or --prompt-file F")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    model, tok, eos = load_source(args.source, args.tokenizer)
    eos = args.eos_id if args.eos_id is not None else eos
    stream = Streamer(tok, len(prompts), eos)
    t0 = time.perf_counter()
    ids = generate_ids(model, [tok.encode(p) for p in prompts], args.max_new_tokens, sampling, args.seed, eos,
                       tok.pad_id if tok.pad_id < model.cfg.vocab_size else 0, on_tokens=stream, kv=args.kv_cache)
    stream.flush(final=True)
    n = sum(len(r) for r in ids)
    print(f"[{n} tokens in {time.perf_counter() - t0:.2f} s, compilation included]", file=sys.stderr)
    return 0
