"""HF config.json details beyond the weights (issue 13): missing fields mean transformers'
defaults, `attn_temperature_tuning` given as an int, explicit `layer_types`.

Logits are compared with transformers' `Llama4ForCausalLM` (eager, float32) at max |Δ| ≤ 1e-4,
the tolerance of tests/test_hf_parity.py, never relaxed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama4_jax
from llama4_jax import cli
from llama4_jax.convert.hf import HF_TEXT_DEFAULTS, config_from_hf, config_to_hf, from_hf, to_hf
from llama4_jax.model import store
from llama4_jax.model.config import ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def our_logits(hf_dir: Path, ids: np.ndarray) -> np.ndarray:
    ours = llama4_jax.load_hf(hf_dir)
    return np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids, jnp.int32)))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def edit_config(hf_dir: Path, edit) -> dict:
    path = hf_dir / "config.json"
    raw = json.loads(path.read_text())
    raw = edit(raw) or raw
    path.write_text(json.dumps(raw, indent=1))
    return raw


def load_hf_model(hf_dir: Path):
    return transformers.Llama4ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()


# --- 1. missing fields are transformers' defaults ---------------------------------------------------
def test_default_table_is_transformers_llama4_text_config():
    """HF_TEXT_DEFAULTS has every Llama4TextConfig field, with transformers' default."""
    fields = {f.name: f.default for f in dataclasses.fields(transformers.Llama4TextConfig)
              if f.name in transformers.Llama4TextConfig.__annotations__}
    assert HF_TEXT_DEFAULTS == fields


# Fields our config mirrors (config_to_hf's keys, minus the fixed identity ones and the ids).
MIRRORED = sorted(set(config_to_hf(ModelConfig())) - {"architectures", "model_type", "torch_dtype", "hidden_act",
                                                       "attention_bias", "bos_token_id", "eos_token_id",
                                                       "pad_token_id"})


@pytest.mark.parametrize("given", [{}, {"moe_layers": None, "attention_chunk_size": None, "num_hidden_layers": 6,
                                        "interleave_moe_layer_step": 3, "no_rope_layer_interval": 2}],
                         ids=["all-missing", "nulls-and-intervals"])
def test_missing_config_fields_read_as_transformers_reads_them(given):
    ours, _ = config_from_hf({"model_type": "llama4_text", **given})
    hf = transformers.Llama4TextConfig.from_dict({"model_type": "llama4_text", **given})
    mine = config_to_hf(ours)
    for key in MIRRORED:
        assert mine[key] == getattr(hf, key), key


@pytest.fixture(scope="module")
def sparse_config_dir(make_hf):
    """A tiny model saved, then config.json cut down to the sizes that keep it tiny: every other
    field (head_dim=128, num_key_value_heads=8, 40 heads, RoPE, chunking, QK-norm, ...) is a default."""
    keep = dict(vocab_size=96, hidden_size=32, intermediate_size=16, intermediate_size_mlp=24, num_hidden_layers=4,
                num_local_experts=2)
    model, hf_dir = make_hf("sparse_config", seed=5, **keep)
    edit_config(hf_dir, lambda raw: {"architectures": raw["architectures"], "model_type": raw["model_type"], **keep})
    return model, hf_dir


def test_config_without_head_dim_or_kv_heads_matches_hf(sparse_config_dir):
    model, hf_dir = sparse_config_dir
    raw = json.loads((hf_dir / "config.json").read_text())
    assert "head_dim" not in raw and "num_key_value_heads" not in raw and "num_attention_heads" not in raw
    ids = np.random.default_rng(2).integers(0, 96, (2, 11))
    ref = hf_logits(load_hf_model(hf_dir), ids)  # transformers reading the same cut-down file
    np.testing.assert_array_equal(ref, hf_logits(model, ids))
    assert np.abs(ref).max() > 1.0
    assert max_diff(our_logits(hf_dir, ids), ref) <= TOL


