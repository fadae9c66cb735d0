"""MoE block: grouped matmul, dispatch paths vs the dense oracle, routing semantics, capacity
drops, metrics, aux losses and the aux-loss-free router bias (single device; the expert-parallel
path is tested in test_moe_ep.py).

Tolerance (float32): max |a − b| ≤ 1e-5 · max(1, max |b|), for outputs and every gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama4_jax.model import moe as moe_lib
from llama4_jax.model.config import ModelConfig, MoEConfig, MoERuntime, RuntimeConfig
from llama4_jax.model.gmm import grouped_swiglu, gmm, tgmm
from llama4_jax.model.routing import input_amax, weight_inputs
from llama4_jax.model.transformer import Llama4
from llama4_jax.train.step import BalancingConfig, moe_loss

TOL = 1e-5
D = 16


def close(a, b, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err, scale = np.abs(a - b).max(initial=0.0), max(1.0, np.abs(b).max(initial=0.0))
    assert err <= TOL * scale, f"{what}: max |Δ| = {err:.3g} > {TOL} × {scale:.3g}"


RUNTIME_KEYS = {f.name for f in dataclasses.fields(MoERuntime)}


def make_moe(seed=0, **kw) -> moe_lib.MoE:
    """A MoE block; keyword arguments are MoEConfig (architecture) or MoERuntime fields."""
    run = MoERuntime(**{k: v for k, v in kw.items() if k in RUNTIME_KEYS})
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 1, "expert_ff": 24,
                       **{k: v for k, v in kw.items() if k not in RUNTIME_KEYS}})
    return moe_lib.MoE(cfg, D, run=run, param_dtype=jnp.float32, std=0.3, rngs=nnx.Rngs(seed))


def tokens(B=2, L=16, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, L, D), jnp.float32)


# --- grouped matmul -------------------------------------------------------------------------------
def rowwise_reference(x_NxD, w_ExDxF, sizes):
    """Independent: each row's own expert matrix, rows past the groups → 0 (numpy, float64)."""
    x, w = np.asarray(x_NxD, np.float64), np.asarray(w_ExDxF, np.float64)
    gid = np.repeat(np.arange(len(sizes)), sizes)
    y = np.zeros((x.shape[0], w.shape[2]))
    y[: len(gid)] = np.einsum("nd,ndf->nf", x[: len(gid)], w[gid])
    return y


SIZES = [[30, 0, 7, 41, 13], [0, 0, 0, 0, 100], [1, 2, 3, 4, 5], [9, 9, 9, 9, 64]]


@pytest.mark.parametrize("impl,max_tile", [("tiles", 8), ("ragged", None)])
def test_gmm_and_tgmm_match_rowwise_reference(impl, max_tile):
    N, F = 100, 12
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (N, D))
    w = jax.random.normal(kw, (5, D, F))
    dy = jax.random.normal(kd, (N, F))

    @jax.jit
    def run(x, w, dy, sizes):
        y, vjp = jax.vjp(lambda x, w: gmm(x, w, sizes, impl=impl, max_tile=max_tile), x, w)
        return y, tgmm(x, dy, sizes, impl=impl, max_tile=max_tile), *vjp(dy)  # VJP: gmm(dy, wᵀ), tgmm

    for s in SIZES:
        y, dw, dx_vjp, dw_vjp = run(x, w, dy, jnp.array(s, jnp.int32))
        gid = np.repeat(np.arange(5), s)
        dw_ref = np.zeros((5, D, F))
        np.add.at(dw_ref, gid, np.einsum("nd,nf->ndf", np.asarray(x[: len(gid)], np.float64),
                                         np.asarray(dy[: len(gid)], np.float64)))
        close(y, rowwise_reference(x, w, s), f"gmm {s}")
        close(dw, dw_ref, f"tgmm {s}")
        close(dx_vjp, rowwise_reference(dy, jnp.swapaxes(w, 1, 2), s), f"dx {s}")
        close(dw_vjp, dw_ref, f"dw {s}")


