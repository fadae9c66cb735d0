"""Model state on the host: flat names, config files, the params-only Orbax checkpoint, and
reading the model out of a training checkpoint's files.

A params checkpoint directory holds `model_config.json` (the architecture), `runtime.json` (how
the weights were stored: dtype, scanned layout), `params/` (Orbax, a flat dict
`"groups.blocks.3.attn.q" → array`), `special_tokens.json` and, when the source had one, the HF
`generation_config.json`. Training checkpoints (train/checkpoint.py writes them) hold the same
variables inside the train state, under the same names, with the configs and the special tokens
in their `meta` item; `load_any` and `load_special_tokens` read either.

Files written before the architecture / runtime split (one `model_config.json` holding both,
and the balancing coefficients) still load: the runtime fields are read out of it, and the
coefficients (training settings) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ..errors import CheckpointError
from ..parallel.rules import tree_shardings
from .config import AudioConfig, ModelConfig, MoEConfig, MoERuntime, RopeScaling, RuntimeConfig, VisionConfig
from .multimodal import build_model
from .quant import QUANT_FILE, QuantSpec
from .special_tokens import SpecialTokens
from .transformer import Llama4

CONFIG_FILE = "model_config.json"
RUNTIME_FILE = "runtime.json"
PARAMS_DIR = "params"
TOKENS_FILE = "special_tokens.json"
GENERATION_FILE = "generation_config.json"
META_TOKENS_KEY = "special_tokens"  # in a training checkpoint's meta (train/loop.py Trainer.meta)

_RUNTIME_KEYS = {f.name for f in dataclasses.fields(RuntimeConfig)} - {"moe", "quant"}
_MOE_RUNTIME_KEYS = {f.name for f in dataclasses.fields(MoERuntime)}
# Balancing coefficients that files written before the split carry in `moe`: training settings.
_LEGACY_TRAINING_KEYS = {"aux_loss_coef", "z_loss_coef", "bias_update_rate"}


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def runtime_to_dict(rt: RuntimeConfig) -> dict:
    """The runtime, less `quant` (a quantized params directory records it in quantization.json)."""
    d = dataclasses.asdict(rt)
    d.pop("quant", None)
    return d


def config_from_dict(d: dict) -> ModelConfig:
    """The architecture from a saved dict (runtime fields of older files are skipped)."""
    d = {k: v for k, v in d.items() if k not in _RUNTIME_KEYS}
    moe = {k: v for k, v in (d.get("moe") or {}).items()
           if k not in _MOE_RUNTIME_KEYS | _LEGACY_TRAINING_KEYS}
    d["moe"] = MoEConfig(**moe)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    for k in ("moe_layers", "no_rope_layers", "layer_types"):
        d[k] = tuple(d.get(k) or ())
    if d.get("vision"):
        d["vision"] = VisionConfig(**d["vision"])
    if d.get("audio"):
        d["audio"] = AudioConfig(**d["audio"])
    return ModelConfig(**d)


def runtime_from_dict(d: dict | None) -> RuntimeConfig:
    """A saved runtime dict, or the runtime fields of an older combined model-config dict."""
    d = d or {}
    kw = {k: v for k, v in d.items() if k in _RUNTIME_KEYS}
    kw["fp8_families"] = tuple(kw.get("fp8_families") or ())
    kw["moe"] = MoERuntime(**{k: v for k, v in (d.get("moe") or {}).items() if k in _MOE_RUNTIME_KEYS})
    return RuntimeConfig(**kw)


def flat_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: ModelConfig, rt: RuntimeConfig | None = None) -> Llama4:
    return nnx.eval_shape(lambda: build_model(cfg, rt, rngs=nnx.Rngs(0)))


def state_shapes(cfg: ModelConfig, rt: RuntimeConfig | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat name → ShapeDtypeStruct of every variable of the model (no allocation)."""
    state = nnx.state(abstract_model(cfg, rt))
    return {flat_name(p): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
            for p, v in state.flat_state()}


def flat_shardings(cfg: ModelConfig, rt: RuntimeConfig | None, mesh, rules) -> dict:
    """Flat name → the NamedSharding the rules table gives that variable on `mesh`."""
    shardings = tree_shardings(nnx.state(abstract_model(cfg, rt)), mesh, rules)
    return {flat_name(p): v.get_value() for p, v in shardings.flat_state()}


def unrolled(cfg, flat: dict, rt):
    """(arrays, runtime) in the per-layer layout generation needs, from a checkpoint stored with
    `rt` (a scan-layout checkpoint's stacked arrays are split per layer)."""
    if not rt.scan_layers:
        return flat, rt
    out = {k: v for k, v in flat.items() if not k.startswith("groups.")}
    for layer in range(cfg.num_layers):
        (prefix, g), dst = cfg.layer_slot(layer, True), flat_name(cfg.layer_slot(layer, False)[0])
        src = flat_name(prefix) + "."
        out.update({dst + "." + k[len(src):]: v[g] for k, v in flat.items() if k.startswith(src)})
    return out, rt.replace(scan_layers=False)


