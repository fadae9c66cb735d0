"""Loading an experiment: YAML → dict → `--set key.path=value` overrides → `curriculum.include`
expanded → validated `Experiment` (schema.py). Every user mistake surfaces as a one-line
`ConfigError` (`<file>: <key.path>: <what is wrong>`), which the CLI prints and exits 2.
Loading reads files and never writes any.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..model.config import ModelConfig, RuntimeConfig
from .schema import Curriculum, Experiment, ModelSection, Stage, _Invalid, _lower, _short, _suggest

# The repo's recipe folder; found next to the package because the package is installed editable.
CURRICULUM_DIR = Path(__file__).resolve().parent.parent.parent / "curriculum"


def _keypath(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _fail(file, loc, msg: str):
    where = loc if isinstance(loc, str) else _keypath(loc)
    raise ConfigError(f"{file}: {where}: {msg}" if where else f"{file}: {msg}")


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
    elif isinstance(cause, ValueError):  # a validator of another room's section (data.sources.Source)
        msg = str(cause)
    elif first["type"] == "extra_forbidden" and loc[:1] == ("model",) and len(loc) == 2:
        msg = f"unknown key{_model_hint(loc, set_paths)}"
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


def _model_hint(loc: tuple, set_paths) -> str:
    """`model.moe...` / `model.hidden_size`: point at where model fields live (with the whole
    path when it came from `--set`)."""
    key = loc[1]
    if key in {f.name for f in dataclasses.fields(ModelConfig)}:
        full = next((p for p in set_paths if p[:2] == loc), loc)
        return f" (model fields go under model.overrides: did you mean model.overrides.{_keypath(full[1:])}?)"
    if key in {f.name for f in dataclasses.fields(RuntimeConfig)}:
        return f" (did you mean model.runtime.{key}, or precision: for dtypes and fp8?)"
    return _suggest(key, ModelSection.model_fields)


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