@pytest.mark.parametrize("impl,max_tile", [("tiles", 32), ("ragged", None)])
def test_grouped_swiglu_matches_rowwise_reference(impl, max_tile):
    N, F = 100, 12
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(ks[0], (N, D))
    wg, wu = (0.5 * jax.random.normal(k, (5, D, F)) for k in ks[1:3])
    wd = 0.5 * jax.random.normal(ks[3], (5, F, D))

    def reference(x, wg, wu, wd, gid_N):  # gid = N (past the groups) → zero row
        valid = (gid_N < 5)[:, None]
        g = jnp.minimum(gid_N, 4)
        h = jax.nn.silu(jnp.einsum("nd,ndf->nf", x, wg[g])) * jnp.einsum("nd,ndf->nf", x, wu[g])
        return jnp.where(valid, jnp.einsum("nf,nfd->nd", h, wd[g]), 0)

    def value_and_grads(f):
        loss = lambda *a: jnp.sum(jnp.sin(f(*a)))
        return jax.jit(lambda *a: (f(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a)))

    fast = value_and_grads(lambda x, wg, wu, wd, sizes, gid: grouped_swiglu(
        x, wg, wu, wd, sizes, impl=impl, max_tile=max_tile))
    slow = value_and_grads(lambda x, wg, wu, wd, sizes, gid: reference(x, wg, wu, wd, gid))
    for s in SIZES:
        gid = np.full(N, 5)
        gid[: sum(s)] = np.repeat(np.arange(5), s)
        args = (x, wg, wu, wd, jnp.array(s, jnp.int32), jnp.asarray(gid))
        (y, g), (y_ref, g_ref) = fast(*args), slow(*args)
        close(y, y_ref, f"y {s}")
        for name, a, b in zip(("x", "gate", "up", "down"), g, g_ref):
            close(a, b, f"d{name} {s}")


# --- dispatch paths vs the dense oracle ------------------------------------------------------------
def loss_and_grads(model, x, dispatches):
    """{dispatch: (y, metrics, grads of the model, grad of x)}, all paths in one compiled program."""
    def f(model, x, dispatch):
        y, metrics = model(x, dispatch=dispatch)
        return jnp.sum(jnp.sin(y)), (y, metrics)

    grad = nnx.value_and_grad(f, argnums=(0, 1), has_aux=True)
    run = nnx.jit(lambda model, x: {d: grad(model, x, d) for d in dispatches})
    return {d: (y, m, g, gx) for d, ((_, (y, m)), (g, gx)) in run(model, x).items()}


# Both routers × top-1/top-2, each path with and without the shared expert (pairwise, to keep
# the compile count down; the shared expert is the same module on every path).
@pytest.mark.parametrize("router,top_k,shared", [("sigmoid", 1, True), ("sigmoid", 2, False),
                                                 ("softmax", 1, False), ("softmax", 2, True)])
def test_fast_paths_equal_dense_oracle(router, top_k, shared):
    # capacity_factor = E: C = T·k, so nothing can drop and capacity must equal the oracle too.
    model = make_moe(router=router, top_k=top_k, shared_expert=shared, capacity_factor=6.0)
    results = loss_and_grads(model, tokens(), ("dense", "dropless", "capacity"))
    y_ref, m_ref, g_ref, gx_ref = results["dense"]
    assert float(jnp.abs(g_ref.experts.down[...]).max()) > 0
    if not (router == "softmax" and top_k == 1):  # softmax over one chosen logit is 1: no router grad
        assert float(jnp.abs(g_ref.router[...]).max()) > 0
    for path in ("dropless", "capacity"):
        y, metrics, g, gx = results[path]
        close(y, y_ref, f"{path} y")
        close(gx, gx_ref, f"{path} dx")
        flat, flat_ref = nnx.to_flat_state(nnx.state(g)), dict(nnx.to_flat_state(nnx.state(g_ref)))
        assert {p for p, _ in flat} == set(flat_ref), "gradient trees differ"
        for p, v in flat:
            close(v[...], flat_ref[p][...], f"{path} d{'.'.join(map(str, p))}")
        assert float(metrics["dropped_frac"]) == 0.0
        for key in ("load", "aux_loss", "z_loss", "entropy", "max_violation"):
            close(metrics[key], m_ref[key], f"{path} metric {key}")


