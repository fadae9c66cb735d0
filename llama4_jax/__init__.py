"""llama4_jax: train Llama-4-style Mixture-of-Experts language models in JAX/Flax NNX.

Stable public API (api.py):
    load_hf(hf_dir) -> model           # a Hugging Face Llama 4 directory (config.json + safetensors)
    load_checkpoint(ckpt_dir) -> model  # one of our checkpoints (converted or from training)
    model(input_ids, segment_ids=None) -> float32 logits [B, L, V]
    generate(model, tokenizer, prompts, max_new_tokens=..., temperature=..., top_k=..., top_p=...,
             seed=..., eos_ids=...) -> Generated(texts, token_ids)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import load_checkpoint, load_hf  # noqa: E402
from .infer.generate import generate  # noqa: E402

__all__ = ["generate", "load_checkpoint", "load_hf"]
