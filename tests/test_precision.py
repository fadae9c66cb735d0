"""Precision policy and FP8 training (llama4_jax/precision.py).

Quantisation error bounds used below. float8_e4m3fn keeps 3 mantissa bits: rounding to nearest
has unit roundoff u4 = 2^-4, so a product of two rounded operands is off by at most
(1+u4)^2 - 1 ≈ 2·u4 = 12.5% relative; a dot product of such terms (all errors of one sign at
worst) keeps the same relative bound on ‖y‖. float8_e5m2 (gradients) has 2 mantissa bits,
u5 = 2^-3, so a gradient product is within u4 + u5 ≈ 18.75%. Random data sits far inside these
bounds; the tests also require a clearly non-zero error, so a path that silently ran in f32
fails.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from llama4_jax.cli import main
from llama4_jax.model.config import RuntimeConfig, preset
from llama4_jax.model.layers import default_dot
from llama4_jax.model.fp8 import E4M3, Fp8Dot, Fp8State
from llama4_jax.train.state import init_state
from llama4_jax.train.step import StepConfig, make_train_step

def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for item in (v if isinstance(v, (list, tuple)) else (v,)):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _all_eqns(jaxpr):
    """Every equation, recursing into pjit / custom_vjp / scan / cond bodies."""
    for e in jaxpr.eqns:
        yield e
        for sub in _sub_jaxprs(e):
            yield from _all_eqns(sub)



FWD_BOUND = 2 * 2.0**-4
BWD_BOUND = 2.0**-4 + 2.0**-3


def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


CASES = [((4, 6, 32), (32, 3, 8), (2,), (0,)),  # q projection: [B,L,D]·[D,H,Dh]
         ((4, 6, 3, 8), (3, 8, 32), (2, 3), (0, 1)),  # o projection: [B,L,H,Dh]·[H,Dh,D]
         ((24, 32), (32, 16), (1,), (0,))]


@pytest.mark.parametrize("scaling", ["current", "delayed"])
@pytest.mark.parametrize("xs, ws, xd, wd", CASES)
def test_fp8_dot_forward_and_backward_within_quantisation_error(scaling, xs, ws, xd, wd):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, xs), 0.1 * jax.random.normal(kw, ws)
    gdef, st = nnx.split(Fp8Dot(scaling, history=4))
    fresh = lambda: nnx.merge(gdef, st, copy=True)  # Variables of the current trace level
    loss8 = lambda x, w: jnp.sum(jnp.sin(fresh()(x, w, xd, wd)))
    loss = lambda x, w: jnp.sum(jnp.sin(default_dot(x, w, xd, wd)))
    y8, y = fresh()(x, w, xd, wd), default_dot(x, w, xd, wd)
    g8, g = jax.grad(loss8, (0, 1))(x, w), jax.grad(loss, (0, 1))(x, w)
    for err, bound in ((rel(y8, y), FWD_BOUND), (rel(g8[0], g[0]), BWD_BOUND), (rel(g8[1], g[1]), BWD_BOUND)):
        assert 1e-3 < err < bound, (err, bound)


def test_fp8_operands_really_are_float8_in_the_program():
    dot = Fp8Dot("current")  # stateless: safe to close over under jax transforms
    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: dot(x, w, (1,), (0,)).sum(), (0, 1)))(x, w)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    kinds = {tuple(str(v.aval.dtype) for v in e.invars) for e in dots}
    assert ("float8_e4m3fn", "float8_e4m3fn") in kinds  # forward
    assert any("float8_e5m2" in k for k in kinds)  # backward


def test_delayed_scaling_saturates_until_history_catches_up():
    dot = Fp8Dot("delayed", history=2)
    small, w = jnp.full((4, 4), 1.0), jnp.eye(4)
    dot(small, w, (1,), (0,))
    big = jnp.full((4, 4), 100.0)
    y = dot(big, w, (1,), (0,))  # scale still from amax 1 → clipped at the format's max / scale
    assert float(jnp.max(y)) < 100.0
    assert float(jnp.max(dot.x_hist[...])) == 100.0  # recorded now...
    y = dot(big, w, (1,), (0,))  # ...so the next step represents it
    np.testing.assert_allclose(np.asarray(y), 100.0, rtol=2.0**-4)


# --- in the train step ------------------------------------------------------------------------
CFG = preset("tiny", vocab_size=264, num_layers=2)
RT = RuntimeConfig(fp8_families=("attention", "mlp", "head"), fp8_scaling="delayed", fp8_history=4)


def _batch(seed, B=2, L=16):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, 259, (B, L), dtype=np.int32),
            "targets": rng.integers(0, 259, (B, L), dtype=np.int32),
            "segment_ids": np.ones((B, L), np.int32), "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
            "loss_mask": np.ones((B, L), np.float32), "source_ids": np.zeros((B,), np.int32)}


def _fp8_state(state):
    return [np.asarray(v[...]) for p, v in nnx.to_flat_state(state.extra) if isinstance(v, Fp8State)]


@pytest.fixture(scope="module")
def fp8_steps():
    graphdef, state, tx = init_state(CFG, 0, lambda p: optax.adamw(1e-3), rt=RT)
    step = jax.jit(make_train_step(graphdef, tx, StepConfig(1)))
    states = [state]
    for s in range(3):
        state, m = step(state, _batch(s))
        assert bool(m["finite"])
        states.append(state)
    return graphdef, step, states


def test_scaling_state_changes_over_steps(fp8_steps):
    _, _, states = fp8_steps
    h0, h1, h3 = _fp8_state(states[0]), _fp8_state(states[1]), _fp8_state(states[3])
    assert len(h0) >= 2 * 4 * 2  # x and w histories of q, k, v, o (and more) per layer
    assert all(np.all(a == 0) for a in h0)
    assert all(a[0] > 0 for a in h1)  # the newest amax is recorded at slot 0...
    assert all(np.count_nonzero(a) == 3 for a in h3)  # ...and rolls through the history


def test_scaling_state_survives_a_checkpoint_round_trip(fp8_steps, tmp_path):
    _, _, states = fp8_steps
    state = states[-1]
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "s", state)
    with ocp.StandardCheckpointer() as ck:
        back = ck.restore(tmp_path / "s", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    for a, b in zip(_fp8_state(state), _fp8_state(back)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_step_leaves_fp8_state_unchanged(fp8_steps):
    _, step, states = fp8_steps
    bad = _batch(9)
    bad["loss_mask"][0, 0] = np.nan
    state = jax.tree.map(lambda a: a, states[-1])
    before = _fp8_state(state)
    after, m = step(state, bad)
    assert not bool(m["finite"])
    for a, b in zip(before, _fp8_state(after)):
        np.testing.assert_array_equal(a, b)


# --- the bf16 policy's float32 islands ----------------------------------------------------------
def test_bf16_policy_keeps_router_softmax_norms_and_loss_in_float32():
    cfg = preset("tiny", vocab_size=264, num_layers=2)
    graphdef, state, tx = init_state(cfg, 0, lambda p: optax.adamw(1e-3), rt=RuntimeConfig(compute_dtype="bfloat16"))
    step = make_train_step(graphdef, tx, StepConfig(1))
    jaxpr = jax.make_jaxpr(step)(state, _batch(0)).jaxpr
    eqns = list(_all_eqns(jaxpr))
    dtypes = lambda e: {str(v.aval.dtype) for v in e.invars if hasattr(v.aval, "dtype")}
    by_prim = {}
    for e in eqns:
        by_prim.setdefault(e.primitive.name, []).append(e)
    # The compute really is bf16: some matmuls take bf16 operands.
    assert any(dtypes(e) == {"bfloat16"} for e in by_prim["dot_general"])
    # Router top-k, norms (rsqrt), softmax / logsumexp (exp, log): float32 only.
    for prim in ("top_k", "rsqrt", "exp", "log"):
        assert by_prim.get(prim), prim
        for e in by_prim[prim]:
            assert dtypes(e) <= {"float32", "int32"}, (prim, dtypes(e))
    # The router logits are a float32 matmul.
    assert any(dtypes(e) == {"float32"} and e.outvars[0].aval.shape[-1] == cfg.moe.num_experts
               for e in by_prim["dot_general"])


# --- FP8 training tracks bf16 on the quickstart -----------------------------------------------------
SHORT = ["--set", "curriculum.overrides.base.steps=30", "--set", "curriculum.overrides.domain.steps=20",
         "--set", "curriculum.overrides.long_tail.steps=20", "--set", "eval.every_steps=0",
         "--set", "checkpoint.every_steps=1000", "--set", "logging.progress=false", "--set", "logging.every_steps=10",
         "--set", "precision.compute_dtype=bfloat16"]


def _final_loss(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("skipped_steps", 0) == 0 for r in rows)
    return [r for r in rows if "loss" in r][-1]["loss"]


def test_fp8_quickstart_tracks_bf16(tmp_path):
    """Final loss of the (shortened) quickstart with FP8 on attention / mlp / experts within 3%
    relative of the bf16 run, and no non-finite step in either."""
    assert main(["train", "experiments/quickstart.yaml", "--workdir", str(tmp_path / "bf16"), *SHORT]) == 0
    assert main(["train", "experiments/quickstart.yaml", "--workdir", str(tmp_path / "fp8"), *SHORT,
                 "--set", "precision.fp8.enabled=true"]) == 0
    bf16, fp8 = _final_loss(tmp_path / "bf16"), _final_loss(tmp_path / "fp8")
    assert abs(fp8 - bf16) / bf16 < 0.03, (fp8, bf16)


EXPERTS_BASE = preset("tiny", vocab_size=264, num_layers=2)  # layer 1 is MoE


def _loss_and_grad(model):
    """Mean squared output and its parameter gradients, in one compiled program (op-by-op
    dispatch of the model's forward and backward is slower than compiling it)."""
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 32)), jnp.int32)
    f = lambda p, r: jnp.mean(nnx.merge(gdef, p, r, copy=True)(ids) ** 2)
    return jax.jit(jax.value_and_grad(f))(params, rest)