def per_token_reference(model, x_BxLxD):
    """Independent of moe.route and the dispatch code: a plain loop over tokens in numpy."""
    cfg = model.cfg
    x = np.asarray(x_BxLxD, np.float64).reshape(-1, D)
    wr = np.asarray(model.router[...], np.float64)
    wg, wu, wd = (np.asarray(v[...], np.float64) for v in (model.experts.gate, model.experts.up, model.experts.down))
    silu = lambda a: a / (1 + np.exp(-a))
    out = np.zeros_like(x)
    for t, xt in enumerate(x):
        logits = xt @ wr
        top = np.argsort(-logits, kind="stable")[: cfg.top_k]
        for e in top:
            if cfg.router == "sigmoid":  # score scales the expert input, no renormalisation
                xi = xt / (1 + np.exp(-logits[e]))
                out[t] += (silu(xi @ wg[e]) * (xi @ wu[e])) @ wd[e]
            else:  # softmax over the chosen logits scales the expert output
                w = np.exp(logits[e] - logits[top].max()) / np.exp(logits[top] - logits[top].max()).sum()
                out[t] += w * ((silu(xt @ wg[e]) * (xt @ wu[e])) @ wd[e])
    return out.reshape(x_BxLxD.shape)


@pytest.mark.parametrize("router,top_k", [("sigmoid", 1), ("sigmoid", 2), ("softmax", 2)])
def test_routing_semantics_match_per_token_reference(router, top_k):
    model = make_moe(router=router, top_k=top_k, shared_expert=False)
    x = tokens()
    y, _ = nnx.jit(lambda m, x: m(x))(model, x)
    close(y, per_token_reference(model, x), f"{router} top-{top_k}")


def test_router_math_is_float32_for_bf16_compute():
    model = make_moe(top_k=2)
    x = tokens().astype(jnp.bfloat16)
    y, metrics = nnx.jit(lambda m, x: m(x))(model, x)
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    logits = jnp.dot(x.reshape(-1, D).astype(jnp.float32), model.router[...])
    idx, w = moe_lib.route(logits, model.bias[...], model.cfg)
    assert w.dtype == jnp.float32
    expect = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(expect, -1))


# --- capacity: exactly which copies drop ----------------------------------------------------------
@pytest.mark.parametrize("router,top_k", [("sigmoid", 1), ("softmax", 2)])
def test_capacity_drops_exactly_the_defined_copies(router, top_k):
    model = make_moe(router=router, top_k=top_k, shared_expert=False, capacity_factor=0.5)
    # Skew the router so some experts overflow hard.
    model.router[...] = model.router[...].at[:, 0].add(0.8)
    x = tokens()
    T, E = 32, model.cfg.num_experts
    C = moe_lib.capacity(model.cfg, model.run.capacity_factor, T)
    assert C == int(np.ceil(0.5 * T * top_k / E))
    logits = np.asarray(x.reshape(-1, D) @ model.router[...])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    # Definition: copies in token-major order n = t·k + j; an expert keeps its first C copies.
    seen, kept = np.zeros(E, int), np.zeros((T, top_k), bool)
    for t in range(T):
        for j in range(top_k):
            e = top[t, j]
            kept[t, j] = seen[e] < C
            seen[e] += 1
    assert 0 < (~kept).sum() < kept.size, "the case must drop some copies but not all"
    # Expected output: the per-token reference with the dropped copies removed.
    masked = per_copy_outputs(model, x, top)
    expect = (masked * kept[..., None]).sum(1).reshape(x.shape)
    y, metrics = nnx.jit(lambda m, x: m(x, dispatch="capacity"))(model, x)
    close(y, expect, "capacity output")
    assert float(metrics["dropped_frac"]) == pytest.approx((~kept).mean(), abs=1e-7)


def per_copy_outputs(model, x_BxLxD, top_Txk):
    """[T, k, D]: what each copy (token t, choice j) adds to the output (numpy, float64)."""
    cfg = model.cfg
    x = np.asarray(x_BxLxD, np.float64).reshape(-1, D)
    wr = np.asarray(model.router[...], np.float64)
    wg, wu, wd = (np.asarray(v[...], np.float64) for v in (model.experts.gate, model.experts.up, model.experts.down))
    silu = lambda a: a / (1 + np.exp(-a))
    out = np.zeros((x.shape[0], top_Txk.shape[1], D))
    for t, xt in enumerate(x):
        logits = xt @ wr
        chosen = logits[top_Txk[t]]
        soft = np.exp(chosen - chosen.max()) / np.exp(chosen - chosen.max()).sum()
        for j, e in enumerate(top_Txk[t]):
            if cfg.router == "sigmoid":
                xi = xt / (1 + np.exp(-logits[e]))
                out[t, j] = (silu(xi @ wg[e]) * (xi @ wu[e])) @ wd[e]
            else:
                out[t, j] = soft[j] * ((silu(xt @ wg[e]) * (xt @ wu[e])) @ wd[e])
    return out


