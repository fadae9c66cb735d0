"""llama4_jax: train Llama-4-style Mixture-of-Experts language models in JAX/Flax NNX.

Stable public API:
    load_hf(hf_dir) -> model           # a Hugging Face Llama 4 directory (config.json + safetensors)
    load_checkpoint(ckpt_dir) -> model  # one of our checkpoints (converted or from training)
    model(input_ids, segment_ids=None) -> float32 logits [B, L, V]
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
