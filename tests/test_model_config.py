"""ModelConfig presets and derived layouts; parameter counts and FLOPs (llama4_jax/model/flops.py).

Scout and Maverick are checked shape-only (`store.state_shapes`, nothing allocated) against the
published sizes and against the published HF config.json values.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama4_jax.convert.hf import config_from_hf, config_to_hf
from llama4_jax.model import store
from llama4_jax.model.config import ModelConfig, MoEConfig, preset
from llama4_jax.model.flops import flops_per_token, param_counts

REPO = Path(__file__).resolve().parent.parent
# Published: Scout 109B total / 17B active, Maverick 400B total / 17B active. The totals include
# the vision encoder (< 1B), so the text-only count may sit slightly below.
PUBLISHED = {"scout": (109e9, 17e9), "maverick": (400e9, 17e9)}


@functools.lru_cache(maxsize=None)
def brute_force_counts(cfg: ModelConfig) -> tuple[int, int]:
    """Sum every variable in `store.state_shapes` except the MoE router bias (state, not a
    parameter); routed experts count k/E as active."""
    total = active = 0.0
    for name, s in store.state_shapes(cfg).items():
        if name.endswith(ROUTER_BIAS):
            continue
        n = math.prod(s.shape)
        total += n
        active += n * cfg.moe.top_k / cfg.moe.num_experts if ".ffn.experts." in name else n
    return int(total), int(round(active))


ROUTER_BIAS = ".ffn.bias"


def test_router_bias_is_the_only_non_parameter():
    model = store.abstract_model(preset("tiny"))
    others = {store.flat_name(p) for p, v in nnx.state(model).flat_state() if not isinstance(v, nnx.Param)}
    assert others and all(n.endswith(ROUTER_BIAS) for n in others)
    assert len(others) == len(preset("tiny").moe_layers)


# --- presets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "bench_cpu"])
def test_small_presets_build_with_the_counted_parameters(name, random_flat):
    cfg = preset(name)
    model = store.model_from_flat(cfg, random_flat(cfg, std=0.02))
    n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.state(model, nnx.Param).flat_state())
    assert n == param_counts(cfg)[0]
    if name == "tiny":  # one real forward pass on the smallest preset
        ids = np.arange(2 * 40).reshape(2, 40) % cfg.vocab_size
        logits = nnx.jit(lambda m, x: m(x))(model, ids)
        assert logits.shape == (2, 40, cfg.vocab_size) and logits.dtype == jnp.float32
        logits = np.asarray(logits)
        assert np.all(np.isfinite(logits)) and logits.std() > 0


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_large_presets_match_published_sizes(name):
    cfg = preset(name)
    total, active = brute_force_counts(cfg)  # shape-only
    want_total, want_active = PUBLISHED[name]
    assert abs(total / want_total - 1) <= 0.02, f"{name}: {total / 1e9:.2f}B total"
    assert abs(active / want_active - 1) <= 0.02, f"{name}: {active / 1e9:.2f}B active"
    assert total <= want_total * 1.005  # text-only: not above the published (text + vision) figure


def _published_text_config(name: str) -> dict:
    """text_config of meta-llama/Llama-4-{Scout-17B-16E, Maverick-17B-128E}/config.json (the
    architecture fields), wrapped as the Llama4ForConditionalGeneration file is."""
    common = dict(model_type="llama4_text", attention_bias=False, attention_chunk_size=8192, attn_scale=0.1,
                  attn_temperature_tuning=True, floor_scale=8192, head_dim=128, hidden_act="silu",
                  hidden_size=5120, initializer_range=0.02, intermediate_size=8192, intermediate_size_mlp=16384,
                  no_rope_layers=[], num_attention_heads=40, num_experts_per_tok=1, num_hidden_layers=48,
                  num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                  vocab_size=202048)
    if name == "scout":
        tc = dict(common, interleave_moe_layer_step=1, moe_layers=list(range(48)), num_local_experts=16,
                  max_position_embeddings=10485760, use_qk_norm=True,
                  rope_scaling={"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    else:
        tc = dict(common, interleave_moe_layer_step=2, moe_layers=list(range(1, 48, 2)), num_local_experts=128,
                  max_position_embeddings=1048576, use_qk_norm=False, rope_scaling=None)
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": tc}


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_large_presets_match_the_published_config_json(name):
    cfg = preset(name)
    hf_cfg, prefix = config_from_hf(_published_text_config(name))
    assert prefix == "language_model."
    assert config_to_hf(cfg) == config_to_hf(hf_cfg)
    assert cfg.no_rope_layers == tuple(int((i + 1) % 4 != 0) for i in range(48))  # NoPE every 4th


# --- derived layouts == HF Llama4TextConfig defaults -------------------------------------------
@pytest.mark.parametrize("layers,moe_step,nope_interval", [(4, 1, 4), (6, 2, 4), (7, 3, 2), (48, 2, 4), (5, 1, 3),
                                                           (3, 4, 1)])
def test_derived_layouts_match_hf_defaults(layers, moe_step, nope_interval):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Llama4TextConfig(num_hidden_layers=layers, interleave_moe_layer_step=moe_step,
                                       no_rope_layer_interval=nope_interval)
    ours = ModelConfig(num_layers=layers, interleave_moe_layer_step=moe_step, no_rope_layer_interval=nope_interval)
    assert ours.moe_layers == tuple(hf.moe_layers)
    assert ours.no_rope_layers == tuple(hf.no_rope_layers)
    kinds = ["chunked_attention" if ours.is_chunked(i) else "full_attention" for i in range(layers)]
    assert kinds == list(hf.layer_types)
    # Re-derived, not copied, when the depth changes.
    other = ours.replace(num_layers=layers + 2)
    hf2 = transformers.Llama4TextConfig(num_hidden_layers=layers + 2, interleave_moe_layer_step=moe_step,
                                        no_rope_layer_interval=nope_interval)
    assert (other.moe_layers, other.no_rope_layers) == (tuple(hf2.moe_layers), tuple(hf2.no_rope_layers))


@pytest.mark.parametrize("moe_layers", [None, [], [0, 2]])
def test_hf_moe_layers_field_is_honoured(moe_layers):
    """HF keeps an explicit moe_layers, even [] (all dense); null derives from the interval."""
    transformers = pytest.importorskip("transformers")
    kw = dict(num_hidden_layers=4, interleave_moe_layer_step=2, moe_layers=moe_layers)
    hf = transformers.Llama4TextConfig(**kw)
    ours, _ = config_from_hf(dict(model_type="llama4_text", **kw))
    assert ours.moe_layers == tuple(hf.moe_layers)
    assert config_from_hf(config_to_hf(ours))[0].moe_layers == ours.moe_layers


# --- parameter counts and FLOPs ----------------------------------------------------------------
COUNT_CONFIGS = {
    "tiny": preset("tiny"),
    "bench_cpu": preset("bench_cpu"),
    "scout": preset("scout"),
    "maverick": preset("maverick"),
    "tied_top2_no_shared": preset("tiny", tie_word_embeddings=True,
                                  moe=MoEConfig(num_experts=4, top_k=2, expert_ff=64, shared_expert=False)),
    "explicit_moe_layers": preset("tiny", moe_layers=(0, 3)),
    "all_dense": preset("tiny", interleave_moe_layer_step=0),
}


@pytest.mark.parametrize("name", list(COUNT_CONFIGS))
def test_param_counts_equal_brute_force(name):
    cfg = COUNT_CONFIGS[name]
    total, active = param_counts(cfg)
    assert (total, active) == brute_force_counts(cfg)
    assert active <= total
    assert (active < total) == bool(cfg.moe_layers and cfg.moe.top_k < cfg.moe.num_experts)


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=3,
                      dense_ff=5, moe=MoEConfig(num_experts=3, top_k=1, expert_ff=2), moe_layers=(1,),
                      no_rope_layers=(1, 0), attention_chunk_size=4)
    # layer 0, dense, RoPE/chunked: q,o 4·2·3 each, k,v 4·1·3 each = 72; 2 norms 8; MLP 3·4·5 = 60 → 140
    # layer 1, MoE, NoPE/global:    attention 72; norms 8; experts 3·3·4·2 = 72; shared 3·4·2 = 24;
    #                               router 4·3 = 12 → 188
    # embed 40 + final norm 4 + lm head 40 → total 412; active drops 2 of 3 experts (48) → 364
    assert param_counts(cfg) == (412, 364)
    # matmul params: 364 - embed 40 - norms 20 = 304 → 6·304 = 1824
    # attention at L = 6: layer 0 keys min(6, 4)/2 = 2 → 12·2·3·2 = 144; layer 1 keys 6/2 = 3 → 216
    assert flops_per_token(cfg, 6) == 1824 + 144 + 216
    # Tied: the table is the lm head, a matmul again (total 372, active 324, matmul 324 - 20 = 304).
    tied = cfg.replace(tie_word_embeddings=True)
    assert param_counts(tied) == (372, 324)
    assert flops_per_token(tied, 6) == 1824 + 144 + 216


def test_flops_attention_term_grows_linearly_only_on_global_layers():
    cfg = preset("scout")
    n_global = sum(not cfg.is_chunked(i) for i in range(cfg.num_layers))
    per_key = 12 * cfg.num_heads * cfg.head_dim
    # Past the chunk, doubling L adds keys only on the global (NoPE) layers: L/2 more each.
    L = 16384
    assert flops_per_token(cfg, 2 * L) - flops_per_token(cfg, L) == pytest.approx(n_global * per_key * L / 2)
    assert n_global == 12


def test_param_count_tool_prints_the_library_numbers():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "param_count.py"), "bench_cpu", "--seq-len", "512"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = preset("bench_cpu")
    total, active = param_counts(cfg)
    assert f"total params      {total:,} " in proc.stdout
    assert f"active params     {active:,} " in proc.stdout
    assert f"{flops_per_token(cfg, 512):.4g}" in proc.stdout and "seq_len 512" in proc.stdout
