"""Routing split by data source: the router's per-row expert load, its fold into sources in the
train step (token-weighted), and what reaches the logs (model layer indices, one scalar per
expert, a source × expert list and heatmap)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax.model import moe as moe_lib
from llama4_jax.model.config import MoEConfig
from llama4_jax.train.heatmap import heatmap
from llama4_jax.train.routing_metrics import moe_log
from llama4_jax.train.step import load_by_source


@pytest.mark.parametrize("top_k", [1, 2])
def test_row_load_is_each_rows_share_of_copies(top_k):
    B, L, E = 3, 5, 4
    cfg = MoEConfig(num_experts=E, top_k=top_k)
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (B * L, E)), np.float32)
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    m = jax.jit(lambda lg, i: moe_lib.router_metrics(lg, i, cfg, L, 0.0))(jnp.asarray(logits), jnp.asarray(idx))
    want = np.zeros((B, E))
    for t in range(B * L):
        for e in idx[t]:
            want[t // L, e] += 1 / (L * top_k)
    np.testing.assert_allclose(np.asarray(m["row_load"]), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["row_load"]).mean(0), np.asarray(m["load"]), rtol=1e-6)
    assert set(m) == set(moe_lib.METRIC_KEYS)


def test_load_by_source_weights_rows_by_their_loss_tokens():
    rng = np.random.default_rng(0)
    N, B, E, S, L = 2, 5, 4, 3, 6
    row_load = rng.dirichlet(np.ones(E), size=(N, B)).astype(np.float32)
    mask = (rng.random((B, L)) > 0.3).astype(np.float32)
    mask[4] = 0.0  # a row of padding says nothing
    sources = np.array([0, 2, 0, 0, 1], np.int32)  # source 1 only has the padding row
    got = np.asarray(load_by_source(jnp.asarray(row_load), {"loss_mask": mask, "source_ids": sources}, S))
    assert got.shape == (N, S, E)
    toks = mask.sum(1)
    for s in range(S):
        rows = np.flatnonzero(sources == s)
        if toks[rows].sum() == 0:
            np.testing.assert_array_equal(got[:, s], 0.0)
            continue
        want = (row_load[:, rows] * toks[rows][None, :, None]).sum(1) / toks[rows].sum()
        np.testing.assert_allclose(got[:, s], want, rtol=1e-6)
        np.testing.assert_allclose(got[:, s].sum(-1), 1.0, rtol=1e-6)


def test_moe_log_names_model_layers_and_experts():
    """Row r of the stacked metrics is MoE layer cfg.moe_layers[r]; sources without tokens are left out."""
    load = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
    by_src = np.zeros((2, 3, 4), np.float32)
    by_src[:, 0] = load
    by_src[:, 2] = load[::-1]
    m = {"loss": 1.0, "moe/load": load, "moe/entropy": np.array([1.0, 2.0]), "moe/load_by_source": by_src}
    out = moe_log(m, (1, 3), ("prose", "code", "rare"), np.array([10.0, 0.0, 5.0]))
    assert out.scalars["moe/layer1/entropy"] == 1.0 and out.scalars["moe/layer3/entropy"] == 2.0
    assert out.scalars["moe/layer3/load/expert3"] == pytest.approx(0.4)
    assert [k for k in out.scalars if "layer0" in k or "layer2" in k] == []
    assert out.scalars["moe/layer1/load_by_source/prose"] == pytest.approx([0.5, 0.25, 0.25, 0.0])
    assert out.scalars["moe/layer3/load_by_source/rare"] == pytest.approx([0.5, 0.25, 0.25, 0.0])
    assert "moe/layer1/load_by_source/code" not in out.scalars
    assert set(out.histograms) == {"moe/layer1/load", "moe/layer3/load"}
    assert set(out.images) == {"moe/layer1/load_by_source", "moe/layer3/load_by_source"}


def test_heatmap_shades_each_cell_by_its_value():
    values = np.array([[0.0, 1.0], [0.5, 0.0]])
    img = heatmap(values, ["a", "bb"])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    colours = {tuple(int(c) for c in px) for px in img.reshape(-1, 3)}
    assert (8, 48, 107) in colours  # the 1.0 cell: the darkest shade
    assert (131, 151, 181) in colours  # the 0.5 cell: half way from white
