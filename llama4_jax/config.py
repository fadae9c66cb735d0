"""Experiment configuration: the typed schema (defined once), YAML loading, includes, overrides.

Loading is YAML → dict → `--set key.path=value` overrides → `curriculum.include` expanded →
validated `Experiment`. Experiment YAMLs only set values of the schema below; variants are picked
with `preset:` / `type:` fields, never by inheriting another YAML. Every user mistake surfaces as a
one-line `ConfigError` (`<file>: <key.path>: <what is wrong>`), which the CLI prints and exits 2.
Loading reads files and never writes any.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import itertools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from llama4_jax.model.config import PRESETS, ModelConfig, MoEConfig, RopeScaling, preset

# The repo's recipe folder; found next to the package because the package is installed editable.
CURRICULUM_DIR = Path(__file__).resolve().parent.parent / "curriculum"
MESH_AXES = ("data", "fsdp", "expert", "tensor")


class ConfigError(ValueError):
    """A user mistake in an experiment. `str()` is one line naming the file, key path and problem."""

    def __init__(self, msg: str):
        super().__init__(" ".join(part.strip() for part in str(msg).splitlines()))


class _Invalid(ValueError):
    """Raised inside validators; `path` extends pydantic's location (e.g. into `model.overrides`)."""

    def __init__(self, msg: str, path: tuple = ()):
        super().__init__(msg)
        self.msg, self.path = msg, tuple(path)


