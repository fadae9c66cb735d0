"""Long-tail sampler: moves toward hard and rarely seen sources; exact state round trip."""

import json

import numpy as np
import pytest

from llama4_jax.data import DataError, LongTailSampler

NAMES = ("web", "code", "math")
BASE = {"web": 0.5, "code": 0.3, "math": 0.2}


def sampler(**kw):
    return LongTailSampler(NAMES, BASE, **({"temperature": 1.0, "ema": 0.9, "min_weight": 0.02,
                                            "rare_boost": 1.0} | kw))


def test_starts_at_base_weights_before_any_observation():
    w = sampler().weights()
    assert w == pytest.approx(BASE)


def test_weight_moves_toward_the_high_loss_source():
    s = sampler()
    rows = {name: 10 for name in NAMES}
    history = [s.weights()["math"]]
    for _ in range(40):
        s.update({"web": 2.0, "code": 2.0, "math": 4.0}, rows)
        history.append(s.weights()["math"])
    assert np.all(np.diff(history) > 0)
    assert history[-1] > BASE["math"] + 0.3
    assert sum(s.weights().values()) == pytest.approx(1.0)


def test_rarely_seen_source_is_upweighted_when_losses_are_equal():
    s = sampler()
    for _ in range(20):
        s.update({n: 3.0 for n in NAMES}, {"web": 100, "code": 100, "math": 2})
    w = s.weights()
    assert w["math"] > BASE["math"] * 1.3
    # Relative to base, the rare source gains and the often-seen ones lose.
    assert w["math"] / BASE["math"] > w["web"] / BASE["web"]
    assert w["web"] < BASE["web"]


def test_floor_and_zero_base_weight():
    s = LongTailSampler(NAMES, {"web": 1.0, "code": 1.0, "math": 0.0}, temperature=0.1,
                        min_weight=0.05, rare_boost=0.0)
    for _ in range(50):
        s.update({"web": 9.0, "code": 1.0, "math": 9.0}, {"web": 1, "code": 1, "math": 1})
    w = s.weights()
    assert w["math"] == 0.0  # not part of the recipe, whatever its loss
    assert w["code"] == pytest.approx(0.05)  # floored, not starved
    assert w["web"] == pytest.approx(0.95)


def test_losses_without_rows_or_not_finite_are_ignored():
    s = sampler()
    s.update({"web": 2.0, "code": 2.0, "math": 2.0}, {n: 1 for n in NAMES})
    before = s.weights()
    s.update({"math": 100.0, "web": float("nan")}, {"math": 0, "web": 5})
    after = s.weights()
    # Only the extra web rows changed (lowering its rarity boost); no loss moved.
    assert after["web"] < before["web"]
    assert s.state_dict()["ema_loss"] == {"web": 2.0, "code": 2.0, "math": 2.0}


def test_state_round_trip_gives_identical_weights():
    rng = np.random.default_rng(0)
    steps = [({n: float(rng.uniform(1, 5)) for n in NAMES},
              {n: int(rng.integers(0, 20)) for n in NAMES}) for _ in range(30)]
    a = sampler()
    for loss, rows in steps[:12]:
        a.update(loss, rows)
    b = sampler()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for loss, rows in steps[12:]:
        a.update(loss, rows)
        b.update(loss, rows)
        assert b.weights() == a.weights()


def test_invalid_arguments():
    with pytest.raises(DataError, match="unknown source"):
        LongTailSampler(NAMES, {"books": 1.0})
    with pytest.raises(DataError, match="min_weight"):
        LongTailSampler(NAMES, BASE, min_weight=0.5)
    with pytest.raises(DataError, match="unknown source"):
        sampler().update({"books": 1.0}, {"books": 1})