def model_from_flat(cfg: ModelConfig, flat: dict[str, np.ndarray], rt: RuntimeConfig | None = None) -> Llama4:
    """Build a model whose variables are the given arrays (names from `state_shapes`): host
    arrays go to the default device, jax.Arrays (e.g. sharded over a mesh) are kept as they are."""
    graphdef, state = nnx.split(abstract_model(cfg, rt))
    missing = [flat_name(p) for p, _ in state.flat_state() if flat_name(p) not in flat]
    if missing:
        if missing[0] + ".qweight" in flat:
            raise CheckpointError(f"parameter {missing[0]} is int4-quantized (quantization.json): a quantized "
                                  "checkpoint is for inference (generate, eval), not for training")
        raise CheckpointError(f"missing parameter {missing[0]}")
    for p, v in state.flat_state():
        arr = flat[flat_name(p)]
        want = v.get_value()
        if tuple(arr.shape) != tuple(want.shape):
            raise CheckpointError(f"parameter {flat_name(p)}: shape {tuple(arr.shape)}, model expects {tuple(want.shape)}")
        if isinstance(arr, jax.Array) and arr.dtype == want.dtype:
            v.set_value(arr)  # already placed (and sharded) where it should live
        else:
            v.set_value(jax.numpy.asarray(arr, dtype=want.dtype))
    return nnx.merge(graphdef, state)


def _target(cfg: ModelConfig, rt: RuntimeConfig | None, shardings: dict | None) -> dict[str, jax.ShapeDtypeStruct]:
    """What to restore: every variable's shape and dtype, on the given shardings (flat name →
    Sharding) or on the first device. Orbax then reads only each device's slices."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=(shardings or {}).get(k, dev))
            for k, s in state_shapes(cfg, rt).items()}


# --- the params checkpoint (convert from-hf, init_from) ---------------------------------------
def save_params(out_dir: Path, cfg: ModelConfig, flat: dict[str, np.ndarray], *, rt: RuntimeConfig | None = None,
                tokens: SpecialTokens = SpecialTokens()) -> None:
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1))
    (out_dir / RUNTIME_FILE).write_text(json.dumps(runtime_to_dict(rt or RuntimeConfig()), indent=1))
    (out_dir / TOKENS_FILE).write_text(json.dumps(tokens.ids(), indent=1))
    if rt is not None and rt.quant is not None:
        q = {"format": "llama4_jax-int4", **dataclasses.asdict(rt.quant)}
        (out_dir / QUANT_FILE).write_text(json.dumps(q, indent=1))
    if tokens.generation_config is not None:
        (out_dir / GENERATION_FILE).write_text(json.dumps(dict(tokens.generation_config), indent=1))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / PARAMS_DIR, flat)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _params_configs(ckpt_dir: Path) -> tuple[ModelConfig, RuntimeConfig]:
    """A params directory's architecture and stored runtime (an older file holds both in one)."""
    cfg_file = ckpt_dir / CONFIG_FILE
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: not found (not a llama4_jax params checkpoint)")
    saved = _read_json(cfg_file)
    rt_file = ckpt_dir / RUNTIME_FILE
    rt = runtime_from_dict(_read_json(rt_file) if rt_file.exists() else saved)
    if (ckpt_dir / QUANT_FILE).exists():  # int4 linears (model/quant.py)
        q = _read_json(ckpt_dir / QUANT_FILE)
        try:
            spec = QuantSpec(**{k: v for k, v in q.items() if k != "format"})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt_dir / QUANT_FILE}: {str(e).splitlines()[0]}") from None
        rt = rt.replace(quant=spec, scan_layers=False)
    return config_from_dict(saved), rt


def _meta_configs(meta: dict) -> tuple[ModelConfig, RuntimeConfig]:
    """A training checkpoint meta's architecture and runtime (older metas: both in model_config)."""
    return config_from_dict(meta["model_config"]), runtime_from_dict(meta.get("runtime", meta["model_config"]))


def load_params(ckpt_dir: Path, shardings: dict | None = None) -> tuple[ModelConfig, dict[str, np.ndarray], RuntimeConfig]:
    ckpt_dir = Path(ckpt_dir).absolute()
    cfg, rt = _params_configs(ckpt_dir)
    target = _target(cfg, rt, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        flat = ckptr.restore(ckpt_dir / PARAMS_DIR, target)
    return cfg, flat, rt


# --- the model inside a training checkpoint ---------------------------------------------------
def find_step_dir(path: Path) -> Path | None:
    """A run workdir, its `checkpoints/` directory, or one step directory → the step directory
    to read (the newest complete one); None if `path` is none of these."""
    path = Path(path).absolute()
    if (path / "state").is_dir() and (path / "meta").is_dir():
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir()
                    and (p / "state").is_dir() and (p / "meta").is_dir()), reverse=True) if path.is_dir() else []
    return path / str(steps[0]) if steps else None


