"""The stable Python API: load a model from a Hugging Face directory or one of our checkpoints.

    load_hf(hf_dir, **runtime) -> model          # config.json + safetensors
    load_checkpoint(ckpt_dir, **runtime) -> model  # converted params, a training run or a step
    model(input_ids, segment_ids=None) -> float32 logits [B, L, V]

`runtime` sets RuntimeConfig fields (scan_layers=True, compute_dtype="bfloat16", remat=True, ...)
without touching the weights.
"""

from __future__ import annotations

from .convert.hf import read_hf_params
from .model.config import RuntimeConfig
from .model.store import load_any, model_from_flat
from .model.transformer import Llama4


def load_hf(hf_dir, **runtime) -> Llama4:
    rt = RuntimeConfig().replace(**runtime)
    cfg, flat = read_hf_params(hf_dir, rt)
    return model_from_flat(cfg, flat, rt)


def load_checkpoint(ckpt_dir, **runtime) -> Llama4:
    """Our checkpoint, in its stored layout; `runtime` may change anything but `scan_layers`."""
    cfg, flat, saved = load_any(ckpt_dir)
    rt = saved.replace(**runtime) if runtime else saved
    if rt.scan_layers != saved.scan_layers:
        raise ValueError(f"{ckpt_dir}: stored with scan_layers={saved.scan_layers}; load it as stored")
    return model_from_flat(cfg, flat, rt)
