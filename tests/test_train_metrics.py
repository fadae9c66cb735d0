"""The peak FLOP/s that MFU is taken against: the compute dtype's published dense peak, the FP8
one for FP8 runs where the chip has one, and a label saying which was used."""

from types import SimpleNamespace

import pytest

from llama4_jax.train import metrics


@pytest.fixture
def h200(monkeypatch):
    fake = SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    monkeypatch.setattr(metrics.jax, "devices", lambda *a: [fake])


def test_fp8_runs_are_measured_against_the_fp8_peak(h200):
    bf16, how16 = metrics.device_peak_flops("bfloat16")
    fp8, how8 = metrics.device_peak_flops("bfloat16", fp8=True)
    assert bf16 == metrics.PUBLISHED_PEAKS[("h200", "bfloat16")] and "bfloat16" in how16
    assert fp8 == metrics.PUBLISHED_PEAKS[("h200", "float8")] and "float8" in how8
    assert fp8 == pytest.approx(2 * bf16, rel=0.01)


def test_a_chip_without_an_fp8_peak_says_so():
    peak, how = metrics.published_peak("NVIDIA A100-SXM4-80GB", "bfloat16", fp8=True)
    assert peak == metrics.PUBLISHED_PEAKS[("a100", "bfloat16")]
    assert "no FP8 peak" in how
    assert metrics.published_peak("Some new chip", "bfloat16", fp8=True) is None
