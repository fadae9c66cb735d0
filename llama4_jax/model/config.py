"""Model configuration: the architecture (`ModelConfig`, mirroring HF `Llama4TextConfig`), how
it runs (`RuntimeConfig`), and presets.

Layers never see the experiment config: they take a `ModelConfig` / `RuntimeConfig` (or the
MoE parts of them), so every module is testable alone. Numeric fields carry their bounds as
pydantic annotations, which the experiment schema enforces on `model.overrides`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import jax.numpy as jnp
from pydantic import Field

from .quant import QuantSpec
from .remat import RematSpec, policy_name

Dispatch = Literal["dropless", "dense", "capacity"]
LAYER_TYPES = ("full_attention", "chunked_attention")
RouterType = Literal["sigmoid", "softmax"]
# Matmul families the FP8 policy can take (model/fp8.py): the one list.
FP8_FAMILIES = ("attention", "mlp", "experts", "head")
AttentionImpl = Literal["auto", "xla", "flash", "splash", "cudnn"]

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (HF `rope_type: llama3`)."""

    factor: PosFloat = 8.0
    low_freq_factor: PosFloat = 1.0
    high_freq_factor: PosFloat = 4.0
    original_max_position_embeddings: PosInt = 8192


@dataclass(frozen=True)
class MoEConfig:
    """The MoE block's architecture: what its parameters are and what it computes."""

    num_experts: PosInt = 16
    top_k: PosInt = 1
    expert_ff: PosInt = 512
    shared_expert: bool = True
    router: RouterType = "sigmoid"


