"""Hugging Face Llama 4 ↔ llama4_jax parameters.

Reading streams tensor by tensor from safetensors (single file or sharded index) into
preallocated host arrays of the final layout, so a checkpoint is never held twice. Writing
streams the other way: the safetensors header is computed from shapes first, then each tensor
is converted and appended, one at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConvertError
from ..model.config import LAYER_TYPES, ModelConfig, MoEConfig, RopeScaling, RuntimeConfig, VisionConfig
from ..model.special_tokens import SpecialTokens
from ..model.store import flat_name, load_any, load_special_tokens, save_params, state_shapes


# --- config -------------------------------------------------------------------------------
def _text_config(raw: dict, path: Path) -> tuple[dict, str]:
    """→ (text config dict, key prefix for weights)."""
    arch = (raw.get("architectures") or [None])[0]
    mtype = raw.get("model_type")
    if arch == "Llama4ForConditionalGeneration" or mtype == "llama4":
        if "text_config" not in raw:
            raise ConvertError(f"{path}: model_type llama4 without text_config")
        return raw["text_config"], "language_model."
    if arch in ("Llama4ForCausalLM", None) and mtype in ("llama4_text", None) and (arch or mtype):
        return raw, ""
    raise ConvertError(f"{path}: unsupported architecture {arch or mtype!r} "
                       "(expected Llama4ForCausalLM or Llama4ForConditionalGeneration)")


def _rope(tc: dict) -> tuple[float, RopeScaling | None]:
    rp = tc.get("rope_parameters") or {}
    legacy = tc.get("rope_scaling") or {}
    theta = rp.get("rope_theta", tc.get("rope_theta", 500000.0))
    spec = rp if rp.get("rope_type", "default") != "default" else legacy
    kind = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConvertError(f"rope type {kind!r} is not supported (default or llama3)")
    return float(theta), RopeScaling(
        factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
        high_freq_factor=float(spec["high_freq_factor"]),
        original_max_position_embeddings=int(spec["original_max_position_embeddings"]))


# Every field of transformers' Llama4TextConfig with its default (transformers 5.24,
# models/llama4/configuration_llama4.py): a key missing from config.json means what transformers
# would read. None marks a field HF derives in __post_init__: num_key_value_heads → heads and
# head_dim → hidden_size // heads when null (5.24 rejects these nulls, older files carry them),
# no_rope_layers from no_rope_layer_interval, moe_layers from interleave_moe_layer_step,
# layer_types from no_rope_layers and attention_chunk_size, rope_parameters → default RoPE.
HF_TEXT_DEFAULTS = {
    "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 4096 * 32, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
    "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "attention_dropout": 0.0, "num_experts_per_tok": 1, "num_local_experts": 16, "moe_layers": None,
    "interleave_moe_layer_step": 1, "use_qk_norm": True, "output_router_logits": False,
    "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "rope_parameters": None, "no_rope_layers": None,
    "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "layer_types": None,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "attention_bias": False,
}
# HF's own rename of a legacy layer type (configuration_utils._LEGACY_LAYER_TYPE_REMAP).
_LEGACY_LAYER_TYPES = {"attention": "full_attention"}


def _layer_types(tc: dict, path: Path) -> tuple[str, ...]:
    """Explicit HF layer_types, validated; () when absent (ModelConfig derives the same)."""
    given = tc["layer_types"]
    if given is None:
        return ()
    if not isinstance(given, list) or len(given) != tc["num_hidden_layers"]:
        n = len(given) if isinstance(given, list) else type(given).__name__
        raise ConvertError(f"{path}: layer_types has {n} entries for num_hidden_layers={tc['num_hidden_layers']}")
    types = tuple(_LEGACY_LAYER_TYPES.get(t, t) for t in given)
    unknown = sorted({t for t in types if t not in LAYER_TYPES}, key=str)
    if unknown:
        raise ConvertError(f"{path}: layer_types: unsupported type {unknown[0]!r} "
                           f"(expected {' or '.join(LAYER_TYPES)})")
    if "chunked_attention" in types and tc["attention_chunk_size"] is None:
        raise ConvertError(f"{path}: layer_types has chunked_attention but attention_chunk_size is null")
    return types


# Every field of transformers' Llama4VisionConfig that changes the function, with its default
# (transformers 5.24), and Llama4Config's image token ids.
HF_VISION_DEFAULTS = {
    "hidden_size": 768, "hidden_act": "gelu", "num_hidden_layers": 34, "num_attention_heads": 16,
    "num_channels": 3, "intermediate_size": 5632, "vision_output_dim": 7680, "image_size": 448,
    "patch_size": 14, "norm_eps": 1e-5, "initializer_range": 0.02, "pixel_shuffle_ratio": 0.5,
    "projector_input_dim": 4096, "projector_output_dim": 4096, "multi_modal_projector_bias": False,
    "rope_parameters": None,
}
HF_IMAGE_TOKEN_DEFAULTS = {"image_token_index": 200092, "boi_token_index": 200080, "eoi_token_index": 200081}
# HF names of the vision tower and projector: never under the `language_model.` prefix.
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def _square(v, key: str, path: Path) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ConvertError(f"{path}: vision_config.{key}={v} is not square (only square tiles are supported)")
        v = v[0]
    return int(v)


def vision_from_hf(raw: dict, path: Path = Path("config.json")) -> VisionConfig | None:
    """The vision tower of a Llama4ForConditionalGeneration config.json (None for a text model)."""
    if "vision_config" not in raw or raw.get("vision_config") is None:
        return None
    vc = {**HF_VISION_DEFAULTS, **raw["vision_config"]}
    if vc["hidden_act"] != "gelu":
        raise ConvertError(f"{path}: vision_config.hidden_act {vc['hidden_act']!r} is not supported (gelu)")
    if vc["multi_modal_projector_bias"]:
        raise ConvertError(f"{path}: vision_config.multi_modal_projector_bias=true is not supported")
    rp = vc["rope_parameters"] or {}
    if rp.get("rope_type", "default") != "default":
        raise ConvertError(f"{path}: vision_config rope type {rp['rope_type']!r} is not supported (default)")
    ids = {**HF_IMAGE_TOKEN_DEFAULTS, **{k: raw[k] for k in HF_IMAGE_TOKEN_DEFAULTS if k in raw}}
    try:
        return VisionConfig(
            hidden_size=vc["hidden_size"], num_layers=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"],
            intermediate_size=vc["intermediate_size"], num_channels=vc["num_channels"],
            image_size=_square(vc["image_size"], "image_size", path),
            patch_size=_square(vc["patch_size"], "patch_size", path),
            pixel_shuffle_ratio=float(vc["pixel_shuffle_ratio"]), projector_input_dim=vc["projector_input_dim"],
            projector_output_dim=vc["projector_output_dim"], vision_output_dim=vc["vision_output_dim"],
            rope_theta=float(rp.get("rope_theta", 10000.0)), norm_eps=float(vc["norm_eps"]),
            initializer_range=vc["initializer_range"], image_token_id=ids["image_token_index"],
            boi_token_id=ids["boi_token_index"], eoi_token_id=ids["eoi_token_index"])
    except ValueError as e:
        raise ConvertError(f"{path}: vision_config: {e}") from None


def vision_to_hf(v: VisionConfig) -> dict:
    return {
        "model_type": "llama4_vision_model", "hidden_size": v.hidden_size, "hidden_act": "gelu",
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
        "intermediate_size": v.intermediate_size, "vision_output_dim": v.vision_output_dim,
        "image_size": v.image_size, "patch_size": v.patch_size, "norm_eps": v.norm_eps,
        "initializer_range": v.initializer_range, "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        "projector_input_dim": v.projector_input_dim, "projector_output_dim": v.projector_output_dim,
        "multi_modal_projector_bias": False, "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
    }


def hf_key(prefix: str, hf_name: str) -> str:
    """The file's name of a tensor-map entry: text names under the checkpoint's prefix."""
    return hf_name if hf_name.startswith(VISION_PREFIXES) else prefix + hf_name


def config_from_hf(raw: dict, path: Path = Path("config.json")) -> tuple[ModelConfig, str]:
    tc, prefix = _text_config(raw, path)
    tc = {**HF_TEXT_DEFAULTS, **tc}
    if tc["hidden_act"] != "silu":
        raise ConvertError(f"{path}: hidden_act {tc['hidden_act']!r} is not supported (silu)")
    if tc["attention_bias"]:
        raise ConvertError(f"{path}: attention_bias=true is not supported")
    theta, scaling = _rope(tc)
    n_layers = tc["num_hidden_layers"]
    moe_step = tc["interleave_moe_layer_step"]
    if tc["moe_layers"] == []:  # HF keeps an explicit [] (all layers dense); ours derives on ()
        moe_step = 0
    heads = tc["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"],
        num_layers=n_layers, num_heads=heads, num_kv_heads=tc["num_key_value_heads"] or heads,
        head_dim=tc["head_dim"] or tc["hidden_size"] // heads,
        dense_ff=tc["intermediate_size_mlp"],
        moe=MoEConfig(num_experts=tc["num_local_experts"], top_k=tc["num_experts_per_tok"],
                      expert_ff=tc["intermediate_size"], shared_expert=True, router="sigmoid"),
        moe_layers=tuple(tc["moe_layers"] or ()), interleave_moe_layer_step=moe_step,
        no_rope_layers=tuple(tc["no_rope_layers"] or ()), no_rope_layer_interval=tc["no_rope_layer_interval"],
        attention_chunk_size=tc["attention_chunk_size"], rope_theta=theta, rope_scaling=scaling,
        use_qk_norm=tc["use_qk_norm"],
        # Released Scout/Maverick config.json files carry an int (4); HF reads it as a flag.
        attn_temperature_tuning=bool(tc["attn_temperature_tuning"]),
        floor_scale=tc["floor_scale"], attn_scale=tc["attn_scale"],
        rms_norm_eps=tc["rms_norm_eps"], tie_word_embeddings=tc["tie_word_embeddings"],
        max_position_embeddings=tc["max_position_embeddings"],
        initializer_range=tc["initializer_range"], vision=vision_from_hf(raw, path),
    )
    types = _layer_types(tc, path)
    derived = tuple("chunked_attention" if cfg.is_chunked(i) else "full_attention" for i in range(n_layers))
    # Stored only where it departs from the derived pattern, so a converted checkpoint's config
    # equals an experiment's that leaves layer_types unset (init_from compares them).
    if types and types != derived:
        cfg = cfg.replace(layer_types=types)
    return cfg, prefix


def tokens_from_hf(raw: dict, generation_config: dict | None) -> SpecialTokens:
    """bos/eos/pad ids from config.json (the text config's, else the top level's; a missing key
    means HF's default) and the whole generation_config.json, if there was one."""
    tc = raw.get("text_config", raw)
    pick = lambda k: tc[k] if k in tc else raw.get(k, HF_TEXT_DEFAULTS[k])
    return SpecialTokens.from_dict({"bos_token_id": pick("bos_token_id"), "eos_token_id": pick("eos_token_id"),
                                    "pad_token_id": pick("pad_token_id"), "generation_config": generation_config})


def config_to_hf(cfg: ModelConfig, tokens: SpecialTokens = SpecialTokens()) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    if cfg.audio is not None:
        raise ConvertError("the model has an audio encoder, which no Hugging Face Llama 4 class holds: "
                           "it cannot be written as an HF checkpoint")
    text = _text_config_to_hf(cfg, tokens, rope)
    if cfg.vision is None:
        return text
    v = cfg.vision
    text = {k: val for k, val in text.items() if k not in ("architectures", "torch_dtype")}
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
            "vision_config": vision_to_hf(v), "image_token_index": v.image_token_id,
            "boi_token_index": v.boi_token_id, "eoi_token_index": v.eoi_token_id, "tie_word_embeddings": False,
            "torch_dtype": "float32", **tokens.ids()}


