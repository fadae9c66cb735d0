"""llama4_jax: train Llama-4-style Mixture-of-Experts language models in JAX/Flax NNX.

Stable public API:
    load_hf(hf_dir) -> model           # a Hugging Face Llama 4 directory (config.json + safetensors)
    load_checkpoint(ckpt_dir) -> model  # one of our checkpoints (converted or from training)
    model(input_ids, segment_ids=None) -> float32 logits [B, L, V]
    generate(model, tokenizer, prompts, max_new_tokens=..., temperature=..., top_k=..., top_p=...,
             seed=..., eos_ids=...) -> Generated(texts, token_ids)
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_hf(hf_dir, **overrides):
    """Build a model from a HF Llama 4 directory. `overrides` change ModelConfig fields
    (e.g. scan_layers=True, compute_dtype="bfloat16") without touching the weights."""
    from .convert.hf import config_from_hf, read_hf_config, read_hf_params
    from .model.store import model_from_flat

    cfg = None
    if overrides:
        cfg = config_from_hf(read_hf_config(hf_dir))[0].replace(**overrides)
    cfg, flat = read_hf_params(hf_dir, cfg)
    return model_from_flat(cfg, flat)


def load_checkpoint(ckpt_dir):
    """Build a model from one of our checkpoints (params checkpoint or training checkpoint)."""
    from .model.store import load_any, model_from_flat

    cfg, flat = load_any(ckpt_dir)
    return model_from_flat(cfg, flat)


def generate(model, tokenizer, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             eos_ids=None, on_tokens=None):
    """Generate from text prompts with a KV cache → `Generated(texts, token_ids)` (llama4_jax/infer/generate.py).
    temperature 0 is greedy; eos_ids defaults to the tokenizer's eos id."""
    from .infer.generate import generate as _generate

    return _generate(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, eos_ids, on_tokens)
