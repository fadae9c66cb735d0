"""What compression reads and writes: a float model behind SOURCE (HF directory, params
checkpoint or training run, in the unrolled layout), and output directories written whole or
not at all (a hidden temporary directory renamed at the end)."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..convert.hf import read_hf_tokens
from ..errors import UserError
from ..evals.loading import is_hf_dir, read_source
from ..infer.source import tokenizer_spec
from ..model.config import ModelConfig, RuntimeConfig
from ..model.special_tokens import SpecialTokens
from ..model.store import load_special_tokens, unrolled


class CompressError(UserError):
    """A compression request that cannot run (source, output directory, option)."""


@dataclass
class Source:
    cfg: ModelConfig
    flat: dict  # unrolled layout, host arrays
    rt: RuntimeConfig
    tokens: SpecialTokens
    tokenizer_file: Path | None  # a tokenizer.json to copy beside the output, if the source has one


def load_float(source: str | Path) -> Source:
    path = Path(source)
    if not path.exists():
        raise CompressError(f"{source}: not found (expected an HF directory, a params checkpoint or a training run)")
    cfg, flat, rt = read_source(path)  # CheckpointError (one line) when it is no model
    if is_hf_dir(path):
        tokens = read_hf_tokens(path)
    else:
        tokens = load_special_tokens(path)
        if rt.quant is not None:
            raise CompressError(f"{source}: already quantized ({rt.quant.bits}-bit); compress the float model")
        flat, rt = unrolled(cfg, flat, rt)
    spec = tokenizer_spec(path)
    tok = Path(spec[1]) if spec is not None and spec[0] == "hf" and spec[1] else None
    tok = tok if tok is not None and tok.is_file() else None
    return Source(cfg, {k: np.asarray(v) for k, v in flat.items()}, rt.replace(scan_layers=False), tokens, tok)


def check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"{out}: exists and is not an empty directory (refusing to overwrite)")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a temporary directory beside `out`; on success it becomes `out`, on failure it goes."""
    out = check_out(out)
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