@dataclass(frozen=True)
class MoERuntime:
    """How the MoE block runs: dispatch path, balancing statistic, expert-parallel buffers.

    None of these change the parameters; a run may resume with other values."""

    dispatch: Dispatch = "dropless"
    capacity_factor: PosFloat = 1.25
    # What the block's aux-loss statistic measures (the trainer applies the coefficient).
    aux_loss_level: Literal["batch", "sequence"] = "batch"
    # Expert parallelism: static send-buffer factor (per-device receive capacity / fair share),
    # and what happens to copies beyond it: "rounds" sends them in extra all-to-all rounds (run
    # only when some device overflowed), "drop" drops them (earlier tokens win). ep_max_rounds
    # caps the rounds compiled (each adds an all-to-all pair and an expert pass to the program):
    # copies past rounds × buffer are dropped and counted. 0 = as many as the worst case needs.
    ep_buffer_factor: PosFloat = 2.0
    ep_overflow: Literal["rounds", "drop"] = "rounds"
    ep_max_rounds: NonNegInt = 4


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model runs and stores its weights: dtypes, memory (remat, scan), FP8, MoE dispatch.

    Separate from ModelConfig (architecture) so that "what may change on resume" follows from the
    types: everything here may differ between the run that wrote a checkpoint and the one that
    reads it, except `scan_layers`, which decides how the layers are stored (store.layer_slot)."""

    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # A policy name, or per-block-kind policies (model/remat.py); true / false (older files and
    # YAMLs) mean full / none.
    remat: RematSpec = "none"
    scan_layers: bool = False
    fp8_families: tuple[Literal[FP8_FAMILIES], ...] = ()
    fp8_scaling: Literal["delayed", "current"] = "delayed"
    fp8_history: PosInt = 16
    moe: MoERuntime = field(default_factory=MoERuntime)
    # Attention kernel (model/attention.py, pick_kernel): "xla" (query-blocked), "flash" (online
    # softmax over key blocks of `flash_block` rows: O(L·block) memory, model/flash.py), "splash"
    # (Pallas, TPU; interpret mode elsewhere), "cudnn" (GPU, bf16/f16 global layers), or "auto":
    # the platform's best kernel for each layer where its mask is expressible.
    attention: AttentionImpl = "auto"
    flash_block: PosInt = 512
    # Global layers under context parallelism (model/context_parallel.py): K/V round a ring, or
    # gathered whole; "auto" gathers when the gathered K+V are no bigger than the local queries.
    context_attention: Literal["auto", "ring", "all_gather"] = "auto"
    # Int4 weights (model/quant.py): set by a quantized params directory's quantization.json,
    # never by an experiment (quantized models run inference only). Changes how linears are stored.
    quant: QuantSpec | None = None

    def __post_init__(self):
        object.__setattr__(self, "remat", policy_name(self.remat))  # frozen: normalise in place
        unknown = set(self.fp8_families) - set(FP8_FAMILIES)
        if unknown:
            raise ValueError(f"fp8_families: unknown matmul families {sorted(unknown)}")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def pdtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **kw) -> "RuntimeConfig":
        if isinstance(kw.get("moe"), dict):
            kw["moe"] = dataclasses.replace(self.moe, **kw["moe"])
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class VisionConfig:
    """The Llama 4 vision tower and its projector (HF `Llama4VisionConfig`, plus the image token
    ids of HF `Llama4Config`): model/vision.py builds it, model/multimodal.py fuses its output.

    HF's encoder LayerNorms are `nn.LayerNorm(hidden_size)` with torch's default eps, whatever
    `norm_eps` says; `layer_norm_eps` is that value (1e-5), and `norm_eps` is only carried over."""

    hidden_size: PosInt = 768
    num_layers: PosInt = 34  # HF num_hidden_layers
    num_heads: PosInt = 16  # HF num_attention_heads
    intermediate_size: PosInt = 5632
    num_channels: PosInt = 3
    image_size: PosInt = 448  # one tile's side, in pixels
    patch_size: PosInt = 14
    pixel_shuffle_ratio: PosFloat = 0.5
    projector_input_dim: PosInt = 4096
    projector_output_dim: PosInt = 4096
    vision_output_dim: PosInt = 7680
    rope_theta: PosFloat = 10000.0
    norm_eps: PosFloat = 1e-5
    layer_norm_eps: PosFloat = 1e-5
    initializer_range: NonNegFloat = 0.02
    # HF Llama4Config: the placeholder the image features replace (`<|patch|>` in Llama 4's
    # tokenizer), and the begin / end of image markers.
    image_token_id: NonNegInt = 200092
    boi_token_id: NonNegInt = 200080
    eoi_token_id: NonNegInt = 200081

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        side, r = self.image_size // self.patch_size, self.pixel_shuffle_ratio
        if (side * r) % 1 or (self.hidden_size / r ** 2) % 1:
            raise ValueError(f"pixel_shuffle_ratio={r} does not divide the {side}x{side} patch grid "
                             f"and hidden_size={self.hidden_size}")
        if round(self.hidden_size / r ** 2) != self.intermediate_size:
            raise ValueError(f"vision intermediate_size={self.intermediate_size} must equal hidden_size / "
                             f"pixel_shuffle_ratio² = {round(self.hidden_size / r ** 2)} (the adapter's input)")
        if self.projector_input_dim != self.projector_output_dim:
            raise ValueError("vision projector_input_dim must equal projector_output_dim (HF's adapter fc2 is square)")
        if self.projector_output_dim != self.vision_output_dim:
            raise ValueError("vision projector_output_dim must equal vision_output_dim (the projector's input)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Image features (and `<|patch|>` placeholders) one tile gives after the pixel shuffle."""
        return round(self.patches_per_side ** 2 * self.pixel_shuffle_ratio ** 2)


