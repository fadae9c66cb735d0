"""The tokenizer that goes with a model SOURCE, for every command that reads one (generate,
eval, compress).

SOURCE is a Hugging Face directory (config.json + safetensors), one of our params checkpoints
(`convert from-hf`), or a training run (its workdir, `checkpoints/`, or one step). Its tokenizer
is, in order: the one asked for (`--tokenizer`: `byte`, `byte_image`, `byte_mm`, a
tokenizer.json or a directory holding one, or a SentencePiece .model); `tokenizer.json` /
`tokenizer.model` beside the weights; the `data.tokenizer` of the training run's
`config.resolved.yaml`; otherwise none (each command says what it does then).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..data.tokenizer import Tokenizer, make_tokenizer
from ..errors import UserError

RESOLVED_CONFIG = "config.resolved.yaml"
BUILTIN = ("byte", "byte_image", "byte_mm")


def run_dir(source: str | Path) -> Path | None:
    """The training run's workdir behind SOURCE (the workdir, its checkpoints/ or a step), if any."""
    path = Path(source).absolute()
    for cand in [path, *list(path.parents)[:2]]:
        if (cand / RESOLVED_CONFIG).is_file():
            return cand
    return None


def resolved_config(workdir: Path) -> dict:
    with open(workdir / RESOLVED_CONFIG, encoding="utf-8") as f:
        return yaml.safe_load(f)


def parse_tokenizer_arg(spec: str) -> tuple[str, str | None]:
    """`--tokenizer` → (kind, path) for `data.tokenizer.make_tokenizer`; UserError if it names none."""
    if spec in BUILTIN:
        return spec, None
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return "hf", str(path / "tokenizer.json")
    if path.suffix == ".model" and path.is_file():
        return "sentencepiece", str(path)
    if path.suffix == ".json" and path.is_file():
        return "hf", str(path)
    raise UserError(f"unknown tokenizer {spec!r}: expected {', '.join(BUILTIN)}, a tokenizer.json (or its "
                    "directory) or a SentencePiece .model file")


def tokenizer_spec(source: str | Path, override: str | None = None) -> tuple[str, str | None] | None:
    """(kind, path) of SOURCE's tokenizer (module doc), or None when nothing names one."""
    if override:
        return parse_tokenizer_arg(override)
    src = Path(source)
    if (src / "tokenizer.json").is_file():
        return "hf", str(src / "tokenizer.json")
    if (src / "tokenizer.model").is_file():
        return "sentencepiece", str(src / "tokenizer.model")
    work = run_dir(src)
    if work is not None:
        tok = (resolved_config(work).get("data") or {}).get("tokenizer") or {}
        return tok.get("type", "byte"), tok.get("path")
    return None


def load_tokenizer(source: str | Path, override: str | None = None) -> Tokenizer | None:
    """SOURCE's tokenizer (module doc), or None when nothing names one."""
    spec = tokenizer_spec(source, override)
    return None if spec is None else make_tokenizer(*spec)
