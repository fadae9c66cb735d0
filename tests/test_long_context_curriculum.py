"""The long-context ramp: a stage that grows seq_len and changes the RoPE scaling (a function
change, not a parameter change) resumes exactly — stopped at the boundary or inside the long
stage, the resumed run is bit for bit the one that never stopped. Plus the pieces it rests on:
the stage's `rope_scaling` reaches the model, bad fields are one-line config errors, and
`min_doc_chars` joins documents into long ones.

Runs in-process with the shared XLA cache of test_checkpoint_resume.py (same helpers).
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from test_checkpoint_resume import (assert_same_state, experiment, metrics, step_dirs, train,  # noqa: F401
                                    xla_cache)

from llama4_jax.config import load_experiment
from llama4_jax.data.sources import Source, iter_documents, join_documents
from llama4_jax.errors import ConfigError
from llama4_jax.model.config import RopeScaling
from llama4_jax.train.curriculum import plan_stages, stage_model_config

ROPE = {"factor": 2.0, "original_max_position_embeddings": 32}
TOTAL = 5


def ramp(root, rope=ROPE):
    """short (2 steps of 4 × 32) → long (3 steps of 2 × 64, RoPE scaling × 2): the same tokens per step."""
    exp = experiment(root)
    raw = yaml.safe_load(exp.read_text())
    # Two layers, one RoPE (chunked, where the scaling acts) and one NoPE: the compiles of the two
    # stages' steps are most of this file's time, and they grow with the depth.
    raw["model"]["overrides"].update(num_layers=2, no_rope_layers=[1, 0])
    raw["curriculum"]["stages"] = [
        {"name": "short", "steps": 2, "seq_len": 32, "batch_size": 4, "mixture": {"prose": 1.0},
         "lr_phase": {"warmup_steps": 1}},
        {"name": "long", "steps": 3, "seq_len": 64, "batch_size": 2, "mixture": {"prose": 0.5, "code": 0.5},
         "rope_scaling": rope},
    ]
    raw["checkpoint"]["every_steps"] = 100
    exp.write_text(yaml.safe_dump(raw, sort_keys=False))
    return exp


def test_stage_rope_scaling_reaches_the_model(tmp_path):
    e = load_experiment(ramp(tmp_path))
    plans = plan_stages(e.curriculum)
    assert plans[0].rope_scaling is None
    assert plans[1].rope_scaling == dataclasses.replace(RopeScaling(), **ROPE)
    cfg = e.to_model_config()
    assert stage_model_config(cfg, plans[0]) is cfg
    assert stage_model_config(cfg, plans[1]) == cfg.replace(rope_scaling=plans[1].rope_scaling)
    with pytest.raises(ConfigError, match=r"curriculum\.stages\[1\]\.rope_scaling\.factr"):
        load_experiment(ramp(tmp_path, {"factr": 2.0}))


def test_ramp_with_rope_change_resumes_exactly(tmp_path, capsys, xla_cache):
    exp = ramp(tmp_path)
    ref = tmp_path / "straight"
    rc, _, err = train(exp, ref, capsys=capsys)
    assert rc == 0, err
    run = tmp_path / "run"
    # Stopped exactly at the short → long boundary: the resumed session starts with the longer
    # rows, the smaller batch and the new RoPE scaling (its own compiled step).
    rc, _, err = train(exp, run, stop=2, capsys=capsys)
    assert rc == 0, err
    assert step_dirs(run)[-1] == 2
    rc, out, err = train(exp, run, capsys=capsys)
    assert rc == 0, err
    assert "resumed from" in out
    got, want = metrics(run), metrics(ref)
    assert sorted(got) == list(range(1, TOTAL + 1))
    assert [want[s]["stage"] for s in range(1, TOTAL + 1)] == ["short"] * 2 + ["long"] * 3
    for step in want:
        assert got[step] == want[step], f"step {step}"
    assert_same_state(run / "checkpoints" / str(TOTAL), ref / "checkpoints" / str(TOTAL))


def test_min_doc_chars_joins_documents(tmp_path):
    assert list(join_documents(["ab", "cd", "efgh", "i"], 5)) == ["ab\n\ncd", "efgh\n\ni"]
    assert list(join_documents(["abcdef", "g"], 5)) == ["abcdef", "g"]
    (tmp_path / "a.txt").write_text("one two\n\nthree\n\nfour five six\n\nseven\n")
    src = Source(kind="text", path=str(tmp_path / "a.txt"), split="paragraph", min_doc_chars=12)
    assert list(iter_documents(src)) == ["one two\n\nthree", "four five six", "seven\n"]
