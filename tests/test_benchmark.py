"""`llama4-jax bench` end to end on the quickstart model: the JSON fields the issue asks for, MFU
consistent with its parts, the HF peer and ratio, and the profile (trace + HLO + per-source table)."""

from __future__ import annotations

import json
from pathlib import Path

from llama4_jax.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_with_peer_and_profile(tmp_path, capsys):
    prof = tmp_path / "profile"
    rc = main(["bench", str(REPO / "experiments" / "quickstart.yaml"), "--steps", "2", "--warmup", "1",
               "--peer", "hf", "--peer-steps", "1", "--json", "--profile", str(prof)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tokens_per_s", "step_s", "mfu", "peak_flops", "peer_tokens_per_s", "ratio", "compile_s",
                "flops_per_token", "peak_memory_bytes", "data_tokens_per_s"):
        assert out[key] > 0, key
    tokens = out["batch"] * out["seq_len"]
    assert abs(out["tokens_per_s"] - tokens / out["step_s"]) <= 1e-6 * out["tokens_per_s"]
    assert abs(out["mfu"] - out["flops_per_token"] * out["tokens_per_s"] / out["peak_flops"]) <= 1e-9
    assert abs(out["ratio"] - out["tokens_per_s"] / out["peer_tokens_per_s"]) <= 1e-9 * out["ratio"]
    # The profile: the HLO and a trace were written, and the table attributes time to model code.
    assert (prof / "train_step.hlo.txt").stat().st_size > 0
    assert list(prof.rglob("*.json.gz")), "no trace written"
    table = out["profile"]
    assert table.startswith("busy ") and "matmul" in table
    assert any(src in table for src in ("layers.py:", "attention.py:", "transformer.py:")), table