@dataclass(frozen=True)
class AudioConfig:
    """The audio encoder and its projector (model/audio.py), and the audio token ids: no HF
    reference exists, so the layout is this project's own.

    A clip is `clip_samples` samples at `sample_rate` (shorter clips are padded with silence by
    the data pipeline, so every clip gives the same number of features, as a tile does). Front
    end: a centred STFT (`n_fft`, `hop_length`, periodic Hann window, zero padding), power
    spectrum, the Slaney mel filterbank of `n_mels` bands over [fmin, fmax] (librosa's), log10
    with an 8-decade floor below the clip's maximum, scaled as (x + 4) / 4. Then two 1-D
    convolutions over time (kernel 3, stride 2, GELU) → `tokens_per_clip` frames, a learned
    position embedding, `num_layers` pre-LayerNorm bidirectional encoder layers and a final
    LayerNorm; the projector maps `hidden_size` to the text width."""

    sample_rate: PosInt = 16000
    clip_samples: PosInt = 160000  # 10 s at 16 kHz
    n_fft: PosInt = 400
    hop_length: PosInt = 160
    n_mels: PosInt = 80
    fmin: NonNegFloat = 0.0
    fmax: PosFloat | None = None  # None: sample_rate / 2
    hidden_size: PosInt = 256
    num_layers: PosInt = 4
    num_heads: PosInt = 4
    intermediate_size: PosInt = 1024
    layer_norm_eps: PosFloat = 1e-5
    initializer_range: NonNegFloat = 0.02
    # The placeholder the audio features replace and the begin / end of audio markers: the
    # byte_mm tokenizer's ids (data/tokenizer.py).
    audio_token_id: NonNegInt = 267
    boa_token_id: NonNegInt = 265
    eoa_token_id: NonNegInt = 266

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"audio hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.n_fft > self.clip_samples:
            raise ValueError(f"audio n_fft={self.n_fft} exceeds clip_samples={self.clip_samples}")
        if self.fmax is not None and not self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"audio fmax={self.fmax} must be in (fmin, sample_rate / 2 = {self.sample_rate / 2}]")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_frames(self) -> int:
        """STFT frames of one clip (centred frames: one per hop, plus one)."""
        return 1 + self.clip_samples // self.hop_length

    @property
    def tokens_per_clip(self) -> int:
        """Encoder outputs (and `<|audio|>` placeholders) of one clip: two stride-2 convolutions."""
        n = self.num_frames
        for _ in range(2):
            n = (n - 1) // 2 + 1  # kernel 3, padding 1, stride 2
        return n


@dataclass(frozen=True)
class ModelConfig:
    """The architecture: every field changes the parameter shapes or the function computed."""

    vocab_size: PosInt = 256
    hidden_size: PosInt = 64
    num_layers: PosInt = 4
    num_heads: PosInt = 4
    num_kv_heads: PosInt = 2
    head_dim: PosInt = 16
    dense_ff: PosInt = 128  # HF intermediate_size_mlp
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(num_experts=4, top_k=1, expert_ff=64))
    # Which layers are MoE. Empty tuple → derived from `interleave_moe_layer_step`.
    moe_layers: tuple[NonNegInt, ...] = ()
    interleave_moe_layer_step: NonNegInt = 1
    # HF `no_rope_layers`: 1 = layer USES RoPE (name is inverted). Empty → every 4th layer NoPE.
    no_rope_layers: tuple[Literal[0, 1], ...] = ()
    no_rope_layer_interval: PosInt = 4
    attention_chunk_size: PosInt | None = 8192
    # HF `layer_types`: each layer's mask, chosen independently of RoPE (QK-norm and temperature
    # tuning still follow `no_rope_layers`, as in HF). Empty → chunked on RoPE layers when
    # attention_chunk_size is set, full otherwise.
    layer_types: tuple[str, ...] = ()
    rope_theta: PosFloat = 500000.0
    rope_scaling: RopeScaling | None = None
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: PosInt = 8192
    attn_scale: NonNegFloat = 0.1
    rms_norm_eps: PosFloat = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: PosInt = 131072
    initializer_range: NonNegFloat = 0.02
    # The vision tower (Llama4ForConditionalGeneration); None: a text-only model.
    vision: VisionConfig | None = None
    # The audio encoder (model/audio.py); None: no audio input.
    audio: AudioConfig | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.moe_layers:
            step = self.interleave_moe_layer_step
            object.__setattr__(self, "moe_layers", tuple(range(step - 1, self.num_layers, step)) if step > 0 else ())
        if not self.no_rope_layers:
            k = self.no_rope_layer_interval
            object.__setattr__(self, "no_rope_layers", tuple(int((i + 1) % k != 0) for i in range(self.num_layers)))
        if len(self.no_rope_layers) != self.num_layers:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_layers} layers")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer_types: unknown types {unknown}; expected {' or '.join(LAYER_TYPES)}")
            if "chunked_attention" in self.layer_types and self.attention_chunk_size is None:
                raise ValueError("layer_types has chunked_attention layers but attention_chunk_size is None")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} are outside 0..{self.num_layers - 1}")
        if self.moe.top_k > self.moe.num_experts:
            raise ValueError(f"top_k={self.moe.top_k} exceeds num_experts={self.moe.num_experts}")

    # --- derived layout -------------------------------------------------------------------
    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def is_chunked(self, layer: int) -> bool:
        if self.layer_types:
            return self.layer_types[layer] == "chunked_attention"
        return self.uses_rope(layer) and self.attention_chunk_size is not None

    def layer_kind(self, layer: int) -> tuple[bool, bool, bool]:
        """(uses_rope, is_chunked, is_moe): the facts that decide a block's structure."""
        return self.uses_rope(layer), self.is_chunked(layer), self.is_moe(layer)

    def scan_period(self) -> int:
        """Length of the smallest repeating group of layer kinds (for scan over layers)."""
        kinds = [self.layer_kind(i) for i in range(self.num_layers)]
        for p in range(1, self.num_layers + 1):
            if self.num_layers % p == 0 and all(kinds[i] == kinds[i % p] for i in range(self.num_layers)):
                return p
        return self.num_layers

    def layer_slot(self, layer: int, scan_layers: bool) -> tuple[tuple, int | None]:
        """Where layer `layer` lives in the model state: (path prefix, index along the scan axis
        or None). With scan_layers the smallest repeating group is stacked (transformer.Group)."""
        if scan_layers:
            g, j = divmod(layer, self.scan_period())
            return ("groups", "blocks", j), g
        return ("groups", "blocks", layer), None

    def replace(self, **kw) -> "ModelConfig":
        moe_kw = kw.pop("moe", None)
        cfg = self
        if isinstance(moe_kw, dict):
            kw["moe"] = dataclasses.replace(self.moe, **moe_kw)
        elif moe_kw is not None:
            kw["moe"] = moe_kw
        # Derived tuples must be re-derived when the layer count or interval changes.
        if "num_layers" in kw or "interleave_moe_layer_step" in kw:
            kw.setdefault("moe_layers", ())
        if "num_layers" in kw or "no_rope_layer_interval" in kw:
            kw.setdefault("no_rope_layers", ())
        if "num_layers" in kw:
            kw.setdefault("layer_types", ())
        return dataclasses.replace(cfg, **kw)


