"""Model state on the host: flat names, the config file, and the params-only Orbax checkpoint.

A params checkpoint directory holds `model_config.json`, `params/` (Orbax, a flat dict
`"groups.blocks.3.attn.q" → array`), `special_tokens.json` and, when the source had one, the HF
`generation_config.json`. Training checkpoints (train/checkpoint.py) hold the same variables
inside the train state, under the same names, and the special tokens in their meta;
`load_any` and `load_special_tokens` read either.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from .config import ModelConfig, MoEConfig, RopeScaling
from .special_tokens import SpecialTokens
from .transformer import Llama4

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENS_FILE = "special_tokens.json"
GENERATION_FILE = "generation_config.json"
META_TOKENS_KEY = "special_tokens"  # in a training checkpoint's meta (train/loop.py Trainer.meta)


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["moe"] = MoEConfig(**d.get("moe", {}))
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    for k in ("moe_layers", "no_rope_layers", "layer_types", "fp8_families"):
        d[k] = tuple(d.get(k) or ())
    return ModelConfig(**d)


def layer_slot(cfg: ModelConfig, layer: int) -> tuple[tuple, int | None]:
    """Where layer `layer` lives in the state: (path prefix, index along the scan axis or None)."""
    if cfg.scan_layers:
        period = cfg.scan_period()
        g, j = divmod(layer, period)
        return ("groups", "blocks", j), g
    return ("groups", "blocks", layer), None


def flat_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: ModelConfig) -> Llama4:
    return nnx.eval_shape(lambda: Llama4(cfg, rngs=nnx.Rngs(0)))


def state_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat name → ShapeDtypeStruct of every variable of the model (no allocation)."""
    state = nnx.state(abstract_model(cfg))
    return {flat_name(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
            for p, v in state.flat_state()}


def model_from_flat(cfg: ModelConfig, flat: dict[str, np.ndarray]) -> Llama4:
    """Build a model whose variables are the given host arrays (names from `state_shapes`)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    missing = [flat_name(p) for p, _ in state.flat_state() if flat_name(p) not in flat]
    if missing:
        raise ValueError(f"missing parameter {missing[0]}")
    for p, v in state.flat_state():
        arr = flat[flat_name(p)]
        want = v.get_value()
        if tuple(arr.shape) != tuple(want.shape):
            raise ValueError(f"parameter {flat_name(p)}: shape {tuple(arr.shape)}, model expects {tuple(want.shape)}")
        v.set_value(jax.numpy.asarray(arr, dtype=want.dtype))
    return nnx.merge(graphdef, state)


def model_to_flat(model: Llama4) -> dict[str, np.ndarray]:
    return {flat_name(p): np.asarray(v.get_value()) for p, v in nnx.state(model).flat_state()}


def save_params(out_dir: Path, cfg: ModelConfig, flat: dict[str, np.ndarray],
                tokens: SpecialTokens = SpecialTokens()) -> None:
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1))
    (out_dir / TOKENS_FILE).write_text(json.dumps(tokens.ids(), indent=1))
    if tokens.generation_config is not None:
        (out_dir / GENERATION_FILE).write_text(json.dumps(dict(tokens.generation_config), indent=1))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / PARAMS_DIR, flat)


def load_params(ckpt_dir: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).absolute()
    cfg_file = ckpt_dir / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: not found (not a llama4_jax params checkpoint)")
    cfg = config_from_dict(json.loads(cfg_file.read_text()))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev) for k, s in state_shapes(cfg).items()}
    with ocp.StandardCheckpointer() as ckptr:
        flat = ckptr.restore(ckpt_dir / PARAMS_DIR, target)
    return cfg, flat


def _step_dir(ckpt_dir: Path) -> Path:
    from ..train.checkpoint import find_step_dir  # the training layout

    step_dir = find_step_dir(ckpt_dir) if ckpt_dir.is_dir() else None
    if step_dir is None:
        raise FileNotFoundError(f"{ckpt_dir}: neither a params checkpoint ({CONFIG_FILE}) nor a training "
                                "run, checkpoints/ directory or checkpoint step")
    return step_dir


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_special_tokens(ckpt_dir: Path) -> SpecialTokens:
    """The special tokens of any checkpoint `load_any` reads; all None where none were recorded
    (checkpoints written before they were)."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if (ckpt_dir / CONFIG_FILE).exists():
        ids = _read_json(ckpt_dir / TOKENS_FILE) if (ckpt_dir / TOKENS_FILE).exists() else {}
        gen = ckpt_dir / GENERATION_FILE
        return SpecialTokens.from_dict({**ids, "generation_config": _read_json(gen) if gen.exists() else None})
    # train/checkpoint.py writes the meta item as JSON at <step>/meta/metadata.
    meta = _read_json(_step_dir(ckpt_dir) / "meta" / "metadata")
    return SpecialTokens.from_dict(meta.get(META_TOKENS_KEY))


def load_any(ckpt_dir: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A params checkpoint (convert from-hf), or a training run: its workdir, its `checkpoints/`
    directory (newest step) or one step directory. Only the model's variables are read; the
    special tokens are `load_special_tokens`'s."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if (ckpt_dir / CONFIG_FILE).exists():
        return load_params(ckpt_dir)
    from ..train.checkpoint import CheckpointError, read_model  # the training layout

    step_dir = _step_dir(ckpt_dir)
    cfg_dict, flat = read_model(step_dir)
    cfg = config_from_dict(cfg_dict)
    want = state_shapes(cfg)
    missing = sorted(set(want) - set(flat))
    if missing:
        raise CheckpointError(f"{step_dir}: missing parameter {missing[0]}")
    return cfg, {k: flat[k] for k in want}