def _text_config_to_hf(cfg: ModelConfig, tokens: SpecialTokens, rope: dict) -> dict:
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.moe.expert_ff, "intermediate_size_mlp": cfg.dense_ff,
        "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
        "moe_layers": list(cfg.moe_layers), "interleave_moe_layer_step": cfg.interleave_moe_layer_step,
        "no_rope_layers": list(cfg.no_rope_layers), "attention_chunk_size": cfg.attention_chunk_size,
        "layer_types": ["chunked_attention" if cfg.is_chunked(i) else "full_attention" for i in range(cfg.num_layers)],
        "rope_parameters": rope, "use_qk_norm": cfg.use_qk_norm,
        "attn_temperature_tuning": bool(cfg.attn_temperature_tuning), "floor_scale": cfg.floor_scale,
        "attn_scale": cfg.attn_scale, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range, "hidden_act": "silu", "attention_bias": False,
        "torch_dtype": "float32", **tokens.ids(),
    }


# --- the tensor map -----------------------------------------------------------------------
# Each entry: HF name (after prefix) → (our path within the layer or model, how to convert).
# Conversions: "T" transpose 2-D, "in_heads"/"out_heads" reshape with heads, "gate"/"up" halves of
# gate_up_proj, "id" as is.
def tensor_map(cfg: ModelConfig) -> list[tuple[str, tuple, str, int | None]]:
    """(hf_name, our path, conversion, layer index or None)."""
    out = [("model.embed_tokens.weight", ("embed",), "id", None), ("model.norm.weight", ("norm", "scale"), "id", None)]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", ("lm_head",), "T", None))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", ("attn_norm", "scale"), "id", i),
            (p + "post_attention_layernorm.weight", ("ffn_norm", "scale"), "id", i),
            (p + "self_attn.q_proj.weight", ("attn", "q"), "in_heads", i),
            (p + "self_attn.k_proj.weight", ("attn", "k"), "in_heads", i),
            (p + "self_attn.v_proj.weight", ("attn", "v"), "in_heads", i),
            (p + "self_attn.o_proj.weight", ("attn", "o"), "out_heads", i),
        ]
        f = p + "feed_forward."
        if cfg.is_moe(i):
            out += [
                (f + "router.weight", ("ffn", "router"), "T", i),
                (f + "experts.gate_up_proj", ("ffn", "experts", "gate"), "gate", i),
                (f + "experts.gate_up_proj", ("ffn", "experts", "up"), "up", i),
                (f + "experts.down_proj", ("ffn", "experts", "down"), "id", i),
            ]
            if cfg.moe.shared_expert:
                out += [(f + f"shared_expert.{n}_proj.weight", ("ffn", "shared", n), "T", i)
                        for n in ("gate", "up", "down")]
        else:
            out += [(f + f"{n}_proj.weight", ("ffn", n), "T", i) for n in ("gate", "up", "down")]
    if cfg.vision is not None:
        out += vision_tensor_map(cfg.vision)
    return out