@pytest.fixture(scope="module")
def experts_ref():
    """(the float32 model, its loss and gradients): the reference of both scalings."""
    from llama4_jax.model.transformer import Llama4

    ref = Llama4(EXPERTS_BASE, rngs=nnx.Rngs(0))
    return ref, _loss_and_grad(ref)


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_fp8_covers_the_expert_grouped_matmuls(scaling, experts_ref):
    """Only the `experts` family in FP8: the model's output and its expert-weight gradients move
    by a quantisation-sized amount (more than f32 noise, within the e4m3/e5m2 bounds)."""
    from llama4_jax.model.transformer import Llama4

    ref, (l0, g0) = experts_ref
    fp8 = Llama4(EXPERTS_BASE, RuntimeConfig(fp8_families=("experts",), fp8_scaling=scaling), rngs=nnx.Rngs(0))
    nnx.update(fp8, nnx.state(ref, nnx.Param))
    l8, g8 = _loss_and_grad(fp8)
    assert 1e-6 < abs(float(l8 - l0)) / float(l0) < FWD_BOUND
    for name in ("gate", "up", "down"):
        a = g8["groups"]["blocks"][1]["ffn"]["experts"][name][...]
        b = g0["groups"]["blocks"][1]["ffn"]["experts"][name][...]
        assert 1e-4 < rel(a, b) < BWD_BOUND + FWD_BOUND, (name, rel(a, b))


