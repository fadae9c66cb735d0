"""infer/source.py: which tokenizer goes with a model SOURCE (generate, eval and compress share it)."""

from __future__ import annotations

import pytest
import yaml

from llama4_jax.errors import UserError
from llama4_jax.infer.source import RESOLVED_CONFIG, parse_tokenizer_arg, run_dir, tokenizer_spec


def _run(tmp_path, tokenizer: dict):
    work = tmp_path / "run"
    step = work / "checkpoints" / "40"
    step.mkdir(parents=True)
    (work / RESOLVED_CONFIG).write_text(yaml.safe_dump({"data": {"tokenizer": tokenizer}}))
    return work, step


def test_order_override_then_beside_then_training_run_then_none(tmp_path):
    work, step = _run(tmp_path, {"type": "byte_image"})
    assert run_dir(step) == work.absolute() and run_dir(work / "checkpoints") == work.absolute()
    assert tokenizer_spec(step) == ("byte_image", None)  # the run's data.tokenizer
    (step / "tokenizer.model").write_bytes(b"")
    assert tokenizer_spec(step) == ("sentencepiece", str(step / "tokenizer.model"))  # beside beats the run
    (step / "tokenizer.json").write_text("{}")
    assert tokenizer_spec(step) == ("hf", str(step / "tokenizer.json"))  # tokenizer.json first
    assert tokenizer_spec(step, "byte_mm") == ("byte_mm", None)  # the one asked for beats all
    plain = tmp_path / "params"
    plain.mkdir()
    assert tokenizer_spec(plain) is None


def test_tokenizer_argument_forms(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "sp.model").write_bytes(b"")
    assert parse_tokenizer_arg("byte") == ("byte", None)
    assert parse_tokenizer_arg(str(tmp_path)) == ("hf", str(tmp_path / "tokenizer.json"))
    assert parse_tokenizer_arg(str(tmp_path / "tokenizer.json")) == ("hf", str(tmp_path / "tokenizer.json"))
    assert parse_tokenizer_arg(str(tmp_path / "sp.model")) == ("sentencepiece", str(tmp_path / "sp.model"))
    with pytest.raises(UserError, match="unknown tokenizer 'nope.bin'"):
        parse_tokenizer_arg("nope.bin")