def _suggest(key: Any, options) -> str:
    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _keypath(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _fail(file, loc, msg: str):
    where = loc if isinstance(loc, str) else _keypath(loc)
    raise ConfigError(f"{file}: {where}: {msg}" if where else f"{file}: {msg}")


# --- value types ------------------------------------------------------------------------------

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Dtype = Literal["float32", "bfloat16"]


def _resolve_path(value: str, info: ValidationInfo) -> str:
    # Relative paths mean "relative to the YAML file", so a run does not depend on the cwd.
    if "://" in value:  # gs://, s3://: Orbax and the readers open these themselves
        return value
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return os.path.normpath(path) if path.is_absolute() else value


FilePath = Annotated[str, AfterValidator(_resolve_path)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- model ------------------------------------------------------------------------------------

# Dtypes live in `precision:` only, so there is one place to look for them.
_DTYPE_KEYS = {"param_dtype": "precision.param_dtype", "compute_dtype": "precision.compute_dtype",
               "fp8_families": "precision.fp8.families", "fp8_scaling": "precision.fp8.scaling",
               "fp8_history": "precision.fp8.amax_history"}


def _typed_fields(cls, values: dict, path: tuple) -> dict:
    """Check keys against a dataclass's fields and convert values to the field types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in names:
            raise _Invalid(f"unknown key{_suggest(key, names)}", (*path, key))
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as err:
            raise _Invalid(f"{_lower(err.errors()[0]['msg'])} (got {_short(value)})", (*path, key)) from None
    return out


def _model_kwargs(name: str, overrides: dict) -> dict:
    """Typed keyword arguments for `preset(name, **kw)`."""
    kw = {}
    for key, value in overrides.items():
        if key in _DTYPE_KEYS:
            raise _Invalid(f"set {_DTYPE_KEYS[key]} instead", (key,))
        if key in ("moe", "rope_scaling") and value is not None:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a mapping of fields (got {_short(value)})", (key,))
            cls = MoEConfig if key == "moe" else RopeScaling
            kw[key] = _typed_fields(cls, value, (key,))
            if key == "rope_scaling":  # partial override of the preset's scaling, like `moe:`
                kw[key] = dataclasses.replace(PRESETS[name]().rope_scaling or RopeScaling(), **kw[key])
        else:
            kw.update(_typed_fields(ModelConfig, {key: value}, ()))
    return kw


class ModelSection(_Section):
    preset: str
    # Fields of ModelConfig; `moe:` and `rope_scaling:` take partial mappings of their fields.
    overrides: dict[str, Any] = {}

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

    def build(self, **extra) -> ModelConfig:
        return preset(self.preset, **_model_kwargs(self.preset, self.overrides), **extra)


# --- mesh -------------------------------------------------------------------------------------


class Mesh(_Section):
    data: int = -1  # -1: whatever the other axes leave of the device count
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    # Overrides of parallel.DEFAULT_RULES (logical axis → mesh axis): an axis, a list, or null.
    rules: dict[str, Any] = {}

    @field_validator("rules")
    @classmethod
    def _rules(cls, rules):
        if rules:  # parallel.py holds the one logical-axis table; a name missing there is a typo
            from llama4_jax.parallel import DEFAULT_RULES
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


class FP8(_Section):
    enabled: bool = False
    families: list[Literal["attention", "mlp", "experts", "head"]] = ["attention", "mlp", "experts"]
    scaling: Literal["delayed", "current"] = "delayed"
    amax_history: PosInt = 16  # delayed scaling: scale from the max |x| of this many past steps


class Precision(_Section):
    param_dtype: Dtype = "float32"  # master weights
    compute_dtype: Dtype = "float32"
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
    schedule: Schedule = Field(default_factory=Schedule)


# --- data -------------------------------------------------------------------------------------


class Tokenizer(_Section):
    type: Literal["byte", "hf", "sentencepiece"] = "byte"
    path: FilePath | None = None

    @model_validator(mode="after")
    def _path(self):
        if self.type != "byte" and self.path is None:
            raise _Invalid(f"required for tokenizer type {self.type!r}", ("path",))
        if self.type == "byte" and self.path is not None:
            raise _Invalid("the byte tokenizer takes no path", ("path",))
        return self


class Source(_Section):
    kind: Literal["text", "jsonl", "parquet", "array_record", "builtin"] = "text"
    path: str  # file, directory or glob; for `builtin`, the corpus name (e.g. stdlib_prose)
    field: str = "text"  # jsonl / parquet / array_record: the record field holding the text
    split: Literal["file", "paragraph", "line"] = "file"  # text: what one document is
    eval_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.01

    @field_validator("path")
    @classmethod
    def _resolve(cls, path, info: ValidationInfo):
        if info.data.get("kind") != "builtin":
            return _resolve_path(path, info)
        from llama4_jax.data.corpus import builtin_source_names  # the data layer owns the names

        if path not in builtin_source_names():
            names = builtin_source_names()
            raise _Invalid(f"unknown builtin corpus {path!r}{_suggest(path, names)} (builtins: {', '.join(names)})")
        return path


class Data(_Section):
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)
    sources: dict[str, Source] = Field(min_length=1)
    cache_dir: FilePath | None = None


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

    @model_validator(mode="after")
    def _consistent(self):
        for a, b in (("steps", "tokens"), ("batch_size", "global_batch_tokens")):
            if (getattr(self, a) is None) == (getattr(self, b) is None):
                raise _Invalid(f"set exactly one of {a} / {b}")
        if self.global_batch_tokens is not None and self.global_batch_tokens % self.seq_len:
            raise _Invalid(f"{self.global_batch_tokens} is not a multiple of seq_len={self.seq_len}",
                           ("global_batch_tokens",))
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


# --- the experiment ---------------------------------------------------------------------------


class Experiment(_Section):
    name: str
    seed: int = 0
    init_from: FilePath | None = None  # converted HF checkpoint or another run's checkpoints: params only
    model: ModelSection
    mesh: Mesh = Field(default_factory=Mesh)
    precision: Precision = Field(default_factory=Precision)
    optimizer: Optimizer = Field(default_factory=Optimizer)
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
        if self.eval.every_steps and not any(s.eval_fraction > 0 for s in sources.values()):
            raise _Invalid("eval is on but no data source has eval_fraction > 0", ("eval", "every_steps"))
        return self

    def to_model_config(self) -> ModelConfig:
        """The ModelConfig this experiment trains: preset + overrides + precision dtypes.
        (Not `model_config`: pydantic reserves that name for the class settings.)"""
        p = self.precision
        return self.model.build(param_dtype=p.param_dtype, compute_dtype=p.compute_dtype,
                                fp8_families=tuple(p.fp8.families) if p.fp8.enabled else (),
                                fp8_scaling=p.fp8.scaling, fp8_history=p.fp8.amax_history)

    def resolved(self) -> Experiment:
        """The same experiment with every stage's steps and batch_size filled in, and every model
        field spelled out in `model.overrides`, so a saved copy does not change if a preset does."""
        fields = dataclasses.asdict(self.model.build())
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if k not in _DTYPE_KEYS}
        model = self.model.model_copy(update={"overrides": overrides})
        curriculum = self.curriculum.model_copy(update={"stages": self.curriculum.resolved_stages()})
        return self.model_copy(update={"model": model, "curriculum": curriculum})


# --- YAML -------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, where `1e-3` is a string; YAML 1.2 (and every user) reads a float.
_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$")


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        # A repeated key silently keeps the last value, which hides typos and bad merges.
        seen = set()
        for key_node, _ in node.value:
            key = getattr(key_node, "value", None)
            if isinstance(key, str) and key != "<<":
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    def represent_list(self, data):  # lists of numbers / names on one line: [1, 1, 1, 0, ...]
        flat = all(isinstance(x, (str, int, float, bool)) or x is None for x in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _Dumper.represent_list)


for _cls in (_Loader, _Dumper):  # the dumper must quote strings the loader would read as floats
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _read_yaml(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: cannot read ({err})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{file}: {line}invalid YAML ({err.problem or err.context})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: invalid YAML ({err})") from None


def _lower(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- overrides and includes -------------------------------------------------------------------

_KEY = re.compile(r"[^.\[\]=\s]+(?:\.[^.\[\]=\s]+|\[\d+\])*")


def _parse_set(item: str, file) -> tuple[tuple, Any]:
    key, sep, text = item.partition("=")
    if not sep or not _KEY.fullmatch(key.strip()):
        _fail(file, "", f"--set {item!r}: expected key.path=value (e.g. optimizer.lr=1e-3)")
    path = tuple(int(i) if i else name for i, name in re.findall(r"\[(\d+)\]|([^.\[\]]+)", key.strip()))
    try:
        return path, yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        _fail(file, path, f"invalid value {text!r} (from --set {item})")


def _apply_set(raw: dict, path: tuple, value: Any, item: str, file) -> None:
    node = raw
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                _fail(file, path[: i + 1], f"no such list item (from --set {item})")
        elif not isinstance(node, dict):
            _fail(file, path[:i], f"is not a mapping, cannot set {part!r} in it (from --set {item})")
        elif not last and node.get(part) is None:  # a section the YAML leaves to its defaults
            if isinstance(path[i + 1], int):
                _fail(file, path[: i + 1], f"is not a list (from --set {item})")
            node[part] = {}
        if last:
            node[part] = value
        else:
            node = node[part]


# Setting one of an exclusive pair in a stage override drops the other from the recipe's stage.
_EXCLUSIVE = {"steps": "tokens", "tokens": "steps", "batch_size": "global_batch_tokens",
              "global_batch_tokens": "batch_size"}


def _find_recipe(include: Any, file: Path) -> Path:
    if not isinstance(include, str) or not include:
        _fail(file, "curriculum.include", f"expected a recipe name or path (got {_short(include)})")
    if "/" in include or include.endswith((".yaml", ".yml")):
        path = Path(include).expanduser()
        path = path if path.is_absolute() else file.parent / path
        if not path.is_file():
            _fail(file, "curriculum.include", f"recipe file {path} not found")
        return path
    path = CURRICULUM_DIR / f"{include}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CURRICULUM_DIR.glob("*.yaml"))
        _fail(file, "curriculum.include", f"no recipe {include!r}{_suggest(include, names)} in {CURRICULUM_DIR} "
                                          f"(recipes: {', '.join(names) or 'none'})")
    return path


def _read_recipe(path: Path) -> list:
    doc = _read_yaml(path)
    if not isinstance(doc, dict):
        _fail(path, "", "expected a mapping with a 'stages' list")
    for key in doc:
        if key != "stages":
            _fail(path, str(key), f"unknown key{_suggest(key, ['stages'])}")
    if not isinstance(doc.get("stages"), list):
        _fail(path, "stages", "expected a list of stages")
    return doc["stages"]


def _override_stages(stages: list, overrides: Any, file) -> list:
    if not isinstance(overrides, dict):
        _fail(file, "curriculum.overrides", "expected a mapping of stage name → fields")
    stages = [dict(s) if isinstance(s, dict) else s for s in stages]
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    for name, fields in overrides.items():
        where = f"curriculum.overrides.{name}"
        if name not in names:
            _fail(file, where, f"unknown stage{_suggest(name, names)} (stages: {', '.join(map(str, names))})")
        if not isinstance(fields, dict):
            _fail(file, where, "expected a mapping of stage fields")
        stage = stages[names.index(name)]
        for key, value in fields.items():
            if key not in Stage.model_fields:
                _fail(file, f"{where}.{key}", f"unknown key{_suggest(key, Stage.model_fields)}")
            stage.pop(_EXCLUSIVE.get(key), None)
            old = stage.get(key)
            # lr_phase / sampler merge field by field; a mixture is one value and is replaced whole.
            merge = isinstance(old, dict) and isinstance(value, dict) and key != "mixture"
            stage[key] = {**old, **value} if merge else value
    return stages


def _expand_curriculum(cur: Any, file: Path) -> tuple[Any, Path | None]:
    """`include:` + `overrides:` → plain `stages:`. Returns the section and the recipe file used."""
    if not isinstance(cur, dict):
        return cur, None
    cur, recipe = dict(cur), None
    include, overrides = cur.pop("include", None), cur.pop("overrides", None)
    if include is not None:
        if "stages" in cur:
            _fail(file, "curriculum", "set either 'include' or 'stages', not both")
        recipe = _find_recipe(include, file)
        cur["stages"] = _read_recipe(recipe)
    if overrides is not None:
        if not isinstance(cur.get("stages"), list):
            _fail(file, "curriculum.overrides", "there are no stages to override")
        cur["stages"] = _override_stages(cur["stages"], overrides, file)
    return cur, recipe


# --- validation -------------------------------------------------------------------------------


def _unwrap(tp):
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _fields_at(cls, loc) -> list[str]:
    """Field names of the schema section at `loc` (for 'did you mean' on unknown keys)."""
    tp = cls
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]
        else:
            return []
    tp = _unwrap(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


# pydantic's wording for these names Python classes; users wrote YAML.
_EXPECTED = {"model_type": "a mapping", "model_attributes_type": "a mapping", "dict_type": "a mapping",
             "list_type": "a list", "string_type": "a string"}


def _validate(cls, raw: Any, file, *, set_paths=(), recipe: Path | None = None):
    try:
        return cls.model_validate(raw, context={"base_dir": Path(file).absolute().parent})
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
    loc = tuple(p for p in first["loc"] if p != "[key]")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _Invalid):
        loc, msg = loc + cause.path, cause.msg
    elif first["type"] == "extra_forbidden":
        msg = f"unknown key{_suggest(loc[-1], _fields_at(cls, loc[:-1]))}"
    elif first["type"] == "missing":
        msg = "required"
    elif first["type"] in _EXPECTED:
        msg = f"expected {_EXPECTED[first['type']]} (got {_short(first['input'])})"
    else:
        msg = f"{_lower(first['msg'])} (got {_short(first['input'])})"
    if any(_touches(p, loc) for p in set_paths):
        msg += " (from --set)"
    if recipe is not None and loc[:2] == ("curriculum", "stages"):
        # After an include, stages[i] is not in the user's file: say which stage and where it came from.
        name = _stage_name(raw, loc)
        msg += f" (stage {name!r} from {recipe})" if name and len(loc) > 2 else f" (stages from {recipe})"
    _fail(file, loc, msg)


def _touches(set_path: tuple, loc: tuple) -> bool:
    """Whether a `--set` path is in, contains, or sits next to (same mapping) the error's key."""
    parent = loc[:-1] if len(loc) > 1 else loc
    return bool(loc) and (loc[: len(set_path)] == set_path or set_path[: len(parent)] == parent)


def _stage_name(raw: Any, loc: tuple) -> str | None:
    try:
        return raw["curriculum"]["stages"][loc[2]]["name"]
    except (KeyError, IndexError, TypeError):
        return None


def load_experiment(path: str | os.PathLike, overrides=()) -> Experiment:
    """Read, override (`key.path=value`, value parsed as YAML), expand includes, validate."""
    file = Path(path)
    raw = _read_yaml(file)
    if raw is None:
        _fail(file, "", "empty file, expected a mapping of settings")
    if not isinstance(raw, dict):
        _fail(file, "", f"expected a mapping of settings at the top level (got {type(raw).__name__})")
    raw.setdefault("name", file.stem)
    sets = [(item, *_parse_set(item, file)) for item in overrides]
    # `curriculum.stages...` exists only once an include is expanded, so those are set afterwards.
    early = [s for s in sets if s[1][:2] != ("curriculum", "stages")]
    late = [s for s in sets if s[1][:2] == ("curriculum", "stages")]
    for item, key, value in early:
        _apply_set(raw, key, value, item, file)
    recipe = None
    if "curriculum" in raw:
        raw["curriculum"], recipe = _expand_curriculum(raw["curriculum"], file)
    for item, key, value in late:
        _apply_set(raw, key, value, item, file)
    return _validate(Experiment, raw, file, set_paths=[s[1] for s in sets], recipe=recipe)


def load_curriculum(path: str | os.PathLike) -> Curriculum:
    """Validate a recipe from curriculum/ on its own (sources are checked when an experiment includes it)."""
    file = Path(path)
    return _validate(Curriculum, {"stages": _read_recipe(file)}, file)


def dump_resolved(exp: Experiment) -> str:
    """YAML of the fully resolved experiment (includes expanded, stage steps and batch sizes filled);
    `load_experiment` reads it back to `exp.resolved()`."""
    data = exp.resolved().model_dump(mode="json")
    for stage in data["curriculum"]["stages"]:
        del stage["tokens"], stage["global_batch_tokens"]
    header = (f"# Fully resolved experiment {exp.name!r}, written by llama4_jax.config.dump_resolved:\n"
              "# includes expanded, stage steps and batch sizes filled, paths absolute.\n")
    return header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
