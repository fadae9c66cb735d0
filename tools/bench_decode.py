"""KV-cache generation speed: prefill tokens/s and decode ms/token, ours beside HF transformers
`generate` on the same CPU in the same process, on the `bench_cpu` model shape (random weights,
the same weights on both sides).

    python tools/bench_decode.py                       # batch 1 and 8, 128-token prompts, 64 new tokens
    python tools/bench_decode.py --batch 1 --repeats 5

Ours: the compiled prefill, then the compiled decode loop (all new tokens in one `lax.while_loop`)
and, for streaming, the per-token compiled step; each timed after a warm-up (compilation excluded).
HF: `model(ids, use_cache=True)` for the prefill; `generate(do_sample=False)` for decoding, its
per-token time = (time for N new tokens − time for 1) / (N − 1). No EOS stops either side. Medians
of --repeats runs. Numbers go in BENCHMARKS.md ("KV-cache decoding").
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama4_jax.convert.hf import config_to_hf, hf_tensors
from llama4_jax.infer import generate as G
from llama4_jax.infer.sampling import Sampling
from llama4_jax.model import kv_cache, store
from llama4_jax.model.config import preset


def random_flat(cfg, seed=0):
    rng = np.random.default_rng(seed)
    flat = {}
    for name, s in store.state_shapes(cfg).items():
        if name.endswith(".ffn.bias"):
            flat[name] = np.zeros(s.shape, s.dtype)
        else:
            base = 1.0 if name.endswith(".scale") else 0.0
            flat[name] = (base + cfg.initializer_range * rng.standard_normal(s.shape)).astype(s.dtype)
    return flat


def hf_model(cfg, flat):
    import torch
    import transformers

    hc = transformers.Llama4TextConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})
    model = transformers.Llama4ForCausalLM(hc).eval()
    _, tensors = hf_tensors(cfg, flat)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors}, strict=True)
    return model


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def bench_ours(model, ids_BxL, new, repeats):
    B, L = ids_BxL.shape
    graphdef, state = nnx.split(model)
    total = kv_cache.bucket(kv_cache.bucket(L, G.PROMPT_BUCKET) + new)
    lengths = jnp.full((B,), L, jnp.int32)
    eos, pad, knobs = G._eos_array([]), jnp.int32(0), Sampling().arrays()
    ids = jnp.asarray(ids_BxL)

    def prefill():
        loop = G._prefill(graphdef, state, ids, lengths, jax.random.key(0), eos, pad, knobs, total=total, out_len=total)
        return jax.block_until_ready(loop)

    def decode_loop():
        loop = G._decode_loop(graphdef, state, prefill(), jnp.int32(new), eos, pad, knobs)
        return jax.block_until_ready(loop)

    def decode_stream():
        loop = prefill()
        for _ in range(new - 1):
            loop = G._decode_one(graphdef, state, loop, eos, pad, knobs)
            np.asarray(loop.token_B)  # what a streaming caller does every token
        return loop

    prefill(), decode_loop(), decode_stream()  # compile
    t_pre, _ = timed(prefill, repeats)
    t_loop, loop = timed(decode_loop, repeats)
    t_stream, _ = timed(decode_stream, repeats)
    tokens = np.asarray(loop.out_BxN)[:, :new]
    return t_pre, (t_loop - t_pre) / (new - 1), (t_stream - t_pre) / (new - 1), tokens


def bench_hf(model, ids_BxL, new, repeats):
    import torch

    ids = torch.as_tensor(ids_BxL, dtype=torch.long)
    mask = torch.ones_like(ids)

    def gen(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)

    def prefill():
        with torch.no_grad():
            return model(ids, attention_mask=mask, use_cache=True)

    gen(2)  # warm-up
    t_pre, _ = timed(prefill, repeats)
    t1, _ = timed(lambda: gen(1), repeats)
    tn, out = timed(lambda: gen(new), repeats)
    return t_pre, (tn - t1) / (new - 1), out[:, ids.shape[1]:].numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default: 1 and 8)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="ours only")
    args = ap.parse_args()
    cfg = preset("bench_cpu")
    flat = random_flat(cfg)
    model = store.model_from_flat(cfg, flat)
    hf = None if args.no_hf else hf_model(cfg, flat)
    print(f"bench_cpu: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.moe.num_experts} experts top-{cfg.moe.top_k}, "
          f"vocab {cfg.vocab_size}; prompt {args.prompt_len}, {args.new} new tokens; jax {jax.__version__} "
          f"({jax.default_backend()})")
    header = ("batch", "prefill tok/s ours", "HF", "ratio", "decode ms/tok ours (loop)", "ours (streamed)", "HF",
              "ratio (loop)", "ratio (streamed)", "same tokens")
    print(" | ".join(header))
    for B in args.batch or [1, 8]:
        ids = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, args.prompt_len)).astype(np.int32)
        pre, dec, dec_s, toks = bench_ours(model, ids, args.new, args.repeats)
        row = [B, B * args.prompt_len / pre]
        if hf is not None:
            hpre, hdec, htoks = bench_hf(hf, ids, args.new, args.repeats)
            row += [B * args.prompt_len / hpre, hpre / pre, dec * 1e3, dec_s * 1e3, hdec * 1e3, hdec / dec, hdec / dec_s,
                    bool((htoks == toks).all())]
        else:
            row += ["-", "-", dec * 1e3, dec_s * 1e3, "-", "-", "-", "-"]
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row), flush=True)


if __name__ == "__main__":
    main()