# --- metrics and losses ----------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["batch", "sequence"])
@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_metrics_match_their_definitions(level, router):
    cfg = MoEConfig(num_experts=4, top_k=2, router=router)
    S, L, E, k = 3, 5, 4, 2
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (S * L, E)) * 2, np.float64)
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    m = jax.jit(lambda lg, i: moe_lib.router_metrics(lg, i, cfg, L, 0.25, aux_level=level))(
        jnp.asarray(logits, jnp.float32), jnp.asarray(idx, jnp.int32))
    if router == "sigmoid":
        p = 1 / (1 + np.exp(-logits))
        p = p / p.sum(-1, keepdims=True)
    else:
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    hits = np.zeros((S * L, E))
    for t in range(S * L):
        hits[t, idx[t]] = 1
    load = hits.sum(0) / (S * L * k)
    if level == "batch":
        aux = E * np.sum(load * p.mean(0))
    else:
        aux = np.mean([E * np.sum(hits[s * L:(s + 1) * L].mean(0) / k * p[s * L:(s + 1) * L].mean(0))
                       for s in range(S)])
    close(m["load"], load, "load")
    close(m["max_violation"], load.max() / load.mean() - 1, "max_violation")
    close(m["aux_loss"], aux, "aux_loss")
    close(m["z_loss"], np.mean(np.log(np.exp(logits).sum(-1)) ** 2), "z_loss")
    close(m["entropy"], np.mean(-(p * np.log(p)).sum(-1)), "entropy")
    assert float(m["dropped_frac"]) == 0.25 and float(m["ep_overflow_frac"]) == 0.0
    assert set(m) == set(moe_lib.METRIC_KEYS)


def test_aux_loss_is_one_at_perfect_balance():
    E = 4
    cfg = MoEConfig(num_experts=E, top_k=1, router="softmax")
    logits = jnp.zeros((8, E))
    idx = jnp.arange(8, dtype=jnp.int32)[:, None] % E  # each expert gets 1/E of the tokens
    m = jax.jit(lambda lg, i: moe_lib.router_metrics(lg, i, cfg, 8, 0.0))(logits, idx)
    close(m["aux_loss"], 1.0, "aux")
    close(m["max_violation"], 0.0, "violation")


def test_moe_loss_applies_coefficients_over_layers():
    metrics = {"aux_loss": jnp.array([1.0, 2.0, 3.0]), "z_loss": jnp.array([10.0, 20.0, 30.0])}
    cfg = BalancingConfig(aux_loss_coef=0.01, z_loss_coef=0.001)
    close(moe_loss(metrics, cfg), 0.01 * 6 + 0.001 * 60, "moe_loss")
    assert float(moe_loss(metrics, BalancingConfig())) == 0.0
    assert float(moe_loss({}, cfg)) == 0.0


# --- aux-loss-free bias -----------------------------------------------------------------------------
def skewed_moe():
    model = make_moe(num_experts=8, top_k=1, shared_expert=False)
    model.router[...] = 0.1 * model.router[...]
    model.router[...] = model.router[...].at[:, 0].set(0.5)  # every token's x·1·0.5 favours expert 0
    return model


def test_bias_update_drives_load_violation_down():
    model = skewed_moe()
    x = tokens(B=4, L=64) + 0.5  # positive mean: expert 0 wins for most tokens
    load_of = nnx.jit(lambda m, x: m(x, dispatch="dropless")[1]["load"])
    violation = []
    for step in range(80):  # coarse steps first, then fine ones (the sign update oscillates by ~rate)
        load = load_of(model, x)
        violation.append(float(jnp.max(load) * 8 - 1))
        model.bias[...] = model.bias[...] + moe_lib.bias_step(load, 0.1 if step < 40 else 0.01)
    assert violation[0] > 5.0, violation[0]
    assert max(violation[-10:]) < 0.25, violation  # max load < 1.25 × the mean


