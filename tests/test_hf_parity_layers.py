"""Layer-by-layer parity with Hugging Face `Llama4ForCausalLM` (eager attention, float32), so a
mismatch points at its layer instead of at the logits (issue 12 item 7).

One forward of the full HF model records, with forward hooks, the input and output of each
submodule; our corresponding module gets the same input. Our params come through the real
converter (`read_hf_params` → `model_from_flat`). The model has two layers: layer 0 is a RoPE
layer with chunked attention (chunk 4 < L = 11, the blocked path) and QK-norm, with a dense MLP;
layer 1 is a NoPE layer with global attention and temperature tuning (floor_scale 2, so the scale
changes along the row), with the MoE block (router + routed experts + shared expert), top-1 and
top-2.

Tolerance: max |Δ| ≤ 1e-5 for every submodule (embedding lookup, RMSNorms, attention, dense MLP,
MoE block, router logits, final norm, lm head), never relaxed.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax.convert.hf import read_hf_params
from llama4_jax.model import store

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
B, L, CHUNK = 2, 11, 4
HF = dict(vocab_size=96, hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
          interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=CHUNK, use_qk_norm=True,
          attn_temperature_tuning=True, floor_scale=2, attn_scale=0.5,
          rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
ROPE_LAYER, NOPE_LAYER = 0, 1  # layer 0: dense MLP; layer 1: MoE


def record(hf_model, ids: np.ndarray) -> dict[str, tuple]:
    """Run HF once; → submodule name → (its first input, its output), as float64 numpy."""
    model = hf_model.model
    watched = {"embed": model.embed_tokens, "norm": model.norm, "head": hf_model.lm_head}
    for i, layer in enumerate(model.layers):
        watched |= {f"attn_norm.{i}": layer.input_layernorm, f"attn.{i}": layer.self_attn,
                    f"ffn_norm.{i}": layer.post_attention_layernorm, f"ffn.{i}": layer.feed_forward}
    seen, handles = {}, []

    def hook(name):
        def grab(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]  # the decoder layer passes attention inputs by name
            seen[name] = (x.detach().numpy(), out)
        return grab

    for name, module in watched.items():
        handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            hf_model(torch.as_tensor(ids, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return seen


def as_np(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(as_np(a) - as_np(b))))


@pytest.fixture(scope="module", params=[1, 2], ids=["top1", "top2"])
def pair(request, make_hf):
    hf_model, hf_dir = make_hf(f"layers_top{request.param}", seed=10 + request.param, num_experts_per_tok=request.param,
                               **HF)
    cfg, flat = read_hf_params(hf_dir)
    ours = store.model_from_flat(cfg, flat)
    ids = np.random.default_rng(5).integers(0, HF["vocab_size"], (B, L))
    seen = record(hf_model, ids)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return SimpleNamespace(hf=hf_model, ours=ours, ids=ids, seen=seen, pos=pos, seg=jnp.zeros((B, L), jnp.int32),
                           blocks=ours.groups.blocks, top_k=request.param)


def test_the_layers_are_the_kinds_claimed(pair):
    rope, nope = pair.blocks[ROPE_LAYER], pair.blocks[NOPE_LAYER]
    assert (rope.attn.use_rope, rope.attn.chunk, rope.attn.qk_norm, rope.attn.temperature) == (True, CHUNK, True, False)
    assert (nope.attn.use_rope, nope.attn.chunk, nope.attn.qk_norm, nope.attn.temperature) == (False, None, False, True)
    assert (rope.is_moe, nope.is_moe) == (False, True)
    assert pair.ours.cfg.moe.top_k == pair.top_k
    hf_layers = pair.hf.model.layers
    assert hasattr(hf_layers[ROPE_LAYER].self_attn, "qk_norm") and not hf_layers[NOPE_LAYER].self_attn.use_rope
    assert L > 2 * CHUNK  # our chunked layer takes the blocked O(L·C) path


def test_embedding_lookup(pair):
    _, out = pair.seen["embed"]
    got = jnp.take(pair.ours.embed[...], jnp.asarray(pair.ids), axis=0)
    assert max_diff(got, out) <= TOL


@pytest.mark.parametrize("name", ["attn_norm.0", "ffn_norm.0", "attn_norm.1", "ffn_norm.1"])
def test_block_rms_norms(pair, name):
    kind, i = name.split(".")
    x, out = pair.seen[name]
    got = getattr(pair.blocks[int(i)], kind)(jnp.asarray(x, jnp.float32))
    assert max_diff(got, out) <= TOL


@pytest.mark.parametrize("layer", [ROPE_LAYER, NOPE_LAYER], ids=["chunked_rope_qknorm", "global_nope_temperature"])
def test_attention_layer(pair, layer):
    x, (out, _) = pair.seen[f"attn.{layer}"]
    assert np.abs(out.numpy()).max() > 0.5  # random weights: far from zero, the check has teeth
    got = pair.blocks[layer].attn(jnp.asarray(x, jnp.float32), pair.pos, pair.seg)
    d = max_diff(got, out)
    print(f"attention layer {layer}: max |Δ| = {d:.2e}")
    assert d <= TOL


def test_dense_mlp(pair):
    x, out = pair.seen[f"ffn.{ROPE_LAYER}"]
    got = pair.blocks[ROPE_LAYER].ffn(jnp.asarray(x, jnp.float32))
    d = max_diff(got, out)
    print(f"dense MLP: max |Δ| = {d:.2e}")
    assert d <= TOL


def test_moe_block(pair):
    """Router logits, then the whole block: routed experts scaled on the input + shared expert."""
    x, (out_TxD, logits_TxE) = pair.seen[f"ffn.{NOPE_LAYER}"]
    moe = pair.blocks[NOPE_LAYER].ffn
    x_BxLxD = jnp.asarray(x, jnp.float32)
    assert max_diff(x_BxLxD.reshape(B * L, -1) @ moe.router[...], logits_TxE) <= TOL
    y_BxLxD, _ = moe(x_BxLxD)
    d = max_diff(y_BxLxD.reshape(B * L, -1), out_TxD)
    print(f"MoE top-{pair.top_k}: max |Δ| = {d:.2e}")
    assert d <= TOL


def test_final_norm_and_head(pair):
    x, out = pair.seen["norm"]
    h = pair.ours.norm(jnp.asarray(x, jnp.float32))
    assert max_diff(h, out) <= TOL
    h_in, logits = pair.seen["head"]
    got = pair.ours.logits(jnp.asarray(h_in, jnp.float32))
    d = max_diff(got, logits)
    print(f"head: max |Δ| = {d:.2e} (|logits| ≤ {np.abs(logits.numpy()).max():.1f})")
    assert d <= TOL
