"""The stable Python API: load a model from a Hugging Face directory or one of our checkpoints.

    load_hf(hf_dir, mesh=None, **runtime) -> model          # config.json + safetensors
    load_checkpoint(ckpt_dir, mesh=None, **runtime) -> model  # converted params, a training run or a step
    model(input_ids, segment_ids=None) -> float32 logits [B, L, V]
    model(input_ids, pixel_values=...)  # a Llama4ForConditionalGeneration checkpoint loads as
                                        # model.multimodal.Llama4Multimodal (vision tower + projector)

`runtime` sets RuntimeConfig fields (scan_layers=True, compute_dtype="bfloat16", remat="full", ...)
without touching the weights. With a `mesh` (and optionally logical-axis `rules`, default the
project's table) every variable is read straight into the sharding the rules give it: each
process reads only the slices its devices hold.
"""

from __future__ import annotations

from .convert.hf import config_from_hf, read_hf_config, read_hf_params
from .convert.hf_sharded import read_hf_sharded
from .errors import CheckpointError
from .model.config import RuntimeConfig
from .model.store import flat_shardings, load_any, model_from_flat, peek_config
from .model.transformer import Llama4
from .parallel.rules import DEFAULT_RULES


def load_hf(hf_dir, mesh=None, rules=None, **runtime) -> Llama4:
    rt = RuntimeConfig().replace(**runtime)
    if mesh is None:
        cfg, flat = read_hf_params(hf_dir, rt)
    else:
        cfg = config_from_hf(read_hf_config(hf_dir))[0]
        cfg, flat = read_hf_sharded(hf_dir, rt, flat_shardings(cfg, rt, mesh, rules or DEFAULT_RULES))
    return model_from_flat(cfg, flat, rt)


def load_checkpoint(ckpt_dir, mesh=None, rules=None, **runtime) -> Llama4:
    """Our checkpoint, in its stored layout; `runtime` may change anything but `scan_layers`."""
    shardings = None
    if mesh is not None:
        cfg, stored = peek_config(ckpt_dir)
        shardings = flat_shardings(cfg, stored.replace(**runtime), mesh, rules or DEFAULT_RULES)
    cfg, flat, saved = load_any(ckpt_dir, shardings)
    rt = saved.replace(**runtime) if runtime else saved
    if rt.scan_layers != saved.scan_layers:
        raise CheckpointError(f"{ckpt_dir}: stored with scan_layers={saved.scan_layers}; load it as stored")
    return model_from_flat(cfg, flat, rt)
