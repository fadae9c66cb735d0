"""Files written by the code before the restructure (tests/data/legacy_v0, made with commit
34b9b19: one model_config.json holding architecture, runtime and balancing fields) still load,
convert and resume. The logits recorded then are the reference (f32, ≤1e-6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax
from llama4_jax.cli import main
from llama4_jax.model import store

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_v0"
REF = np.load(LEGACY / "expected_logits.npz")


@pytest.mark.parametrize("name", ["run_checkpoints", "converted"])
def test_legacy_checkpoints_load_with_the_same_logits(name):
    model = llama4_jax.load_checkpoint(LEGACY / name)
    assert model.rt.remat == ("none" if name == "converted" else "full")  # read from the old file (true / false)
    got = np.asarray(model(jnp.asarray(REF["ids"])))
    np.testing.assert_allclose(got, REF[name], rtol=0, atol=1e-6)


def test_legacy_config_keeps_only_architecture():
    saved = json.loads((LEGACY / "converted" / store.CONFIG_FILE).read_text())
    assert "compute_dtype" in saved and "dispatch" in saved["moe"]  # really the old format
    cfg = store.config_from_dict(saved)
    ours = json.loads(json.dumps(store.config_to_dict(cfg)))
    # Every architecture field the old file had is read back as it was; fields added since
    # (layer_types) take their defaults.
    assert {k: v for k, v in ours.items() if k != "moe" and k in saved} == \
        {k: saved[k] for k in ours if k != "moe" and k in saved}
    assert ours["moe"] == {k: saved["moe"][k] for k in ours["moe"]}
    assert not hasattr(cfg, "compute_dtype") and not hasattr(cfg.moe, "dispatch")


def test_legacy_run_converts_to_hf(tmp_path):
    assert main(["convert", "to-hf", str(LEGACY / "run_checkpoints"), str(tmp_path / "hf")]) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["hidden_size"] == 16 and hf_cfg["num_local_experts"] == 4


def test_legacy_training_checkpoint_resumes(tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(LEGACY / "run_checkpoints", work / "checkpoints")
    assert main(["train", str(LEGACY / "exp.yaml"), "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoints/4" in out
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [6]  # steps 5-6 only: 1-4 came from the old run
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [6]