def _strip_value(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if keys and keys[-1] == "value":  # nnx Variables are saved as {"value": array}
        keys = keys[:-1]
    return ".".join(keys)


def read_arrays(step_dir: Path, parts: tuple[str, ...] | None = None,
                shardings: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{part: {flat name: array}} of one step's train state (parts: "params", "extra",
    "opt_state", "step", ...; None: all), whatever mesh wrote it: host arrays read on one device,
    or, for the flat names in `shardings`, arrays on those shardings (only each device's slices
    are read)."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = epath.Path(Path(step_dir).absolute() / "state")
    handler = ocp.PyTreeCheckpointHandler()  # the item alone: no step-level metadata expected
    where = lambda path: (shardings or {}).get(_strip_value(path[1:]), dev)
    try:
        tree = handler.metadata(item).tree
        target = jax.tree_util.tree_map_with_path(
            lambda p, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=where(p)),
            {k: v for k, v in tree.items() if parts is None or k in parts})
        args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=dev, global_shape=s.shape, dtype=s.dtype), target)
        out = handler.restore(item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=args, partial_restore=parts is not None))
    finally:
        handler.close()
    keep = lambda leaf: leaf if shardings else np.asarray(leaf)
    return {part: {_strip_value(path): keep(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
            for part, tree in out.items()}


def read_meta(step_dir: Path) -> dict:
    """The `meta` item (JSON) of one training-checkpoint step directory."""
    meta = _read_json(Path(step_dir) / "meta" / "metadata")
    if "model_config" not in meta:
        raise CheckpointError(f"{Path(step_dir) / 'meta'}: no model_config in the checkpoint metadata")
    return meta


def read_model(step_dir: Path, shardings: dict | None = None) -> tuple[ModelConfig, dict[str, np.ndarray], RuntimeConfig]:
    """(architecture, flat name → host array of every model variable, runtime it was saved
    with) of one step dir. Only `params` and `extra` (router biases, FP8 scales) are read; the
    optimizer state stays on disk."""
    cfg, rt = _meta_configs(read_meta(step_dir))
    arrays = read_arrays(step_dir, ("params", "extra"), shardings)
    return cfg, {**arrays.get("params", {}), **arrays.get("extra", {})}, rt


def _step_dir(ckpt_dir: Path) -> Path:
    step_dir = find_step_dir(ckpt_dir) if ckpt_dir.is_dir() else None
    if step_dir is None:
        raise CheckpointError(f"{ckpt_dir}: neither a params checkpoint ({CONFIG_FILE}) nor a training "
                              "run, checkpoints/ directory or checkpoint step")
    return step_dir


def load_special_tokens(ckpt_dir: Path) -> SpecialTokens:
    """The special tokens of any checkpoint `load_any` reads; all None where none were recorded
    (checkpoints written before they were)."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if (ckpt_dir / CONFIG_FILE).exists():
        ids = _read_json(ckpt_dir / TOKENS_FILE) if (ckpt_dir / TOKENS_FILE).exists() else {}
        gen = ckpt_dir / GENERATION_FILE
        return SpecialTokens.from_dict({**ids, "generation_config": _read_json(gen) if gen.exists() else None})
    return SpecialTokens.from_dict(read_meta(_step_dir(ckpt_dir)).get(META_TOKENS_KEY))


def peek_config(ckpt_dir: Path) -> tuple[ModelConfig, RuntimeConfig]:
    """The architecture and stored runtime of a checkpoint `load_any` reads, without its arrays."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if (ckpt_dir / CONFIG_FILE).exists():
        return _params_configs(ckpt_dir)
    return _meta_configs(read_meta(_step_dir(ckpt_dir)))


def load_any(ckpt_dir: Path, shardings: dict | None = None) -> tuple[ModelConfig, dict[str, np.ndarray], RuntimeConfig]:
    """A params checkpoint (convert from-hf), or a training run: its workdir, its `checkpoints/`
    directory (newest step) or one step directory. Only the model's variables are read; with
    `shardings` (flat name → Sharding, e.g. `flat_shardings` of this run's mesh) straight onto
    them, each process reading only its devices' slices.
    → (architecture, flat variables, the runtime they were stored with)."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if (ckpt_dir / CONFIG_FILE).exists():
        return load_params(ckpt_dir, shardings)
    step_dir = _step_dir(ckpt_dir)
    cfg, flat, rt = read_model(step_dir, shardings)
    want = state_shapes(cfg, rt)
    missing = sorted(set(want) - set(flat))
    if missing:
        raise CheckpointError(f"{step_dir}: missing parameter {missing[0]}")
    return cfg, {k: flat[k] for k in want}, rt
