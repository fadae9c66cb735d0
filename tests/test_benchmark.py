"""`llama4-jax bench` end to end on the quickstart model: the JSON fields the issue asks for, MFU
consistent with its parts, the HF peer and ratio, and the profile (trace + HLO + per-source table)."""

from __future__ import annotations

import json
from pathlib import Path

from llama4_jax.bench.step import _print_table, cross_device, peer_device
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
    assert out["platform"] == "cpu" and out["peer_device"] == "cpu" and out["ratio_cross_device"] is False
    # The profile: the HLO and a trace were written, and the table attributes time to model code.
    assert (prof / "train_step.hlo.txt").stat().st_size > 0
    assert list(prof.rglob("*.json.gz")), "no trace written"
    table = out["profile"]
    assert table.startswith("busy ") and "matmul" in table
    assert any(src in table for src in ("layers.py:", "attention.py:", "transformer.py:")), table


def test_peer_runs_on_our_device_kind_or_the_ratio_says_cross_device(capsys):
    """Ours on a GPU: the peer on CUDA when torch has it; without CUDA the ratio is labelled."""
    assert peer_device("gpu", cuda_available=True) == "cuda"
    assert peer_device("cpu", cuda_available=True) == "cpu"
    assert peer_device("gpu", cuda_available=False) == "cpu"
    assert not cross_device("gpu", "cuda") and not cross_device("cpu", "cpu")
    assert cross_device("gpu", "cpu") and cross_device("tpu", "cpu")
    row = {"device": "H200", "platform": "gpu", "n_devices": 1, "jax": "0", "batch": 8, "seq_len": 128,
           "params_total": 1, "params_active": 1, "compile_s": 1.0, "step_s": 0.1, "tokens_per_s": 1e4,
           "flops_per_token": 1.0, "peak_flops": 1e15, "peak_flops_source": "published", "mfu": 0.1,
           "peak_memory_bytes": 1.0, "peak_memory_source": "x", "data_tokens_per_s": 1e5, "data_vs_step": 10.0,
           "peer": "transformers", "peer_device": "cpu", "peer_tokens_per_s": 1e3, "ratio": 10.0,
           "ratio_cross_device": True}
    _print_table(row)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("ours / peer"))
    assert "cross-device: ours on gpu, peer on cpu" in line
