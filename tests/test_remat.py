"""Remat policies by name (model/remat.py): every policy computes the loss and gradients of
`none`, and the compiled temporaries are ordered full < minimal < none with real gaps.

The shape is chosen so that activations, not weights or logits, fill the temporaries: 8 layers
of hidden 64 over 2 × 512 tokens with chunked attention (chunk 32, so no L×L score matrix
swamps one layer's transient), a 64-token vocabulary (the [B, L, V] logits stay small), and
scanned layers (one compiled group of 4 blocks, run twice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax.config.schema import Runtime
from llama4_jax.errors import ConfigError
from llama4_jax.model.config import RuntimeConfig, preset
from llama4_jax.model.remat import REMAT_POLICIES, check_backend, policy_name
from llama4_jax.model.store import runtime_from_dict
from llama4_jax.model.transformer import Llama4

CFG = preset("tiny", vocab_size=64, num_layers=8, hidden_size=64, attention_chunk_size=32)
B, L = 2, 512
CPU_POLICIES = [p for p in REMAT_POLICIES if p != "offload"]
BY_KIND = (("chunked", "full"), ("global", "minimal"))  # per block kind: 6 chunked + 2 global blocks


def _loss(graphdef, params, ids_BxL, targets_BxL):
    logits_BxLxV = nnx.merge(graphdef, params)(ids_BxL)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, -1)
    gold_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], -1)[..., 0]
    return jnp.mean(lse_BxL - gold_BxL)


@pytest.fixture(scope="module")
def compiled():
    """policy → (loss, grads, temp bytes), all from one compile per policy on the same weights."""
    params = nnx.state(Llama4(CFG, RuntimeConfig(scan_layers=True), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids, targets = (jnp.asarray(rng.integers(0, CFG.vocab_size, (B, L)), jnp.int32) for _ in range(2))
    out = {}
    for name in [*CPU_POLICIES, BY_KIND]:
        graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: Llama4(CFG, RuntimeConfig(remat=name, scan_layers=True), rngs=nnx.Rngs(0))))
        fn = jax.jit(jax.value_and_grad(lambda p, i, t, g=graphdef: _loss(g, p, i, t)))
        exe = fn.lower(params, ids, targets).compile()
        loss, grads = exe(params, ids, targets)
        out[name] = (float(loss), jax.tree.leaves(jax.device_get(grads)), exe.memory_analysis().temp_size_in_bytes)
    return out


@pytest.mark.parametrize("name", [p for p in CPU_POLICIES if p != "none"] + [BY_KIND])
def test_policy_gives_the_loss_and_gradients_of_none(compiled, name):
    loss0, grads0, _ = compiled["none"]
    loss, grads, _ = compiled[name]
    assert abs(loss - loss0) <= 1e-6
    assert len(grads) == len(grads0)
    for g, g0 in zip(grads, grads0):
        # max |Δ| ≤ 1e-6 · max |g0| per tensor: the same sums, possibly fused in another order
        assert float(np.abs(g - g0).max()) <= 1e-6 * float(np.abs(g0).max())


def test_compiled_temporaries_are_ordered_full_minimal_none(compiled):
    temp = {name: compiled[name][2] for name in ("full", "minimal", "none")}
    assert temp["full"] <= 0.9 * temp["minimal"], temp
    assert temp["minimal"] <= 0.9 * temp["none"], temp


def test_a_policy_per_block_kind_lies_between_its_policies(compiled):
    """Chunked blocks `full`, global blocks `minimal` (inside one scanned group of 4 blocks): the
    temporaries lie strictly between all-`full` and all-`minimal`."""
    temp = {name: compiled[name][2] for name in ("full", BY_KIND, "minimal")}
    assert temp["full"] < temp[BY_KIND] < temp["minimal"], temp


def test_per_kind_specs_read_from_yaml_and_runtime_json():
    assert Runtime(remat={"global": "minimal", "chunked": "full"}).remat == BY_KIND
    assert runtime_from_dict({"remat": [["global", "minimal"], ["chunked", "full"]]}).remat == BY_KIND
    assert RuntimeConfig(remat={"moe": "save_moe"}).remat == (("moe", "save_moe"),)
    with pytest.raises(ValueError, match="one pair, not both"):
        RuntimeConfig(remat={"moe": "full", "global": "none"})
    with pytest.raises(ValueError, match="unknown remat policy"):
        RuntimeConfig(remat={"moe": "most"})
    with pytest.raises(ConfigError, match="offload"):
        check_backend((("dense", "none"), ("moe", "offload")), "cpu")


def test_offload_is_refused_on_cpu_in_one_line():
    with pytest.raises(ConfigError, match="offload needs host-memory offloading, which the cpu backend") as err:
        check_backend("offload", "cpu")
    assert "\n" not in str(err.value)
    check_backend("offload", "gpu")  # allowed where pinned host memory exists
    if jax.default_backend() == "cpu":  # the model refuses it when it traces, too
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: Llama4(preset("tiny"), RuntimeConfig(remat="offload"), rngs=nnx.Rngs(0))))
        with pytest.raises(ConfigError, match="cpu backend"):
            jax.eval_shape(jax.grad(lambda st: nnx.merge(graphdef, st)(jnp.zeros((1, 8), jnp.int32)).sum()), state)


def test_booleans_of_older_files_and_yamls_read_as_full_or_none():
    assert policy_name(True) == "full" and policy_name(False) == "none"
    assert RuntimeConfig(remat=True).remat == "full" and RuntimeConfig().remat == "none"
    assert runtime_from_dict({"remat": True}).remat == "full"  # runtime.json / meta of older runs
    assert runtime_from_dict({"remat": False}).remat == "none"
    assert Runtime(remat=True).remat == "full" and Runtime(remat="save_moe").remat == "save_moe"
    with pytest.raises(ValueError, match="unknown remat policy"):
        RuntimeConfig(remat="some")
