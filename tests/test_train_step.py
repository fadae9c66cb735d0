"""The pure train step on its own: loss and per-source sums against numpy, the non-finite guard,
and which parameters the optimizer decays."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama4_jax.config.schema import Optimizer
from llama4_jax.model.config import preset
from llama4_jax.model.transformer import Llama4
from llama4_jax.train.optimizer import build_optimizer
from llama4_jax.train.state import init_state
from llama4_jax.model.config import RuntimeConfig
from llama4_jax.train.step import BalancingConfig, StepConfig, make_eval_step, make_train_step, moe_loss

VOCAB = 264
NUM_SOURCES = 4
# Balancing on, so that a good step visibly moves the router biases and the MoE loss is not 0.
BAL = BalancingConfig(aux_loss_coef=0.01, z_loss_coef=0.001, bias_update_rate=0.05)
CFG = preset("tiny", vocab_size=VOCAB, num_layers=2)  # one dense block, one MoE block
SCAN = RuntimeConfig(scan_layers=True)


def make_state(cfg=CFG, opt=None, schedule=optax.constant_schedule(1e-3), rt=None):
    """init_state, jitted (eager initialisation dispatches hundreds of tiny ops)."""
    opt, out = opt or Optimizer(lr=1e-3), {}

    def build():
        graphdef, state, tx = init_state(cfg, 0, lambda params: build_optimizer(opt, params, schedule), rt=rt)
        out.update(graphdef=graphdef, tx=tx)
        return state

    state = jax.jit(build)()
    return out["graphdef"], state, out["tx"]


def make_batch(seed=0, B=4, L=24, sources=(0, 2, 0, 1)):
    """Two packed documents per row (segment ids 1 and 2), some targets masked out."""
    rng = np.random.default_rng(seed)
    split = rng.integers(4, L - 4, B)
    seg = np.where(np.arange(L)[None] < split[:, None], 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(L)[None], np.arange(L)[None] - split[:, None]).astype(np.int32)
    mask = (rng.random((B, L)) > 0.2).astype(np.float32)
    mask[np.arange(B), split - 1] = 0.0  # the last token of document 1 does not predict document 2
    return {"inputs": rng.integers(0, 259, (B, L), dtype=np.int32),
            "targets": rng.integers(0, 259, (B, L), dtype=np.int32),
            "segment_ids": seg, "positions": pos, "loss_mask": mask,
            "source_ids": np.asarray(sources, np.int32)}


def numpy_token_losses(graphdef, state, batch) -> np.ndarray:
    """Per-token masked cross entropy, in float64 numpy from the model's float32 logits."""
    forward = jax.jit(lambda p, e, i, s, q: nnx.merge(graphdef, p, e)(i, s, q))
    logits = np.asarray(forward(state.params, state.extra, batch["inputs"], batch["segment_ids"],
                                batch["positions"]), np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    gold = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return (lse - gold) * batch["loss_mask"]


@pytest.fixture(scope="module")
def setup():
    graphdef, state, tx = make_state()
    step = jax.jit(make_train_step(graphdef, tx, StepConfig(num_sources=NUM_SOURCES, balancing=BAL)))
    return graphdef, state, tx, step


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def trees_differ(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))))


# --- loss and per-source sums ---------------------------------------------------------------------

def test_loss_and_per_source_sums_match_numpy(setup):
    graphdef, state, _, step = setup
    batch = make_batch()
    tok = numpy_token_losses(graphdef, state, batch)
    _, m = step(state, batch)
    mask = batch["loss_mask"]
    np.testing.assert_allclose(float(m["loss"]), tok.sum() / mask.sum(), rtol=2e-6)
    np.testing.assert_allclose(float(m["total_loss"]), float(m["loss"]) + float(m["moe_loss"]), rtol=1e-6)
    assert float(m["moe_loss"]) > 0  # coefficients are on
    src = batch["source_ids"]
    want_loss = [tok[src == j].sum() for j in range(NUM_SOURCES)]
    want_tokens = [mask[src == j].sum() for j in range(NUM_SOURCES)]
    want_rows = [(src == j).sum() for j in range(NUM_SOURCES)]
    np.testing.assert_allclose(np.asarray(m["src_loss_sum"]), want_loss, rtol=2e-6)
    np.testing.assert_array_equal(np.asarray(m["src_tokens"]), want_tokens)
    np.testing.assert_array_equal(np.asarray(m["src_rows"]), want_rows)
    assert float(m["tokens"]) == mask.sum()
    assert bool(m["finite"])
    # The global-norm metric is the norm of the gradient of the total loss.
    grads = jax.jit(jax.grad(lambda p: _total_loss(graphdef, state, p, batch)))(state.params)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-4)


