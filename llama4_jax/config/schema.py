"""The experiment schema, defined once: typed, strict sections that YAML files only set values of.

Variants are picked with `preset:` / `type:` fields, never by inheriting another YAML. Sections
owned by other rooms are embedded, not copied: a data source is `data.sources.Source`, model
fields are `model.config`'s dataclasses (with their bounds), mesh axes and logical-axis names
come from `parallel`. Validators raise `_Invalid` (message + key path); `loading.py` turns the
first failure into a one-line `ConfigError`.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import itertools
import math
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from ..data.sources import FilePath, Source
from ..errors import ConfigError
from ..model.config import (FP8_FAMILIES, PRESETS, AttentionImpl, AudioConfig, ModelConfig, MoEConfig, MoERuntime,
                            RopeScaling, RuntimeConfig, VisionConfig, preset)
from ..model.remat import RematPolicy, policy_name
from ..parallel.rules import DEFAULT_RULES, MESH_AXES


class _Invalid(ValueError):
    """Raised inside validators; `path` extends pydantic's location (e.g. into `model.overrides`)."""

    def __init__(self, msg: str, path: tuple = ()):
        super().__init__(msg)
        self.msg, self.path = msg, tuple(path)


def _suggest(key: Any, options) -> str:
    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _lower(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- value types ------------------------------------------------------------------------------

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Dtype = Literal["float32", "bfloat16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- model ------------------------------------------------------------------------------------

# Keys that are not architecture, and where they are set instead.
_MOVED_KEYS = {"param_dtype": "precision.param_dtype", "compute_dtype": "precision.compute_dtype",
               "fp8_families": "precision.fp8.families", "fp8_scaling": "precision.fp8.scaling",
               "fp8_history": "precision.fp8.amax_history", "remat": "model.runtime.remat",
               "scan_layers": "model.runtime.scan_layers"}
_MOVED_MOE_KEYS = {**{f.name: f"model.runtime.moe.{f.name}" for f in dataclasses.fields(MoERuntime)},
                   "aux_loss_level": "balancing.aux_loss_level", "aux_loss_coef": "balancing.aux_loss_coef",
                   "z_loss_coef": "balancing.z_loss_coef", "bias_update_rate": "balancing.bias_update_rate"}


def _typed_fields(cls, values: dict, path: tuple, moved: dict | None = None) -> dict:
    """Check keys against a dataclass's fields and convert values to the field types (with the
    bounds their annotations carry)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if moved and key in moved:
            raise _Invalid(f"set {moved[key]} instead", (*path, key))
        if key not in names:
            raise _Invalid(f"unknown key{_suggest(key, names)}", (*path, key))
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            raise _Invalid(f"{_lower(err.errors()[0]['msg'])} (got {_short(value)})", (*path, key)) from None
    return out


def _mapping(value, path: tuple) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a mapping of fields (got {_short(value)})", path)
    return value


def _model_kwargs(name: str, overrides: dict) -> dict:
    """Typed keyword arguments for `preset(name, **kw)`."""
    kw = {}
    for key, value in overrides.items():
        if key in _MOVED_KEYS:
            raise _Invalid(f"set {_MOVED_KEYS[key]} instead", (key,))
        if key in ("vision", "audio"):
            if value is not None:
                where = "vision.tower" if key == "vision" else "audio.encoder"
                raise _Invalid(f"set the top-level {where} instead", (key,))
            continue
        if key == "moe":
            kw[key] = _typed_fields(MoEConfig, _mapping(value, (key,)), (key,), _MOVED_MOE_KEYS)
        elif key == "rope_scaling" and value is not None:  # partial override of the preset's scaling
            fields = _typed_fields(RopeScaling, _mapping(value, (key,)), (key,))
            kw[key] = dataclasses.replace(PRESETS[name]().rope_scaling or RopeScaling(), **fields)
        else:
            kw.update(_typed_fields(ModelConfig, {key: value}, ()))
    return kw


class Runtime(BaseModel):
    """How the model runs (model.config.RuntimeConfig): memory and MoE dispatch choices. Dtypes and
    FP8 are set in `precision:`, the balancing statistic in `balancing:`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A policy name (model/remat.py: none, full, minimal, save_moe, offload) for every block, or
    # one per block kind: {moe: .., dense: ..} or {global: .., chunked: ..}; true / false are
    # accepted as full / none, as older YAMLs wrote them.
    remat: bool | RematPolicy | dict[str, RematPolicy] | tuple[tuple[str, RematPolicy], ...] = RuntimeConfig.remat
    scan_layers: bool = False
    attention: AttentionImpl = RuntimeConfig.attention  # model/attention.py: pick_kernel
    flash_block: PosInt = RuntimeConfig.flash_block
    context_attention: Literal["auto", "ring", "all_gather"] = RuntimeConfig.context_attention
    moe: dict[str, Any] = {}  # fields of MoERuntime except aux_loss_level

    @field_validator("remat")
    @classmethod
    def _remat(cls, remat):
        return policy_name(remat)

    @field_validator("moe")
    @classmethod
    def _moe(cls, moe):
        moved = {"aux_loss_level": "balancing.aux_loss_level"}
        _typed_fields(MoERuntime, moe, (), moved)
        return moe


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str
    # Fields of ModelConfig (architecture); `moe:` and `rope_scaling:` take partial mappings.
    overrides: dict[str, Any] = {}
    runtime: Runtime = Field(default_factory=Runtime)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name):
        if name not in PRESETS:
            raise _Invalid(f"unknown preset {name!r}{_suggest(name, PRESETS)} (presets: {', '.join(sorted(PRESETS))})")
        return name

    @model_validator(mode="after")
    def _builds(self):
        try:
            self.build()
        except _Invalid as err:
            raise _Invalid(err.msg, ("overrides", *err.path)) from None
        except ValueError as err:  # ModelConfig.__post_init__ consistency checks
            raise _Invalid(str(err), ("overrides",) if self.overrides else ("preset",)) from None
        return self

    def build(self) -> ModelConfig:
        return preset(self.preset, **_model_kwargs(self.preset, self.overrides))


# --- mesh -------------------------------------------------------------------------------------


class Mesh(_Section):
    data: int = -1  # -1: whatever the other axes leave of the device count
    fsdp: int = 1
    expert: int = 1
    context: int = 1  # context parallelism: each sequence split over this many devices
    tensor: int = 1
    # Per-device memory budget for `--dry-run --compile`'s verdict (default: by device kind).
    device_memory_gb: Annotated[float, Field(gt=0)] | None = None
    # Overrides of parallel.DEFAULT_RULES (logical axis → mesh axis): an axis, a list, or null.
    rules: dict[str, Any] = {}

    @field_validator("rules")
    @classmethod
    def _rules(cls, rules):
        for logical, target in rules.items():
            if logical not in DEFAULT_RULES:
                raise _Invalid(f"unknown logical axis{_suggest(logical, DEFAULT_RULES)} "
                               f"(axes: {', '.join(DEFAULT_RULES)})", (logical,))
            axes = [] if target is None else [target] if isinstance(target, str) else target
            if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
                raise _Invalid(f"expected a mesh axis, a list of them, or null (got {_short(target)})", (logical,))
            for axis in axes:
                if axis not in MESH_AXES:
                    raise _Invalid(f"unknown mesh axis {axis!r}{_suggest(axis, MESH_AXES)} "
                                   f"(axes: {', '.join(MESH_AXES)})", (logical,))
            if len(set(axes)) != len(axes):
                raise _Invalid(f"mesh axis repeated in {axes}", (logical,))
        return rules

    @model_validator(mode="after")
    def _sizes(self):
        for axis in MESH_AXES:
            if getattr(self, axis) == 0 or getattr(self, axis) < -1:
                raise _Invalid(f"must be >= 1, or -1 for 'the rest' (got {getattr(self, axis)})", (axis,))
        rest = [a for a in MESH_AXES if getattr(self, a) == -1]
        if len(rest) > 1:
            raise _Invalid(f"at most one axis may be -1 ({' and '.join(rest)} are both -1)")
        return self

    def _describe(self, sizes: dict) -> str:
        return " x ".join(f"{a}={sizes[a]}" for a in MESH_AXES)

    def resolve(self, device_count: int) -> dict[str, int]:
        """Axis sizes for `device_count` devices, in MESH_AXES order, with -1 filled in."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if -1 in sizes.values():
            if device_count % fixed:
                raise ConfigError(f"mesh: {self._describe(sizes)} cannot fill {device_count} devices "
                                  f"(the fixed axes need a multiple of {fixed})")
            return {a: device_count // fixed if v == -1 else v for a, v in sizes.items()}
        if fixed != device_count:
            raise ConfigError(f"mesh: {self._describe(sizes)} = {fixed} devices, but {device_count} are available")
        return sizes


# --- precision --------------------------------------------------------------------------------


# Defaults come from RuntimeConfig, the one place they are written.
class FP8(_Section):
    enabled: bool = False
    families: list[Literal[FP8_FAMILIES]] = ["attention", "mlp", "experts"]  # when enabled
    scaling: Literal["delayed", "current"] = RuntimeConfig.fp8_scaling
    amax_history: PosInt = RuntimeConfig.fp8_history  # delayed scaling: max |x| of this many past steps


class Precision(_Section):
    param_dtype: Dtype = RuntimeConfig.param_dtype  # master weights
    compute_dtype: Dtype = RuntimeConfig.compute_dtype
    opt_state_dtype: Dtype = "float32"
    fp8: FP8 = Field(default_factory=FP8)


# --- optimizer --------------------------------------------------------------------------------


class Schedule(_Section):
    # warmup_cosine / wsd: one curve over the whole run; stages: each stage's `lr_phase`.
    type: Literal["warmup_cosine", "wsd", "stages"] = "warmup_cosine"
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Fraction = 0.1
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2  # wsd: share of the run spent decaying

    @model_validator(mode="after")
    def _warmup_once(self):
        if self.type == "stages" and self.warmup_steps:
            raise _Invalid("unused with type 'stages': set the stages' lr_phase.warmup_steps", ("warmup_steps",))
        return self


class Optimizer(_Section):
    type: Literal["adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 3e-4  # peak
    b1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    b2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: NonNegFloat = 0.1
    wd_exclude: list[Literal["norms", "biases", "embeddings"]] = ["norms", "biases", "embeddings"]
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0  # global norm; null: no clipping
    # A step whose loss or gradient is not finite is skipped; this many in a row stop the run.
    max_bad_steps: PosInt = 20
    schedule: Schedule = Field(default_factory=Schedule)


# --- MoE balancing (applied by the train step) --------------------------------------------------


class Balancing(_Section):
    """Load balancing for MoE routers: Switch aux loss, z-loss, aux-loss-free bias updates."""

    aux_loss_coef: NonNegFloat = 0.0
    aux_loss_level: Literal["batch", "sequence"] = "batch"  # what the aux statistic averages over
    z_loss_coef: NonNegFloat = 0.0
    bias_update_rate: NonNegFloat = 0.0  # > 0 enables aux-loss-free balancing (DeepSeek-V3)


# --- data -------------------------------------------------------------------------------------


_BYTE_TOKENIZERS = ("byte", "byte_image", "byte_mm")  # need no file


class Tokenizer(_Section):
    type: Literal["byte", "byte_image", "byte_mm", "hf", "sentencepiece"] = "byte"
    path: FilePath | None = None

    @model_validator(mode="after")
    def _path(self):
        if self.type not in _BYTE_TOKENIZERS and self.path is None:
            raise _Invalid(f"required for tokenizer type {self.type!r}", ("path",))
        if self.type in _BYTE_TOKENIZERS and self.path is not None:
            raise _Invalid(f"the {self.type} tokenizer takes no path", ("path",))
        return self


class Data(_Section):
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)
    sources: dict[str, Source] = Field(min_length=1)
    # Training reads the prepared token store (data/store.py) at store_dir; default
    # <cache_dir>/store, else <workdir>/data-cache. Missing or stale sources are prepared there.
    cache_dir: FilePath | None = None
    store_dir: FilePath | None = None
    workers: Annotated[int, Field(ge=1)] = 1  # processes preparing a store (over input files)
    prefetch: NonNegInt = 2  # batches assembled ahead in a background thread (0: none)


# --- curriculum -------------------------------------------------------------------------------


class LrPhase(_Section):
    """A stage's learning rate, as fractions of optimizer.lr: linear warmup from 0 to `start`
    over `warmup_steps`, then `shape` from `start` to `end` over the rest of the stage."""

    shape: Literal["constant", "cosine", "linear"] = "constant"
    start: NonNegFloat = 1.0
    end: NonNegFloat = 1.0  # omitted: same as start

    warmup_steps: NonNegInt = 0

    @model_validator(mode="before")
    @classmethod
    def _end_defaults_to_start(cls, data):
        if isinstance(data, dict) and data.get("end") is None:
            data = {**data, "end": data.get("start", 1.0)}
        return data

    @model_validator(mode="after")
    def _constant_is_flat(self):
        if self.shape == "constant" and self.end != self.start:
            raise _Invalid(f"a constant phase needs end == start ({self.end} != {self.start}); omit end", ("end",))
        return self


class Sampler(_Section):
    # static: the stage mixture as written. long_tail: data/sampler.py's LongTailSampler moves
    # weight toward sources with high recent loss and sources seen rarely (formula there).
    type: Literal["static", "long_tail"] = "static"
    temperature: Annotated[float, Field(gt=0)] = 1.0
    ema: Annotated[float, Field(gt=0, lt=1)] = 0.9
    min_weight: NonNegFloat = 0.01  # floor, so no source with base weight > 0 is starved
    rare_boost: NonNegFloat = 0.5  # 0.5: the usual inverse-square-root count boost; 0: off
    update_every: PosInt = 100  # steps between weight updates


class Stage(_Section):
    name: Annotated[str, Field(min_length=1)]
    steps: PosInt | None = None
    tokens: PosInt | None = None  # → steps = ceil(tokens / (seq_len · batch_size))
    mixture: dict[str, NonNegFloat]  # source name → weight (normalised by the data pipeline)
    seq_len: PosInt
    batch_size: PosInt | None = None  # rows per step, over all devices
    global_batch_tokens: PosInt | None = None
    lr_phase: LrPhase = Field(default_factory=LrPhase)
    sampler: Sampler = Field(default_factory=Sampler)
    # Gradient accumulation: the step's batch runs as this many sequential microbatches, one
    # optimizer update (what changes and what does not: train/step.py's docstring).
    microbatches: PosInt = 1
    # This stage's RoPE scaling (llama3: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; fields left out take RopeScaling's defaults), instead of
    # the model's. It changes the function, not the parameters: stages may differ, and a resumed
    # run takes the stage's (long-context ramps: curriculum/long_context.yaml).
    rope_scaling: dict[str, Any] | None = None
    # Which towers this stage trains (a multimodal model: text, vision, projector, audio,
    # audio_projector); the others are frozen by the optimizer (train/optimizer.py
    # `freeze_by_stage`). None: all of them.
    trainable: list[Literal["text", "vision", "projector", "audio", "audio_projector"]] | None = Field(
        default=None, min_length=1)

    @field_validator("rope_scaling")
    @classmethod
    def _rope(cls, value):
        return None if value is None else _typed_fields(RopeScaling, _mapping(value, ()), ())

    @model_validator(mode="after")
    def _consistent(self):
        for a, b in (("steps", "tokens"), ("batch_size", "global_batch_tokens")):
            if (getattr(self, a) is None) == (getattr(self, b) is None):
                raise _Invalid(f"set exactly one of {a} / {b}")
        if self.global_batch_tokens is not None and self.global_batch_tokens % self.seq_len:
            raise _Invalid(f"{self.global_batch_tokens} is not a multiple of seq_len={self.seq_len}",
                           ("global_batch_tokens",))
        rows = self.batch_size or self.global_batch_tokens // self.seq_len
        if rows % self.microbatches:
            raise _Invalid(f"batch of {rows} rows does not split into {self.microbatches} microbatches",
                           ("microbatches",))
        used = sum(w > 0 for w in self.mixture.values())
        if not used:
            raise _Invalid("needs at least one source with weight > 0", ("mixture",))
        if self.sampler.type == "long_tail" and self.sampler.min_weight * used > 1:
            raise _Invalid(f"{self.sampler.min_weight} x {used} sources exceeds 1", ("sampler", "min_weight"))
        return self

    def resolved(self) -> Stage:
        """This stage with `steps` and `batch_size` filled (and tokens / global_batch_tokens cleared)."""
        rows = self.batch_size or self.global_batch_tokens // self.seq_len
        steps = self.steps or math.ceil(self.tokens / (self.seq_len * rows))
        return self.model_copy(update=dict(steps=steps, batch_size=rows, tokens=None, global_batch_tokens=None))


class Curriculum(_Section):
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.resolved_stages()):
            if names.index(stage.name) != i:
                raise _Invalid(f"duplicate stage name {stage.name!r}", ("stages", i, "name"))
            if stage.lr_phase.warmup_steps > stage.steps:
                raise _Invalid(f"{stage.lr_phase.warmup_steps} exceeds the stage's {stage.steps} steps",
                               ("stages", i, "lr_phase", "warmup_steps"))
        return self

    def resolved_stages(self) -> list[Stage]:
        return [s.resolved() for s in self.stages]

    def boundaries(self) -> list[int]:
        """Cumulative end steps: stage i runs steps [boundaries[i-1], boundaries[i])."""
        return list(itertools.accumulate(s.steps for s in self.resolved_stages()))

    @property
    def total_steps(self) -> int:
        return self.boundaries()[-1]

    def stage_index(self, step: int) -> int:
        """Index of the stage that runs global step `step` (0-based)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the curriculum's {self.total_steps} steps")
        return bisect.bisect_right(self.boundaries(), step)


# --- loss -------------------------------------------------------------------------------------


class Loss(_Section):
    """How the cross entropy is computed (train/loss.py); the value is the same either way."""

    # > 0: the lm head and the loss run this many rows (tokens) at a time, so the [B, L, V]
    # float32 logits never exist at once; 0: plain. An FP8 head always uses the plain loss.
    chunk_rows: NonNegInt = 0


# --- run bookkeeping --------------------------------------------------------------------------


class Checkpoint(_Section):
    every_steps: PosInt = 1000
    keep_last: PosInt = 3
    keep_stage_final: bool = True  # keep the last checkpoint of every stage beyond keep_last
    async_save: bool = True


class Logging(_Section):
    every_steps: PosInt = 10
    tensorboard: bool = True
    progress: bool = True


class Eval(_Section):
    every_steps: NonNegInt = 500  # 0: off
    batches: PosInt = 8


# --- vision ---------------------------------------------------------------------------------


class Vision(_Section):
    """The vision tower of a multimodal model (model.config.VisionConfig fields: its image ids
    must be the tokenizer's) and how images are tiled for it (data/images.py ImageConfig)."""

    tower: dict[str, Any] = {}
    max_patches: PosInt = 1  # tiles per image at most (plus a thumbnail when more than one)
    resize_to_max_canvas: bool = False
    # The vision tower's and projector's updates × this (train/optimizer.py freeze_by_stage).
    lr_scale: Annotated[float, Field(gt=0)] = 1.0

    @field_validator("tower")
    @classmethod
    def _tower(cls, tower):
        fields = _typed_fields(VisionConfig, _mapping(tower, ()), ())
        try:
            VisionConfig(**fields)
        except ValueError as err:
            raise _Invalid(str(err)) from None
        return tower

    def build(self) -> VisionConfig:
        return VisionConfig(**_typed_fields(VisionConfig, self.tower, ()))


# --- audio ----------------------------------------------------------------------------------


class Audio(_Section):
    """The audio encoder of a multimodal model (model.config.AudioConfig fields: its audio ids
    must be the tokenizer's) and how clips are read for it (data/audio.py)."""

    encoder: dict[str, Any] = {}
    # A clip at another sample rate: resample it (librosa) instead of stopping with an error.
    resample: bool = False
    # The audio encoder's and audio projector's updates × this (train/optimizer.py freeze_by_stage).
    lr_scale: Annotated[float, Field(gt=0)] = 1.0

    @field_validator("encoder")
    @classmethod
    def _encoder(cls, encoder):
        fields = _typed_fields(AudioConfig, _mapping(encoder, ()), ())
        try:
            AudioConfig(**fields)
        except ValueError as err:
            raise _Invalid(str(err)) from None
        return encoder

    def build(self) -> AudioConfig:
        return AudioConfig(**_typed_fields(AudioConfig, self.encoder, ()))


# --- the experiment ---------------------------------------------------------------------------


class Experiment(_Section):
    name: str
    seed: int = 0
    init_from: FilePath | None = None  # converted HF checkpoint or another run's checkpoints: params only
    model: ModelSection
    vision: Vision | None = None  # a multimodal model: the vision tower and image tiling
    audio: Audio | None = None  # a multimodal model: the audio encoder and how clips are read
    mesh: Mesh = Field(default_factory=Mesh)
    precision: Precision = Field(default_factory=Precision)
    balancing: Balancing = Field(default_factory=Balancing)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    loss: Loss = Field(default_factory=Loss)
    data: Data
    curriculum: Curriculum
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    logging: Logging = Field(default_factory=Logging)
    eval: Eval = Field(default_factory=Eval)

    @model_validator(mode="after")
    def _cross_check(self):
        sources, max_len = self.data.sources, self.to_model_config().max_position_embeddings
        for i, stage in enumerate(self.curriculum.stages):
            for name in stage.mixture:
                if name not in sources:
                    close = _suggest(name, sources)[2:-1]
                    raise _Invalid(f"unknown source {name!r} ({close + ' ' if close else ''}sources: "
                                   f"{', '.join(sorted(sources))})", ("curriculum", "stages", i, "mixture"))
            if stage.seq_len > max_len:
                raise _Invalid(f"{stage.seq_len} exceeds the model's max_position_embeddings={max_len}",
                               ("curriculum", "stages", i, "seq_len"))
        for name, spec in sources.items():
            if spec.resolved_kind == "image_text" and self.vision is None:
                raise _Invalid(f"source {name!r} is image_text but the experiment has no vision: section",
                               ("data", "sources", name, "kind"))
            if spec.resolved_kind == "audio_text" and self.audio is None:
                raise _Invalid(f"source {name!r} is audio_text but the experiment has no audio: section",
                               ("data", "sources", name, "kind"))
        towers = {"text"} | ({"vision", "projector"} if self.vision else set()) | (
            {"audio", "audio_projector"} if self.audio else set())
        for i, stage in enumerate(self.curriculum.stages):
            missing = sorted(set(stage.trainable or ()) - towers)
            if missing:
                msg = ("a text-only model has only the text tower" if towers == {"text"} else
                       f"the model has no {', '.join(missing)} tower (towers: {', '.join(sorted(towers))})")
                raise _Invalid(msg, ("curriculum", "stages", i, "trainable"))
        if self.eval.every_steps and not any(s.eval_fraction > 0 for s in sources.values()):
            raise _Invalid("eval is on but no data source has eval_fraction > 0", ("eval", "every_steps"))
        return self

    def to_model_config(self) -> ModelConfig:
        """The architecture this experiment trains: preset + overrides.
        (Not `model_config`: pydantic reserves that name for the class settings.)"""
        cfg = self.model.build()
        if self.vision is not None:
            cfg = cfg.replace(vision=self.vision.build())
        return cfg if self.audio is None else cfg.replace(audio=self.audio.build())

    def to_runtime(self) -> RuntimeConfig:
        """How it runs: precision dtypes and FP8, model.runtime, the balancing statistic."""
        p, r = self.precision, self.model.runtime
        moe = MoERuntime(**_typed_fields(MoERuntime, r.moe, ()), aux_loss_level=self.balancing.aux_loss_level)
        return RuntimeConfig(param_dtype=p.param_dtype, compute_dtype=p.compute_dtype, remat=r.remat,
                             scan_layers=r.scan_layers, attention=r.attention, flash_block=r.flash_block,
                             context_attention=r.context_attention, fp8_families=tuple(p.fp8.families) if p.fp8.enabled else (),
                             fp8_scaling=p.fp8.scaling, fp8_history=p.fp8.amax_history, moe=moe)

    def resolved(self) -> Experiment:
        """The same experiment with every stage's steps and batch_size filled in, and every model
        field spelled out in `model.overrides` / `model.runtime`, so a saved copy does not change
        if a preset or a default does."""
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.model.build()).items()
                     if k not in ("vision", "audio")}
        moe_rt = {k: v for k, v in dataclasses.asdict(self.to_runtime().moe).items() if k != "aux_loss_level"}
        runtime = self.model.runtime.model_copy(update={"moe": moe_rt})
        model = self.model.model_copy(update={"overrides": overrides, "runtime": runtime})
        curriculum = self.curriculum.model_copy(update={"stages": self.curriculum.resolved_stages()})
        update = {"model": model, "curriculum": curriculum}
        if self.vision is not None:
            update["vision"] = self.vision.model_copy(update={"tower": dataclasses.asdict(self.vision.build())})
        if self.audio is not None:
            update["audio"] = self.audio.model_copy(update={"encoder": dataclasses.asdict(self.audio.build())})
        return self.model_copy(update=update)