def vision_tensor_map(v: VisionConfig) -> list[tuple[str, tuple, str, None]]:
    """The vision tower's and projector's entries (HF names without any prefix)."""
    m = "vision_model."
    out = [(m + "patch_embedding.linear.weight", ("vision", "patch"), "T", None),
           (m + "class_embedding", ("vision", "class_embedding"), "id", None),
           (m + "positional_embedding_vlm", ("vision", "position"), "id", None)]
    for hf, ours in (("layernorm_pre", "pre_norm"), ("layernorm_post", "post_norm")):
        out += [(m + f"{hf}.weight", ("vision", ours, "scale"), "id", None),
                (m + f"{hf}.bias", ("vision", ours, "bias"), "id", None)]
    for i in range(v.num_layers):
        p, ours = f"{m}model.layers.{i}.", ("vision", "layers", i)
        for n in ("q", "k", "v"):
            out += [(p + f"self_attn.{n}_proj.weight", ours + (n,), "in_heads", None),
                    (p + f"self_attn.{n}_proj.bias", ours + (f"{n}_bias",), "flat", None)]
        out += [(p + "self_attn.o_proj.weight", ours + ("o",), "out_heads", None),
                (p + "self_attn.o_proj.bias", ours + ("o_bias",), "id", None)]
        for n in ("fc1", "fc2"):
            out += [(p + f"mlp.{n}.weight", ours + (n,), "T", None), (p + f"mlp.{n}.bias", ours + (f"{n}_bias",), "id", None)]
        for hf, o in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
            out += [(p + f"{hf}.weight", ours + (o, "scale"), "id", None), (p + f"{hf}.bias", ours + (o, "bias"), "id", None)]
    out += [(m + "vision_adapter.mlp.fc1.weight", ("vision", "adapter_fc1"), "T", None),
            (m + "vision_adapter.mlp.fc2.weight", ("vision", "adapter_fc2"), "T", None),
            ("multi_modal_projector.linear_1.weight", ("projector", "w"), "T", None)]
    return out


