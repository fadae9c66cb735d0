"""What an eval runs on: the model and tokenizer behind a SOURCE path.

SOURCE is a Hugging Face directory (config.json + safetensors), a converted params checkpoint,
or a training run (its workdir, `checkpoints/`, or one step). The tokenizer is SOURCE's
(`infer/source.py`: the one asked for, the one beside the weights, the training run's), else
the byte tokenizer. The MoE runs dropless for evals whatever the
checkpoint stored: a capacity path would let padding rows push real tokens out of an expert,
making a request's score depend on its batch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..convert.hf import read_hf_params
from ..data.tokenizer import Tokenizer, make_tokenizer
from ..errors import EvalError, UserError
from ..infer.source import load_tokenizer as source_tokenizer
from ..model.config import ModelConfig, RuntimeConfig
from ..model.store import load_any, model_from_flat
from ..model.transformer import Llama4


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


def load_tokenizer(source: str | Path, path: str | None = None) -> Tokenizer:
    """SOURCE's tokenizer (`infer/source.py`), the byte tokenizer when nothing names one."""
    try:
        return source_tokenizer(source, path) or make_tokenizer("byte")
    except UserError as e:
        raise EvalError(str(e)) from None