# --- 2. attn_temperature_tuning as an int -------------------------------------------------------
def test_int_temperature_tuning_converts_and_exports_a_bool(make_hf, tmp_path):
    """Released Scout/Maverick config.json files say `"attn_temperature_tuning": 4`."""
    model, hf_dir = make_hf("int_temperature", seed=6, vocab_size=96, hidden_size=32, intermediate_size=16,
                            intermediate_size_mlp=24, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, num_local_experts=2, no_rope_layers=[1, 0],
                            floor_scale=2, attn_scale=0.5)
    edit_config(hf_dir, lambda raw: raw.update(attn_temperature_tuning=4))
    ids = np.random.default_rng(3).integers(0, 96, (2, 9))
    ref = hf_logits(model, ids)
    assert max_diff(our_logits(hf_dir, ids), ref) <= TOL
    from_hf(hf_dir, tmp_path / "ours")
    to_hf(tmp_path / "ours", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attn_temperature_tuning"] is True
    assert max_diff(hf_logits(load_hf_model(tmp_path / "hf"), ids), ref) <= TOL


# --- 4. explicit layer_types ----------------------------------------------------------------------
LAYER_TYPES_HF = dict(vocab_size=96, hidden_size=32, intermediate_size=16, intermediate_size_mlp=24,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      num_local_experts=2, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0],
                      attention_chunk_size=4, floor_scale=2, attn_scale=0.5)


@pytest.mark.parametrize("types", [["full_attention"] * 4,
                                   ["chunked_attention", "full_attention", "chunked_attention", "chunked_attention"]],
                         ids=["all-full", "chunked-nope"])
def test_explicit_layer_types_match_hf(make_hf, tmp_path, types):
    """The mask follows layer_types, RoPE / QK-norm / temperature follow no_rope_layers: with
    all layers full, the RoPE layers see the whole row (L = 11 > 2·chunk, the blocked path's range);
    a chunked NoPE layer keeps temperature tuning."""
    model, hf_dir = make_hf("layer_types_" + types[1], seed=7, layer_types=types, **LAYER_TYPES_HF)
    assert list(model.config.layer_types) == types
    ids = np.random.default_rng(4).integers(0, 96, (2, 11))
    ref = hf_logits(model, ids)
    ours = llama4_jax.load_hf(hf_dir, scan_layers=True)
    assert [ours.cfg.is_chunked(i) for i in range(4)] == [t == "chunked_attention" for t in types]
    assert max_diff(np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids, jnp.int32))), ref) <= TOL
    assert max_diff(our_logits(hf_dir, ids), ref) <= TOL
    from_hf(hf_dir, tmp_path / "ours")
    to_hf(tmp_path / "ours", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_types"] == types
    assert max_diff(hf_logits(load_hf_model(tmp_path / "hf"), ids), ref) <= TOL


def test_derived_layer_types_are_not_stored():
    """A config.json that spells out the default pattern gives the same ModelConfig as one without,
    so init_from a converted checkpoint still matches an experiment that leaves it unset."""
    base = dict(model_type="llama4_text", num_hidden_layers=4, attention_chunk_size=8)
    spelled = dict(base, layer_types=["chunked_attention"] * 3 + ["full_attention"])
    assert config_from_hf(spelled)[0] == config_from_hf(base)[0]


@pytest.mark.parametrize("types,must_name", [(["full_attention"] * 3, "3 entries"),
                                             (["full_attention"] * 3 + ["sliding_attention"], "'sliding_attention'")],
                         ids=["wrong-length", "unknown-type"])
def test_bad_layer_types_is_a_one_line_user_error(tmp_path, capsys, random_flat, types, must_name):
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=8,
                      dense_ff=24, attention_chunk_size=8)
    store.save_params(tmp_path / "ckpt", cfg, random_flat(cfg))
    to_hf(tmp_path / "ckpt", tmp_path / "hf")
    edit_config(tmp_path / "hf", lambda raw: raw.update(layer_types=types))
    rc = cli.main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("llama4-jax: error: "), err
    for s in (str(tmp_path / "hf" / "config.json"), "layer_types", must_name):
        assert s in lines[0], (s, lines[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("types,match", [(("full_attention",) * 3, "layer_types has 3 entries"),
                                         (("full_attention",) * 3 + ("window",), "layer_types: unknown")])
def test_model_config_validates_layer_types(types, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(num_layers=4, layer_types=types)