def hf_to_ours(x: np.ndarray, conv: str, shape: tuple) -> np.ndarray:
    if conv == "T":
        return x.T
    if conv == "in_heads":  # [N·Dh, D] → [D, N, Dh]
        return x.T.reshape(shape)
    if conv == "out_heads":  # [D, H·Dh] → [H, Dh, D]
        return x.T.reshape(shape)
    if conv in ("gate", "up"):  # [E, D, 2F]: gate is the first half
        F = x.shape[-1] // 2
        return x[..., :F] if conv == "gate" else x[..., F:]
    if conv == "flat":  # [N·Dh] → [N, Dh]
        return x.reshape(shape)
    return x


def hf_shape(conv: str, ours: tuple) -> tuple:
    """The HF tensor shape that converts to our shape `ours` (gate/up: the fused tensor)."""
    if conv == "T":
        return ours[::-1]
    if conv == "in_heads":
        return (ours[1] * ours[2], ours[0])
    if conv == "out_heads":
        return (ours[2], ours[0] * ours[1])
    if conv in ("gate", "up"):
        return (*ours[:-1], 2 * ours[-1])
    if conv == "flat":
        return (math.prod(ours),)
    return ours


def ours_to_hf(conv: str, x: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """Inverse of hf_to_ours; for the fused gate_up tensor pass gate as x and up as `up`."""
    if conv == "gate":
        return np.concatenate([x, up], axis=-1)
    if conv == "T":
        return x.T
    if conv == "in_heads":  # [D, N, Dh] → [N·Dh, D]
        return x.reshape(x.shape[0], -1).T
    if conv == "out_heads":  # [H, Dh, D] → [D, H·Dh]
        return x.reshape(-1, x.shape[-1]).T
    if conv == "flat":
        return x.reshape(-1)
    return x


# --- safetensors streaming ------------------------------------------------------------------
class SafetensorsReader:
    """Tensor-by-tensor access to a single file or a sharded index."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({e})") from None
            self.where = {k: hf_dir / v for k, v in wm.items()}
        elif single.exists():
            self.where = {k: single for k in self._keys(single)}
        else:
            raise ConvertError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}

    def _keys(self, f: Path):
        try:
            with self._open(str(f), framework="flax") as h:
                return list(h.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ConvertError(f"{f}: unreadable safetensors file ({e})") from None

    def _handle(self, name: str):
        if name not in self.where:
            raise ConvertError(f"missing tensor {name}")
        f = self.where[name]
        if not f.exists():
            raise ConvertError(f"{f}: missing shard (holds {name})")
        if f not in self._handles:
            # "flax" reads bfloat16 too (numpy cannot); arrays come back as host jax arrays.
            self._handles[f] = self._open(str(f), framework="flax")
        return f, self._handles[f]

    def get(self, name: str) -> np.ndarray:
        f, h = self._handle(name)
        try:
            return np.asarray(h.get_tensor(name))
        except Exception as e:
            raise ConvertError(f"{f}: cannot read tensor {name} ({e})") from None

    def shape(self, name: str) -> tuple:
        """The tensor's shape, from the file header (nothing read)."""
        f, h = self._handle(name)
        return tuple(h.get_slice(name).get_shape())

    def get_slice(self, name: str, index: tuple) -> np.ndarray:
        """One block of a tensor (a tuple of slices): only those bytes are read."""
        f, h = self._handle(name)
        try:
            return np.asarray(h.get_slice(name)[index])
        except Exception as e:
            raise ConvertError(f"{f}: cannot read tensor {name} ({e})") from None


_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


def write_safetensors(path: Path, shapes: dict[str, tuple], tensors: Iterator[tuple[str, np.ndarray]],
                      dtype=np.float32) -> None:
    """Stream tensors into one safetensors file: header from shapes first, then data in order."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(math.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, arr in tensors:
            arr = np.ascontiguousarray(arr, dtype=dtype)
            if arr.shape != tuple(shapes[name]):
                raise ConvertError(f"tensor {name}: shape {arr.shape}, header says {shapes[name]}")
            f.write(arr.tobytes())


# --- whole conversions --------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConvertError(f"{path}: not found")
    return _read_json(path)


def read_hf_tokens(hf_dir: Path) -> SpecialTokens:
    """Special-token ids of config.json, and generation_config.json if the directory has one."""
    gen = Path(hf_dir) / "generation_config.json"
    return tokens_from_hf(read_hf_config(hf_dir), _read_json(gen) if gen.exists() else None)


def _full_path(cfg: ModelConfig, path: tuple, layer: int | None, scan_layers: bool):
    if layer is None:
        return path, None
    prefix, idx = cfg.layer_slot(layer, scan_layers)
    return prefix + path, idx


def read_hf_params(hf_dir: Path, rt: RuntimeConfig | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """HF directory → (our config, flat host arrays in the layout and dtype of `rt`). One HF
    tensor in flight."""
    hf_dir = Path(hf_dir)
    rt = rt or RuntimeConfig()
    raw = read_hf_config(hf_dir)
    cfg, prefix = config_from_hf(raw, hf_dir / "config.json")
    reader = SafetensorsReader(hf_dir)
    shapes = state_shapes(cfg, rt)
    host: dict[str, np.ndarray] = {}
    cached = (None, None)
    for hf_name, path, conv, layer in tensor_map(cfg):
        full, idx = _full_path(cfg, path, layer, rt.scan_layers)
        name = flat_name(full)
        spec = shapes[name]
        want = tuple(spec.shape[1:] if idx is not None else spec.shape)
        key = hf_key(prefix, hf_name)
        x = cached[1] if cached[0] == key else reader.get(key)
        cached = (key, x)
        if tuple(x.shape) != hf_shape(conv, want):
            raise ConvertError(f"tensor {key}: shape {tuple(x.shape)}, expected {hf_shape(conv, want)} "
                               f"for this config.json")
        if name not in host:
            host[name] = np.empty(spec.shape, spec.dtype)
        y = hf_to_ours(np.asarray(x), conv, want)
        if idx is None:
            host[name][...] = y
        else:
            host[name][idx] = y
    for name, spec in shapes.items():  # non-parameter state (router bias) starts at zero
        host.setdefault(name, np.zeros(spec.shape, spec.dtype))
    return cfg, host


def hf_tensors(cfg: ModelConfig, flat: dict[str, np.ndarray], scan_layers: bool = False):
    """→ (HF shapes in file order, a generator of (HF name, array)) from our flat arrays."""
    entries = [e for e in tensor_map(cfg) if e[2] != "up"]

    def ours(path, layer, conv):
        full, idx = _full_path(cfg, path, layer, scan_layers)
        a = np.asarray(flat[flat_name(full)])
        return a if idx is None else a[idx]

    def convert(path, conv, layer):
        x = ours(path, layer, conv)
        up = ours(path[:-1] + ("up",), layer, conv) if conv == "gate" else None
        return ours_to_hf(conv, x, up).astype(np.float32)

    # A multimodal model is written as Llama4ForConditionalGeneration: text under `language_model.`.
    out_name = lambda hf_name: hf_key("language_model." if cfg.vision is not None else "", hf_name)
    shapes = {}
    for hf_name, path, conv, layer in entries:
        full, idx = _full_path(cfg, path, layer, scan_layers)
        shp = flat[flat_name(full)].shape
        shapes[out_name(hf_name)] = hf_shape(conv, tuple(shp[1:] if idx is not None else shp))
    gen = ((out_name(hf_name), convert(path, conv, layer)) for hf_name, path, conv, layer in entries)
    return shapes, gen


def _fresh_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConvertError(f"{out_dir}: exists and is not empty (refusing to overwrite)")
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)


def from_hf(hf_dir: Path, out_dir: Path) -> ModelConfig:
    """`llama4-jax convert from-hf`: HF directory → our params checkpoint (written atomically)."""
    cfg, flat = read_hf_params(hf_dir)  # all validation happens before anything is written
    tokens = read_hf_tokens(hf_dir)
    tmp = _fresh_out_dir(out_dir)
    try:
        save_params(tmp, cfg, flat, tokens=tokens)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, Path(out_dir))
    return cfg


def to_hf(ckpt_dir: Path, out_dir: Path) -> ModelConfig:
    """`llama4-jax convert to-hf`: our checkpoint → config.json + generation_config.json +
    model.safetensors."""
    cfg, flat, rt = load_any(ckpt_dir)
    tokens = load_special_tokens(ckpt_dir)
    tmp = _fresh_out_dir(out_dir)
    try:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, tokens), indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(tokens.hf_generation_config(), indent=1))
        shapes, gen = hf_tensors(cfg, flat, rt.scan_layers)
        write_safetensors(tmp / "model.safetensors", shapes, gen)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, Path(out_dir))
    return cfg