def _total_loss(graphdef, state, params, batch):
    model = nnx.merge(graphdef, params, state.extra)
    logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], return_aux=True)
    lse = jax.nn.logsumexp(logits, -1)
    gold = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    ce = ((lse - gold) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    return ce + moe_loss(aux, BAL)


def test_eval_step_sums_match_numpy(setup):
    graphdef, state, _, _ = setup
    batch = make_batch(seed=3)
    s, c = jax.jit(make_eval_step(graphdef))(state, batch)
    tok = numpy_token_losses(graphdef, state, batch)
    np.testing.assert_allclose(float(s), tok.sum(), rtol=2e-6)
    assert float(c) == batch["loss_mask"].sum()


# --- the non-finite guard --------------------------------------------------------------------------

def _nan_mask(state, batch):
    batch = dict(batch, loss_mask=batch["loss_mask"].copy())
    batch["loss_mask"][1, 3] = np.nan
    return state, batch


def _inf_embedding(state, batch):
    """One input token's embedding row at inf: its RMS norm is inf/inf, the loss nan."""
    token = int(batch["inputs"][0, 0])
    params = jax.tree.map(lambda x: x, state.params)
    params["embed"][...] = params["embed"][...].at[token].set(np.inf)
    return state.replace(params=params), batch


@pytest.mark.parametrize("inject", [_nan_mask, _inf_embedding], ids=["nan-loss-mask", "inf-embedding"])
def test_non_finite_step_changes_nothing_but_counters(setup, inject):
    graphdef, state0, _, step = setup
    state0, bad = inject(state0, make_batch(seed=1))
    before = host(state0)
    s1, m1 = step(state0, bad)
    assert not bool(m1["finite"])
    assert not np.isfinite(float(m1["loss"])) or not np.isfinite(float(m1["grad_norm"]))
    for part in ("params", "opt_state", "extra"):
        assert_trees_equal(getattr(s1, part), getattr(before, part))
    assert (int(s1.step), int(s1.skipped), int(s1.bad_streak)) == (0, 1, 1)
    s2, _ = step(s1, bad)
    assert (int(s2.step), int(s2.skipped), int(s2.bad_streak)) == (0, 2, 2)
    assert_trees_equal(s2.params, before.params)


def test_good_step_after_bad_ones_resets_streak_and_is_unaffected(setup):
    graphdef, state0, _, step = setup
    _, bad = _nan_mask(state0, make_batch(seed=1))
    good = make_batch(seed=2)
    s, _ = step(state0, bad)
    s, _ = step(s, bad)
    after_bad, m = step(s, good)
    assert bool(m["finite"])
    assert (int(after_bad.step), int(after_bad.skipped), int(after_bad.bad_streak)) == (1, 2, 0)
    direct, _ = step(state0, good)
    # The guard leaves no trace: same params, moments, router biases as one good step from the start.
    for part in ("params", "opt_state", "extra"):
        assert_trees_equal(getattr(after_bad, part), getattr(direct, part))
    # ...and that good step does change all three (so "unchanged" above was a real check).
    for part in ("params", "opt_state", "extra"):
        assert trees_differ(getattr(direct, part), getattr(state0, part)), part


# --- weight decay mask -----------------------------------------------------------------------------

def _kind(path) -> str:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys[0] == "embed":
        return "embedding"
    if any(isinstance(k, str) and k.endswith("norm") for k in keys) and keys[-1] == "scale":
        return "norm"
    return "weight"


@functools.cache
def _params(scan: bool):
    rt = RuntimeConfig(scan_layers=scan)
    return nnx.state(nnx.eval_shape(lambda: Llama4(CFG, rt, rngs=nnx.Rngs(0))), nnx.Param)


DEFAULT_EXCLUDE = Optimizer().wd_exclude


@pytest.mark.parametrize("exclude, scan", [
    (DEFAULT_EXCLUDE, False), (DEFAULT_EXCLUDE, True), (["norms"], False), (["embeddings"], False),
    (["biases"], False), ([], False)])
def test_weight_decay_applies_exactly_where_configured(exclude, scan):
    """Zero gradients, lr 1, decay 0.5: Adam's step is 0, so each update is -0.5·p where the
    optimizer decays p and exactly 0 where it does not."""
    abstract = _params(scan)
    tx = build_optimizer(Optimizer(lr=1.0, weight_decay=0.5, wd_exclude=exclude), abstract,
                         optax.constant_schedule(1.0))
    # Distinct values per leaf (the mask is built from the metadata, the update from the values).
    params = jax.tree.map(lambda a: jnp.full(a.shape, 1.0 + len(a.shape) / 10, a.dtype), abstract)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, zeros)
    kinds = set()
    for (path, u), p in zip(jax.tree.leaves_with_path(updates), jax.tree.leaves(params)):
        kind = _kind(path)
        kinds.add(kind)
        decays = {"embedding": "embeddings" not in exclude, "norm": "norms" not in exclude}.get(kind, True)
        want = -0.5 * np.asarray(p) if decays else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert kinds == {"embedding", "norm", "weight"}


