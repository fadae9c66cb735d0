"""What an eval runs on: the model and tokenizer behind a SOURCE path.

SOURCE is a Hugging Face directory (config.json + safetensors), a converted params checkpoint,
or a training run (its workdir, `checkpoints/`, or one step). The tokenizer is, in order: the
one asked for; `tokenizer.json` / `tokenizer.model` beside the weights; the one in a training
run's `config.resolved.yaml`; the byte tokenizer. The MoE runs dropless for evals whatever the
checkpoint stored: a capacity path would let padding rows push real tokens out of an expert,
making a request's score depend on its batch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from ..convert.hf import read_hf_params
from ..data.tokenizer import Tokenizer, make_tokenizer
from ..errors import EvalError
from ..model.config import ModelConfig, RuntimeConfig
from ..model.store import load_any, model_from_flat
from ..model.transformer import Llama4

RESOLVED_CONFIG = "config.resolved.yaml"


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def read_source(path: Path) -> tuple[ModelConfig, dict, RuntimeConfig]:
    """(architecture, flat arrays, runtime) of an existing SOURCE: an HF directory (default
    runtime) or one of ours (`store.load_any`: its stored runtime)."""
    if is_hf_dir(path):
        rt = RuntimeConfig()
        return (*read_hf_params(path, rt), rt)
    return load_any(path)


def load_model(source: str | Path) -> Llama4:
    path = Path(source)
    if not path.exists():
        raise EvalError(f"{source}: no such model source (an HF directory, a converted checkpoint or a training run)")
    cfg, flat, rt = read_source(path)
    return model_from_flat(cfg, flat, replace(rt, moe=replace(rt.moe, dispatch="dropless")))


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


def load_tokenizer(source: str | Path, path: str | None = None) -> Tokenizer:
    if path:
        return make_tokenizer("sentencepiece" if path.endswith(".model") else "hf", path)
    src = Path(source)
    if (src / "tokenizer.json").is_file():
        return make_tokenizer("hf", str(src / "tokenizer.json"))
    if (src / "tokenizer.model").is_file():
        return make_tokenizer("sentencepiece", str(src / "tokenizer.model"))
    work = run_dir(src)
    if work is not None:
        tok = (resolved_config(work).get("data") or {}).get("tokenizer") or {}
        return make_tokenizer(tok.get("type", "byte"), tok.get("path"))
    return make_tokenizer("byte")
