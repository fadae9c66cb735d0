"""The row-chunked cross entropy (train/loss.py): the plain formula's values and gradients, a
train step that uses it equals the plain one, and the compiled temporaries drop on a
large-vocabulary shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama4_jax.train.loss import chunked_token_losses, token_losses
from llama4_jax.train.step import StepConfig, make_train_step

from test_train_step import BAL, NUM_SOURCES, host, make_batch, make_state


def _plain(h_NxD, w_DxV, t_N):
    logits_NxV = jax.lax.dot_general(h_NxD, w_DxV, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return token_losses(logits_NxV, t_N)


@pytest.mark.parametrize("chunk_rows", [8, 37, 64], ids=["ragged-last-chunk", "one-chunk", "chunk>rows"])
def test_chunked_loss_and_gradients_equal_the_plain_formula(chunk_rows):
    rng = np.random.default_rng(chunk_rows)
    N, D, V = 37, 16, 50
    h = rng.standard_normal((N, D), np.float32)
    w = rng.standard_normal((D, V), np.float32) * 0.5
    t = rng.integers(0, V, N).astype(np.int32)
    r = rng.random(N).astype(np.float32)  # a per-row weight, as the loss mask and 1/tokens give

    def run(f):
        return jax.jit(jax.value_and_grad(lambda h, w: jnp.sum(f(h, w) * r), argnums=(0, 1)))(h, w)

    want, (dh0, dw0) = run(lambda h, w: _plain(h, w, t))
    got, (dh, dw) = run(lambda h, w: chunked_token_losses(h, w, t, chunk_rows))
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda h, w: chunked_token_losses(h, w, t, chunk_rows))(h, w)),
                               np.asarray(jax.jit(lambda h, w: _plain(h, w, t))(h, w)), rtol=1e-6, atol=1e-6)
    for g, g0 in ((dh, dh0), (dw, dw0)):
        assert float(np.abs(np.asarray(g) - np.asarray(g0)).max()) <= 1e-6 * float(np.abs(np.asarray(g0)).max())


def test_train_step_with_chunked_loss_equals_plain():
    # SGD, so parameters differ by lr × the gradient difference (Adam's first step is lr·sign(g):
    # a rounding-level gradient entry near 0 may move a whole lr either way in two correct programs).
    graphdef, state, _ = make_state()
    tx = optax.sgd(0.1)
    state = state.replace(opt_state=tx.init(state.params))
    batch = make_batch()
    plain = jax.jit(make_train_step(graphdef, tx, StepConfig(NUM_SOURCES, BAL)))
    chunked = jax.jit(make_train_step(graphdef, tx, StepConfig(NUM_SOURCES, BAL, loss_chunk_rows=16)))
    (s0, m0), (s1, m1) = plain(state, batch), chunked(state, batch)
    assert abs(float(m1["loss"]) - float(m0["loss"])) <= 1e-6
    assert abs(float(m1["grad_norm"]) - float(m0["grad_norm"])) <= 1e-6 * float(m0["grad_norm"])
    np.testing.assert_allclose(np.asarray(m1["src_loss_sum"]), np.asarray(m0["src_loss_sum"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(host(s1.params)), jax.tree.leaves(host(s0.params))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_chunked_loss_compiles_to_far_fewer_temporaries_on_a_large_vocabulary():
    """4,096 rows × a 32k vocabulary: the plain loss holds [N, V] float32 logits (512 MiB) and
    their softmax / gradient; the chunked one a few [C, V] chunks. Compiled only, never run."""
    N, D, V, C = 4096, 64, 32768, 512
    args = (jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((N,), jnp.int32))

    def temp(f):
        fn = jax.jit(jax.grad(lambda h, w, t: jnp.sum(f(h, w, t)), argnums=(0, 1)))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp(_plain), temp(lambda h, w, t: chunked_token_losses(h, w, t, C))
    assert plain >= N * V * 4  # the whole logits array is there
    assert chunked <= plain / 8, (chunked, plain)