def test_scanned_layers_train_step_equals_unrolled():
    """A whole train step (grads, AdamW, router-bias update) with scan over layers gives the same
    loss, gradient norm and updated parameters as the unrolled model holding the same weights.
    Tolerance 1e-5 relative: the two programs order float32 reductions differently."""
    cfg_u = preset("tiny", vocab_size=VOCAB)  # 4 layers: one scanned group of 4
    gu, su, txu = make_state(cfg_u)
    gs, ss, txs = make_state(cfg_u, rt=SCAN)
    # Same weights: unrolled layer i is scan group 0, block i (the tiny preset's period is 4).
    flat_u = dict(nnx.to_flat_state(su.params))
    stacked = {p: v.replace(flat_u[p][...][None] if p[0] == "groups" else flat_u[p][...])
               for p, v in nnx.to_flat_state(ss.params)}
    ss = ss.replace(params=nnx.from_flat_state(stacked))
    batch = make_batch()
    # LLVM optimisation off: half the compile time for two programs run once each.
    opts = {"xla_backend_optimization_level": 0}
    step_u = jax.jit(make_train_step(gu, txu, StepConfig(NUM_SOURCES, BAL))).lower(su, batch).compile(opts)
    step_s = jax.jit(make_train_step(gs, txs, StepConfig(NUM_SOURCES, BAL))).lower(ss, batch).compile(opts)
    nu, mu = step_u(su, batch)
    ns, ms = step_s(ss, batch)
    np.testing.assert_allclose(float(ms["loss"]), float(mu["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(ms["grad_norm"]), float(mu["grad_norm"]), rtol=1e-5)
    scanned = dict(nnx.to_flat_state(ns.params))
    for p, v in nnx.to_flat_state(nu.params):
        got = np.asarray(scanned[p][...])
        np.testing.assert_allclose(got[0] if p[0] == "groups" else got, np.asarray(v[...]),
                                   rtol=1e-5, atol=1e-7, err_msg=str(p))
    bias_u = [np.asarray(v[...]) for _, v in nnx.to_flat_state(nu.extra)]
    bias_s = [np.asarray(v[...])[0] for _, v in nnx.to_flat_state(ns.extra)]
    assert any(np.any(b != 0) for b in bias_u)  # the balancing update really ran
    for a, b in zip(bias_s, bias_u):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