def test_bias_gets_no_gradient_and_no_optimizer_update():
    model = skewed_moe()
    model.bias[...] = jnp.linspace(-1, 1, 8)
    x = tokens()
    loss = lambda m: jnp.sum(m(x)[0] ** 2)
    grads = nnx.jit(nnx.grad(loss))(model)  # default wrt=nnx.Param
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(grads))}
    assert not any("bias" in p for p in paths), paths
    # Even differentiated explicitly, the bias only selects: its gradient is exactly zero.
    graphdef, params, bias = nnx.split(model, nnx.Param, moe_lib.RouterBias)
    g_bias = jax.jit(jax.grad(lambda b: jnp.sum(nnx.merge(graphdef, params, b)(x)[0] ** 2)))(bias)
    assert all(float(jnp.abs(v[...]).max()) == 0.0 for _, v in nnx.to_flat_state(g_bias))
    before = np.asarray(model.bias[...])
    opt = nnx.Optimizer(model, optax.adamw(1.0, weight_decay=0.1), wrt=nnx.Param)
    router_before = np.asarray(model.router[...])
    nnx.jit(lambda opt, model, grads: opt.update(model, grads))(opt, model, grads)
    np.testing.assert_array_equal(np.asarray(model.bias[...]), before)
    assert not np.array_equal(np.asarray(model.router[...]), router_before)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("moe_every", [1, 2])
def test_update_router_biases_reaches_every_moe_layer(scan, moe_every):
    # All layers RoPE: the scan period is moe_every, so scan stacks 4 or 2 groups.
    cfg = ModelConfig(num_layers=4, interleave_moe_layer_step=moe_every, no_rope_layers=(1, 1, 1, 1),
                      vocab_size=64, hidden_size=32, head_dim=8, dense_ff=32,
                      moe=MoEConfig(num_experts=4, top_k=1, expert_ff=16))
    rt = RuntimeConfig(scan_layers=scan)
    # Built abstractly and filled with host zeros: random init would compile ~30 tiny programs.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama4(cfg, rt, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype)), state))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    _, metrics = nnx.eval_shape(lambda m, ids: m(ids, return_aux=True), model, ids)  # layout only
    n = len(cfg.moe_layers)
    assert set(metrics) == set(moe_lib.METRIC_KEYS) and metrics["load"].shape == (n, 4)
    load = jnp.full((n, 4), 0.1).at[jnp.arange(n), jnp.arange(n)].set(0.7)  # row r overloads expert r
    nnx.jit(lambda m, l: m.update_router_biases(l, 0.5))(model, load)
    for row, layer in enumerate(cfg.moe_layers):
        if scan:
            g, j = divmod(layer, moe_every)
            got = np.asarray(model.groups.blocks[j].ffn.bias[...][g])
        else:
            got = np.asarray(model.groups.blocks[layer].ffn.bias[...])
        expect = np.full(4, 0.5)
        expect[row] = -0.5
        np.testing.assert_array_equal(got, expect, err_msg=f"layer {layer}")


def test_dispatch_name_is_checked():
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        jax.eval_shape(lambda x: make_moe()(x, dispatch="nope"), tokens())


def test_dropless_handles_every_token_on_one_expert():
    model = make_moe(top_k=2, shared_expert=False)
    model.router[...] = jnp.zeros_like(model.router[...]).at[:, 3].set(5.0)
    x = jnp.abs(tokens())  # logits for expert 3 dominate for every token
    y, metrics = nnx.jit(lambda m, x: m(x))(model, x)
    close(metrics["load"][3], 0.5, "load")
    close(y, per_token_reference(model, x), "dropless, all on one expert")


@pytest.mark.parametrize("router,top_k", [("sigmoid", 1), ("sigmoid", 2), ("softmax", 2)])
def test_gather_dispatch_matches_per_token_reference(router, top_k):
    """The decode-time path (per-copy expert weights gathered) computes the same formula."""
    model = make_moe(router=router, top_k=top_k, shared_expert=False)
    x = tokens(B=3, L=1)
    y, _ = nnx.jit(lambda m, x: m(x, dispatch="gather"))(model, x)
    close(y, per_token_reference(model, x), f"gather {router} top-{top_k}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_input_amax_is_exactly_the_amax_of_the_expert_inputs(router, dtype):
    """FP8 experts quantise with this amax, taken from the tokens (under expert parallelism, before
    the copies exist): it must equal the amax of the rows the grouped matmul really gets."""
    cfg = MoEConfig(num_experts=6, top_k=2, router=router)
    x = (3 * tokens()).reshape(-1, D).astype(dtype)
    w = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(5), (x.shape[0], 2)))
    rows = weight_inputs(jnp.repeat(x, 2, axis=0), w.reshape(-1), cfg)
    assert float(input_amax(x, w, cfg)) == float(jnp.max(jnp.abs(rows)).astype(jnp.float32))