def test_fp8_expert_weight_gradient_equals_the_float32_upcast_product():
    """The grouped FP8 backward forms dw from bfloat16 copies of the float8 operands (half the
    memory of float32 copies); every e4m3/e5m2 value is a bfloat16 value and the sums are float32,
    so dw equals the product of float32 copies (≤ 1e-6 relative: summation order only)."""
    import jax

    from llama4_jax.model.fp8 import E4M3_MAX, E5M2, E5M2_MAX, fp8_gmm, quantize, scale_for, amax
    from llama4_jax.model.gmm import tgmm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((24, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 16, 8)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((24, 8)), jnp.bfloat16)
    sizes = jnp.asarray([10, 0, 14], jnp.int32)

    @jax.jit  # one compiled program (op by op, every primitive compiles alone: slower)
    def dw_and_want(x, w, dy, sizes):
        sx, sw = scale_for(amax(x), E4M3_MAX), scale_for(amax(w), E4M3_MAX)
        _, vjp = jax.vjp(lambda w_: fp8_gmm(x, w_, sx, sw, sizes), w)
        (dw,) = vjp(dy)
        g = scale_for(amax(dy), E5M2_MAX)
        xq, dyq = quantize(x, sx, E4M3, E4M3_MAX), quantize(dy, g, E5M2, E5M2_MAX)
        return dw, tgmm(xq.astype(jnp.float32), dyq.astype(jnp.float32), sizes) / (sx * g)

    dw, want = dw_and_want(x, w, dy, sizes)
    assert dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dw), np.asarray(want), rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))
    assert float(jnp.abs(want).max()) > 0
