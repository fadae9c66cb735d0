"""HF config.json details beyond the weights (issue 13): missing fields mean transformers'
defaults, `attn_temperature_tuning` given as an int, explicit `layer_types`, and the special-token
ids + generation config carried from-hf → our checkpoints (and training runs) → to-hf.

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
from llama4_jax.model.config import ModelConfig, preset
from llama4_jax.model.special_tokens import SpecialTokens

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
    legacy = dict(base, layer_types=["chunked_attention"] * 3 + ["attention"])  # HF renames it full_attention
    assert config_from_hf(legacy)[0] == config_from_hf(base)[0]


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


# --- 3. special tokens and the generation config --------------------------------------------------
SCOUT_IDS = {"bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018}
SCOUT_GEN = {"bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018,
             "do_sample": True, "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.51.0"}


@pytest.fixture(scope="module")
def scout_ids_dir(make_hf):
    """Scout's vocabulary and special ids on a model of hidden size 16."""
    model, hf_dir = make_hf("scout_ids", seed=8, vocab_size=202048, hidden_size=16, intermediate_size=8,
                            intermediate_size_mlp=8, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, num_local_experts=2, **SCOUT_IDS)
    (hf_dir / "generation_config.json").write_text(json.dumps(SCOUT_GEN, indent=1))
    return hf_dir


def test_special_tokens_round_trip_hf_to_ours_to_hf(scout_ids_dir, tmp_path):
    from_hf(scout_ids_dir, tmp_path / "ours")
    assert store.load_special_tokens(tmp_path / "ours") == SpecialTokens.from_dict(
        {**SCOUT_IDS, "generation_config": SCOUT_GEN})
    to_hf(tmp_path / "ours", tmp_path / "hf")
    src = json.loads((scout_ids_dir / "config.json").read_text())
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: out[k] for k in SCOUT_IDS} == {k: src[k] for k in SCOUT_IDS} == SCOUT_IDS
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == SCOUT_GEN
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (200000, [200001, 200007, 200008], 200018)
    assert (gen.do_sample, gen.temperature, gen.top_p) == (True, 0.6, 0.9)
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (200000, [200001, 200007, 200008], 200018)


def test_generation_config_built_from_the_ids_when_the_source_has_none(scout_ids_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        (src / f).symlink_to(scout_ids_dir / f)
    from_hf(src, tmp_path / "ours")
    to_hf(tmp_path / "ours", tmp_path / "hf")
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (200000, [200001, 200007, 200008], 200018)


def test_unknown_ids_are_written_as_null_not_guessed(tmp_path, random_flat):
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                      dense_ff=24)
    store.save_params(tmp_path / "ckpt", cfg, random_flat(cfg))
    to_hf(tmp_path / "ckpt", tmp_path / "hf")
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (None, None, None)


# --- 3b. ... through a training run --------------------------------------------------------------
@pytest.fixture(scope="module")
def xla_cache(request):
    from test_checkpoint_resume import use_xla_cache

    undo = use_xla_cache(request.config)
    yield
    undo()


def _train_one_step(root: Path, capsys, **top) -> Path:
    from test_checkpoint_resume import experiment, train

    exp = experiment(root, **top)
    rc, _, err = train(exp, root / "run", stop=1, capsys=capsys)
    assert rc == 0, err
    return root / "run"


def test_training_run_from_scratch_records_the_tokenizer_ids(xla_cache, tmp_path, capsys):
    run = _train_one_step(tmp_path, capsys)  # the byte tokenizer: pad 256, bos 257, eos 258
    assert store.load_special_tokens(run) == SpecialTokens(257, 258, 256)
    assert cli.main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (257, 258, 256)


def test_training_run_from_a_converted_checkpoint_carries_its_tokens(xla_cache, tmp_path, capsys, random_flat):
    cfg = preset("tiny", vocab_size=264)  # the experiment's model
    tokens = SpecialTokens(260, (261, 262), 263, {"eos_token_id": [261, 262], "temperature": 0.6})
    store.save_params(tmp_path / "ours", cfg, random_flat(cfg), tokens=tokens)
    run = _train_one_step(tmp_path, capsys, init_from=str(tmp_path / "ours"))
    assert store.load_special_tokens(run) == tokens
    assert cli.main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    out = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (260, [261, 262], 263)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.eos_token_id, gen.temperature) == ([261, 262], 0.6)
