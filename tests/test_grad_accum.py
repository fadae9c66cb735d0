"""Gradient accumulation (StepConfig.microbatches): 4 microbatches give the 1-microbatch step on
the same global batch — loss, parameters, router biases, MoE metrics, per-source sums — when
every balancing term is a mean over tokens or sequences; the batch-level Switch aux loss is
defined per microbatch, as train/step.py documents."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from pydantic import ValidationError

from llama4_jax.config.schema import Stage
from llama4_jax.model.config import MoERuntime, RuntimeConfig
from llama4_jax.train.step import BalancingConfig, StepConfig, make_train_step

from test_train_step import NUM_SOURCES, host, make_batch, make_state

N = 4
SEQ_BAL = BalancingConfig(aux_loss_coef=0.01, z_loss_coef=0.001, bias_update_rate=0.05)
SEQ_RT = RuntimeConfig(moe=MoERuntime(aux_loss_level="sequence"))
SOURCES = (0, 2, 0, 1, 3, 1, 0, 2)


def _batch():
    return make_batch(seed=5, B=8, L=24, sources=SOURCES)


def _max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))))


def test_four_microbatches_equal_one_step_on_the_same_batch():
    # SGD: a parameter moves by lr·gradient, so "parameters within 1e-6" measures the summed
    # gradients. (Adam's first update is lr·sign(g) for every entry, so float-noise-sized
    # gradient entries could flip a whole lr step between two correct programs.)
    graphdef, state, _ = make_state(rt=SEQ_RT)
    tx = optax.sgd(0.1)
    state = state.replace(opt_state=tx.init(state.params))
    batch = _batch()
    one = jax.jit(make_train_step(graphdef, tx, StepConfig(NUM_SOURCES, SEQ_BAL)))
    four = jax.jit(make_train_step(graphdef, tx, StepConfig(NUM_SOURCES, SEQ_BAL, microbatches=N)))
    (s1, m1), (s4, m4) = one(state, batch), four(state, batch)
    assert int(s4.step) == 1 and bool(m4["finite"])  # one optimizer update
    for key in ("loss", "total_loss", "moe_loss"):
        assert abs(float(m4[key]) - float(m1[key])) <= 1e-6, key
    assert float(m1["moe_loss"]) > 0
    assert abs(float(m4["grad_norm"]) - float(m1["grad_norm"])) <= 1e-6 * float(m1["grad_norm"])
    assert _max_diff(s4.params, s1.params) <= 1e-6
    assert _max_diff(s4.params, state.params) > 1e-4  # the step really moved them
    assert _max_diff(s4.extra, s1.extra) == 0  # router biases: the merged load is the full batch's
    for k in m1:
        if k.startswith("moe/"):
            np.testing.assert_allclose(np.asarray(m4[k]), np.asarray(m1[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(np.asarray(m4["src_loss_sum"]), np.asarray(m1["src_loss_sum"]), rtol=1e-6)
    for k in ("src_tokens", "src_rows", "tokens"):
        np.testing.assert_array_equal(np.asarray(m4[k]), np.asarray(m1[k]))


def test_batch_level_aux_loss_is_the_mean_of_the_microbatches_own():
    """aux_loss_level: batch — E·Σ f·P is a product of means: accumulated, it is the mean of
    each microbatch's own batch-level value (microbatch i = rows i, i+4, ...), not the whole
    batch's."""
    graphdef, state, tx = make_state()  # default runtime: batch-level statistic
    bal = BalancingConfig(aux_loss_coef=0.01)
    batch = _batch()
    _, m4 = jax.jit(make_train_step(graphdef, tx, StepConfig(NUM_SOURCES, bal, microbatches=N)))(state, batch)

    @jax.jit
    def aux_loss(params, extra, inputs, seg, pos):
        _, aux = nnx.merge(graphdef, params, extra)(inputs, seg, pos, return_aux=True)
        return aux["aux_loss"]

    def aux_of(rows):
        return np.asarray(aux_loss(state.params, state.extra, *(batch[k][rows] for k in ("inputs", "segment_ids",
                                                                                          "positions"))))

    own = np.mean([aux_of(slice(i, None, N)) for i in range(N)], axis=0)  # per MoE layer
    whole = aux_of(slice(None))
    np.testing.assert_allclose(np.asarray(m4["moe/aux_loss"]), own, rtol=1e-6)
    assert float(m4["moe_loss"]) == pytest.approx(0.01 * own.sum(), rel=1e-6)
    assert np.abs(own - whole).max() > 1e-4  # the two definitions really differ here


def test_a_stage_batch_that_does_not_split_is_refused():
    with pytest.raises(ValidationError, match="batch of 6 rows does not split into 4 microbatches"):
        Stage(name="s", steps=1, seq_len=8, batch_size=6, mixture={"a": 1.0}, microbatches=4)
    assert Stage(name="s", steps=1, seq_len=8, global_batch_tokens=64, mixture={"a": 1.0}, microbatches=4)