def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
        dense_ff=128, moe=MoEConfig(num_experts=4, top_k=1, expert_ff=64), interleave_moe_layer_step=2,
        attention_chunk_size=32, floor_scale=16, attn_scale=0.1, rope_theta=10000.0,
        max_position_embeddings=4096,
    )


def _bench_cpu() -> ModelConfig:
    return ModelConfig(
        vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
        dense_ff=1024, moe=MoEConfig(num_experts=16, top_k=1, expert_ff=512), interleave_moe_layer_step=2,
        attention_chunk_size=128, floor_scale=8192, rope_theta=500000.0, max_position_embeddings=8192,
    )


_LLAMA4_ROPE = RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                           original_max_position_embeddings=8192)


def _scout() -> ModelConfig:
    """Llama 4 Scout 17B-16E text shape (published: 109B total with vision, 17B active)."""
    return ModelConfig(
        vocab_size=202048, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
        dense_ff=16384, moe=MoEConfig(num_experts=16, top_k=1, expert_ff=8192), interleave_moe_layer_step=1,
        attention_chunk_size=8192, rope_scaling=_LLAMA4_ROPE, max_position_embeddings=10485760,
    )


def _maverick() -> ModelConfig:
    """Llama 4 Maverick 17B-128E text shape (published: 400B total with vision, 17B active)."""
    return ModelConfig(
        vocab_size=202048, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
        dense_ff=16384, moe=MoEConfig(num_experts=128, top_k=1, expert_ff=8192), interleave_moe_layer_step=2,
        attention_chunk_size=8192, use_qk_norm=False, rope_theta=500000.0, max_position_embeddings=1048576,
    )


PRESETS = {"tiny": _tiny, "bench_cpu": _bench_cpu, "scout": _scout, "maverick": _maverick}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
