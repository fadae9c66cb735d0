"""Parity with Hugging Face `Llama4ForCausalLM` (eager attention, float32) and HF round trips.

Each case is a random tiny config; together they cover top-1/top-2 routing, GQA ratios 1/2/4,
MoE on every layer / every 2nd layer / an explicit `moe_layers`, NoPE layers at different
positions, QK-norm and temperature tuning on and off, llama3 and default RoPE, chunk sizes that
do and do not divide the sequence (blocked path L > 2C, plain masked path C < L ≤ 2C, L < C),
tied embeddings, legacy `rope_theta`/`rope_scaling` config.json, `Llama4ForConditionalGeneration`
keys and a two-shard safetensors index. Tolerance: max |Δlogits| ≤ 1e-4, never relaxed.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama4_jax
from llama4_jax.convert.hf import config_to_hf, from_hf, to_hf
from llama4_jax.model import store
from llama4_jax.model.config import ModelConfig, MoEConfig, RopeScaling, RuntimeConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402  (after the importorskip)

TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, head_dim=16,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)

CASES = {
    # Blocked chunked path with a ragged last block (21 = 2·8 + 5), NoPE at 1 and 3, top-2, GQA 2,
    # MoE every 2nd layer; the layer pattern repeats with period 2, so scan has 2 groups.
    "llama3_top2_gqa2": dict(
        hf=dict(BASE, num_hidden_layers=4, num_experts_per_tok=2, interleave_moe_layer_step=2,
                attention_chunk_size=8, no_rope_layers=[1, 0, 1, 0], floor_scale=4, attn_scale=0.5,
                rope_parameters=LLAMA3),
        batch=(2, 21)),
    # Blocked path, chunk divides L (18 = 3·6); NoPE first; QK-norm and temperature tuning off;
    # default RoPE; every layer MoE, top-1, GQA 1; tied embeddings; batch 3.
    "default_rope_top1_tied_gqa1": dict(
        hf=dict(BASE, num_hidden_layers=3, num_key_value_heads=4, num_experts_per_tok=1,
                interleave_moe_layer_step=1, attention_chunk_size=6, no_rope_layers=[0, 1, 1],
                use_qk_norm=False, attn_temperature_tuning=False, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        batch=(3, 18)),
    # Plain masked path with the chunk mask active (8 < 13 ≤ 16); GQA 4; explicit moe_layers;
    # default NoPE interval (layer 3); temperature tuning with floor_scale 2; legacy llama3 config.json.
    "legacy_llama3_gqa4_moe_layers": dict(
        hf=dict(BASE, hidden_size=48, head_dim=8, num_attention_heads=8, num_key_value_heads=2,
                num_hidden_layers=4, num_local_experts=3, num_experts_per_tok=2, moe_layers=[0, 3],
                attention_chunk_size=8, floor_scale=2, attn_scale=0.3, rope_parameters=LLAMA3),
        batch=(2, 13), legacy=True),
    # L < chunk; Llama4ForConditionalGeneration keys in a two-shard index; legacy default RoPE.
    "vlm_sharded_legacy_default_rope": dict(
        hf=dict(BASE, num_hidden_layers=2, num_experts_per_tok=1, num_local_experts=2, interleave_moe_layer_step=2,
                attention_chunk_size=8, no_rope_layers=[1, 0], floor_scale=2,
                rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
        batch=(2, 5), legacy=True, vlm=True, shards=2),
}


# --- rewriting a saved HF directory -----------------------------------------------------------
def to_legacy_rope(hf_dir: Path) -> None:
    """config.json in the pre-v5 style: top-level `rope_theta` / `rope_scaling`."""
    path = hf_dir / "config.json"
    raw = json.loads(path.read_text())
    rp = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rp.pop("rope_theta")
    raw["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    path.write_text(json.dumps(raw, indent=1))


def write_shards(hf_dir: Path, tensors: dict, shards: int) -> None:
    if shards == 1:
        save_file(tensors, hf_dir / "model.safetensors")
        return
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in names[s::shards]}, hf_dir / fname)
        weight_map.update({k: fname for k in names[s::shards]})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))}, "weight_map": weight_map}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def to_conditional_generation(hf_dir: Path, shards: int) -> None:
    """Every key prefixed `language_model.`, text config nested under `text_config`."""
    text = json.loads((hf_dir / "config.json").read_text())
    raw = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text}
    (hf_dir / "config.json").write_text(json.dumps(raw, indent=1))
    tensors = {"language_model." + k: v for k, v in load_file(hf_dir / "model.safetensors").items()}
    (hf_dir / "model.safetensors").unlink()
    write_shards(hf_dir, tensors, shards)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, make_hf):
    spec = CASES[request.param]
    hf_model, hf_dir = make_hf(request.param, seed=len(request.param), **spec["hf"])
    ids = np.random.default_rng(1).integers(0, spec["hf"]["vocab_size"], spec["batch"])
    ref = hf_logits(hf_model, ids)
    if spec.get("legacy"):
        to_legacy_rope(hf_dir)
    if spec.get("vlm"):
        to_conditional_generation(hf_dir, spec.get("shards", 1))
    assert np.abs(ref).max() > 1.0  # random weights give logits far from zero: the check has teeth
    return SimpleNamespace(name=request.param, model=hf_model, dir=hf_dir, ids=ids, ref=ref)


def test_case_layout_is_what_it_claims(case):
    """The rewritten directories really are legacy / conditional-generation / sharded."""
    spec = CASES[case.name]
    raw = json.loads((case.dir / "config.json").read_text())
    tc = raw.get("text_config", raw)
    assert ("rope_parameters" not in tc and "rope_theta" in tc) == bool(spec.get("legacy"))
    assert (raw.get("architectures") == ["Llama4ForConditionalGeneration"]) == bool(spec.get("vlm"))
    assert (case.dir / "model.safetensors.index.json").exists() == (spec.get("shards", 1) > 1)


def check_logits(case, **overrides):
    ours = llama4_jax.load_hf(case.dir, **overrides)
    assert ours.rt == RuntimeConfig().replace(**overrides)  # the runtime asked for is the one used
    out = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(case.ids, jnp.int32)))
    d = max_diff(out, case.ref)
    print(f"{case.name} {overrides}: max |Δlogits| = {d:.2e} (|logits| ≤ {np.abs(case.ref).max():.1f})")
    assert d <= TOL


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_logits_match_hf(case, scan):
    check_logits(case, scan_layers=scan)


# remat changes only the backward pass (tests/test_model_invariants.py compares its gradients);
# one case shows the forward is untouched.
@pytest.mark.parametrize("case", ["llama3_top2_gqa2"], indirect=True)
def test_remat_logits_match_hf(case):
    check_logits(case, remat=True)


def test_scan_model_really_scans(case):
    model = llama4_jax.load_hf(case.dir, scan_layers=True)
    cfg = model.cfg
    period = cfg.scan_period()
    shapes = store.state_shapes(cfg, model.rt)
    assert shapes["groups.blocks.0.attn.q"].shape[0] == cfg.num_layers // period
    if case.name == "llama3_top2_gqa2":
        assert period == 2


def test_hf_to_ours_to_hf_loads_in_transformers(case, tmp_path):
    from_hf(case.dir, tmp_path / "ours")
    to_hf(tmp_path / "ours", tmp_path / "hf")
    back = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    d = max_diff(hf_logits(back, case.ids), case.ref)
    print(f"{case.name}: HF → ours → HF max |Δlogits| = {d:.2e}")
    assert d <= TOL
    # The weights themselves survive exactly.
    want = {k: v.detach().numpy() for k, v in case.model.state_dict().items()}
    got = {k: v.detach().numpy() for k, v in back.state_dict().items()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --- ours → HF → ours ---------------------------------------------------------------------------
ROUND_TRIP_CFG = ModelConfig(
    vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, dense_ff=48,
    moe=MoEConfig(num_experts=3, top_k=2, expert_ff=24), interleave_moe_layer_step=2, no_rope_layers=(1, 0, 1, 0),
    attention_chunk_size=8, rope_scaling=RopeScaling(original_max_position_embeddings=16), floor_scale=4)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ours_to_hf_to_ours_is_bit_identical(tmp_path, random_flat, tied):
    cfg = ROUND_TRIP_CFG.replace(tie_word_embeddings=tied)
    flat = random_flat(cfg)
    store.save_params(tmp_path / "a", cfg, flat)
    to_hf(tmp_path / "a", tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "b")
    cfg2, flat2, _ = store.load_params(tmp_path / "b")
    assert config_to_hf(cfg2) == config_to_hf(cfg)
    assert sorted(flat2) == sorted(flat)
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat2[k]), flat[k], err_msg=k)


def test_scan_checkpoint_exports_the_same_safetensors(tmp_path, random_flat, stack_for_scan):
    """to_hf from a scan-layout checkpoint writes byte-identical files to the unrolled one."""
    cfg = ROUND_TRIP_CFG
    flat = random_flat(cfg, seed=3)
    assert cfg.scan_period() == 2
    store.save_params(tmp_path / "plain", cfg, flat)
    store.save_params(tmp_path / "scan", cfg, stack_for_scan(cfg, flat), rt=RuntimeConfig(scan_layers=True))
    to_hf(tmp_path / "plain", tmp_path / "hf_plain")
    to_hf(tmp_path / "scan", tmp_path / "hf_scan")
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "hf_plain" / f).read_bytes() == (tmp_path / "hf_scan" / f).read_bytes(), f
