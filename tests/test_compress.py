"""Compression (llama4_jax/compress, model/quant.py): the int4 layout and its matmul path, the
AutoAWQ export, AWQ against round to nearest on a briefly trained model, structured pruning
(experts, widths, layers) against masked originals and against HF transformers, and the CLI's
one-line refusals.

References: a float model holding the dequantized weights (int4 path, ≤1e-5); a reference
unpacker written here from docs/compress.md (exact); the unpruned model with the removed
experts' logits at −inf (exact) or the removed channels zeroed (≤1e-6); HF Llama4ForCausalLM
(≤1e-4)."""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llama4_jax import cli
from llama4_jax.compress.autoawq import write_autoawq
from llama4_jax.compress.awq import awq_quantize
from llama4_jax.compress.int4 import param_bytes, quantize_flat, targets
from llama4_jax.compress.prune import PruneSpec, drop_layers, prune_model, slice_channels, slice_experts
from llama4_jax.model import store
from llama4_jax.model.config import ModelConfig, MoEConfig, MoERuntime, RuntimeConfig
from llama4_jax.model.quant import QuantSpec, dequantize_np, pack, quantize_groups, unpack_np

# Layer 0: dense, RoPE, chunked; layer 1: MoE, NoPE, global (both kinds of every part).
CFG = ModelConfig(vocab_size=264, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  dense_ff=64, moe=MoEConfig(num_experts=4, top_k=1, expert_ff=32), interleave_moe_layer_step=2,
                  no_rope_layer_interval=2, attention_chunk_size=16, floor_scale=16, rope_theta=10000.0,
                  max_position_embeddings=512)
SPEC = QuantSpec(bits=4, group_size=32)  # the codes of `rand` are RTN's; `method` is only a label
QRT = RuntimeConfig(quant=SPEC)


@nnx.jit
def _fwd(model, ids):
    return model(ids)


def _ids(seed, B=2, L=24, V=264):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, L)), jnp.int32)


def _dequantized(cfg, qflat, spec):
    """The float flat arrays a quantized flat stands for (the reference model's weights)."""
    out = {k: v for k, v in qflat.items()}
    shapes = store.state_shapes(cfg)
    for name, n_lead, n_in, ins in targets(cfg, spec):
        codes = unpack_np(out.pop(name + ".qweight"))
        zeros = unpack_np(out.pop(name + ".qzeros"))
        w = dequantize_np(codes, zeros, out.pop(name + ".scales"), spec.group_size,
                          out.pop(name + ".in_scale") if ins else None)
        out[name] = w.reshape(shapes[name].shape)
    return out


@pytest.fixture(scope="module")
def rand(random_flat):
    flat = random_flat(CFG, seed=1)
    qflat = quantize_flat(CFG, flat, SPEC)
    # a non-trivial AWQ input scale on the routed experts, so the explicit division is exercised
    ins = np.random.default_rng(2).uniform(0.5, 2.0, (4, 64)).astype(np.float32)
    qflat["groups.blocks.1.ffn.experts.gate.in_scale"] = ins
    qflat["groups.blocks.1.ffn.experts.up.in_scale"] = ins[::-1].copy()
    return flat, qflat


def test_awq_packing_golden_and_round_trip():
    assert int(pack(np.arange(8, dtype=np.uint8)[None])[0, 0]) == 0x75316420
    codes = np.random.default_rng(0).integers(0, 16, (5, 3, 24)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_np(pack(codes)), codes)


def test_int4_path_equals_dequantize_then_matmul(rand):
    """Every quantized linear (attention, dense MLP, shared expert, routed experts on the
    dropless and gather paths) on packed weights == a float32 model holding the
    dequantized weights (≤1e-5); weights stay packed in the model."""
    _, qflat = rand
    qmodel = store.model_from_flat(CFG, qflat, QRT)
    ref = store.model_from_flat(CFG, _dequantized(CFG, qflat, SPEC))
    assert qmodel.groups.blocks[1].ffn.experts.gate.qweight.get_value().dtype == jnp.uint32
    ids = _ids(0)
    np.testing.assert_allclose(_fwd(qmodel, ids), _fwd(ref, ids), atol=1e-5, rtol=0)
    x = jax.random.normal(jax.random.key(0), (3, 2, 64))
    moe = nnx.jit(lambda m, x, d: m(x, d)[0], static_argnums=2)
    # decoding's gather path (dequantizes only the chosen experts); dropless ran in the model above
    got = moe(qmodel.groups.blocks[1].ffn, x, "gather")
    np.testing.assert_allclose(got, moe(ref.groups.blocks[1].ffn, x, "gather"), atol=1e-5, rtol=0)


def test_quantized_checkpoint_round_trip_and_bytes(rand, tmp_path):
    flat, qflat = rand
    store.save_params(tmp_path / "q", CFG, qflat, rt=QRT)
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["group_size"] == 32
    cfg, got, rt = store.load_any(tmp_path / "q")
    assert rt.quant == SPEC and cfg == CFG
    for k, v in qflat.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
    # 4 bits + (fp16 scale + 4-bit zero) per 32: 0.5 + 2.5/32 bytes of 4 per quantized weight
    qn = sum(np.prod(flat[n].shape) for n, *_ in targets(CFG, SPEC))
    rest = sum(v.nbytes for k, v in flat.items() if k not in {n for n, *_ in targets(CFG, SPEC)})
    ins = 2 * 4 * 64 * 4
    assert param_bytes(qflat) == qn * (0.5 + 2.5 / 32) + rest + ins


def _ref_unpack(words_i32: np.ndarray) -> np.ndarray:
    """docs/compress.md: nibble i (bits 4i..4i+3) of word j holds column 8j + [0,2,4,6,1,3,5,7][i]."""
    w = words_i32.view(np.uint32)
    out = np.zeros((*w.shape[:-1], w.shape[-1] * 8), np.int64)
    for i, col in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
        out[..., col::8] = (w >> (4 * i)) & 0xF
    return out


def test_autoawq_export_unpacks_to_our_integers(rand, tmp_path):
    from safetensors.numpy import load_file

    flat, qflat = rand
    write_autoawq(tmp_path, CFG, qflat, SPEC)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["router", "lm_head"]}
    t = load_file(str(tmp_path / "model.safetensors"))
    cases = [("model.layers.0.self_attn.q_proj", flat["groups.blocks.0.attn.q"].reshape(64, -1), None),
             ("model.layers.0.self_attn.o_proj", flat["groups.blocks.0.attn.o"].reshape(-1, 64), None),
             ("model.layers.0.feed_forward.down_proj", flat["groups.blocks.0.ffn.down"], None),
             ("model.layers.1.feed_forward.shared_expert.up_proj", flat["groups.blocks.1.ffn.shared.up"], None),
             ("model.layers.1.feed_forward.experts.2.gate_proj", flat["groups.blocks.1.ffn.experts.gate"][2], 2),
             ("model.layers.1.feed_forward.experts.3.down_proj", flat["groups.blocks.1.ffn.experts.down"][3], 3)]
    for name, w, e in cases:
        codes, zeros, scales = quantize_groups(w, SPEC)  # our integers and scales for this weight
        assert t[name + ".qweight"].dtype == np.int32 and t[name + ".scales"].dtype == np.float16
        assert t[name + ".qweight"].shape == (w.shape[0], w.shape[1] // 8)
        np.testing.assert_array_equal(_ref_unpack(t[name + ".qweight"]), codes, err_msg=name)
        np.testing.assert_array_equal(_ref_unpack(t[name + ".qzeros"]), zeros, err_msg=name)
        np.testing.assert_array_equal(t[name + ".scales"], scales, err_msg=name)
    np.testing.assert_array_equal(t["model.layers.1.feed_forward.experts.0.input_scales"],
                                  qflat["groups.blocks.1.ffn.experts.gate.in_scale"][0])
    assert t["model.layers.1.feed_forward.router.weight"].shape == (4, 64)


# --- AWQ against RTN on a model that learned something ---------------------------------------------
def _structured(rng, B, L):
    """Arithmetic sequences mod 64 with a per-row stride 1..7: learnable, with a clear loss to lose."""
    start = rng.integers(0, 64, (B, 1))
    stride = rng.integers(1, 8, (B, 1))
    return ((start + stride * np.arange(L)[None]) % 64).astype(np.int32)


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))


def _held_out_loss(model, ids_Bx25):
    """Mean next-token loss, two rows at a time through `_fwd` (the [2, 24] shape every test uses,
    so the float model's compilation is shared)."""
    total = 0.0
    for i in range(0, ids_Bx25.shape[0], 2):
        rows = ids_Bx25[i:i + 2]
        logp = jax.nn.log_softmax(_fwd(model, jnp.asarray(rows[:, :-1])))
        total += -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(rows[:, 1:, None]), -1)))
    return total / (ids_Bx25.shape[0] // 2)


@pytest.fixture(scope="module")
def trained(random_flat):
    """CFG trained for 300 steps on arithmetic sequences (the dense dispatch: the cheapest to
    compile; the same function as dropless)."""
    rt = RuntimeConfig(moe=MoERuntime(dispatch="dense"))
    model = store.model_from_flat(CFG, random_flat(CFG, seed=3, std=0.05), rt)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, ids):
        loss, g = nnx.value_and_grad(_loss)(model, ids)
        opt.update(model, g)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(300):
        step(model, opt, jnp.asarray(_structured(rng, 16, 32)))
    flat = {store.flat_name(p): np.asarray(v.get_value()) for p, v in nnx.state(model).flat_state()}
    return store.model_from_flat(CFG, flat), flat


def test_awq_beats_rtn_on_held_out_loss(trained):
    """3-bit, groups of 32 (at 4 bits this tiny model loses little either way: measured 0.163 →
    AWQ 0.174, RTN 0.177); AWQ includes its clipping search, as AutoAWQ does by default."""
    model, flat = trained
    rng = np.random.default_rng(7)
    calib, held = _structured(rng, 16, 32), _structured(rng, 32, 25)
    spec = QuantSpec(bits=3, group_size=32)
    losses = {"f32": _held_out_loss(model, held)}
    awq = awq_quantize(model, flat, calib, spec)
    losses["awq"] = _held_out_loss(store.model_from_flat(CFG, awq, RuntimeConfig(quant=spec)), held)
    rtn = quantize_flat(CFG, flat, replace(spec, method="rtn"))
    losses["rtn"] = _held_out_loss(store.model_from_flat(CFG, rtn, RuntimeConfig(quant=spec)), held)
    print(losses)
    assert losses["f32"] < 0.5, losses  # it learned the sequences (uniform would be ln 64 = 4.2)
    assert losses["awq"] < losses["rtn"], losses


# --- pruning ---------------------------------------------------------------------------------------
def test_removing_experts_equals_minus_inf_logits(rand):
    flat, _ = rand
    keep = np.array([0, 2])
    pruned = dict(flat)
    slice_experts(pruned, 1, keep)
    small = store.model_from_flat(CFG.replace(moe={"num_experts": 2}), pruned)
    # the original with experts 1 and 3 unselectable: their logits at −inf (the selection bias
    # is added to the logits for selection only, so −inf there is exactly that)
    masked = dict(flat)
    masked["groups.blocks.1.ffn.bias"] = np.array([0, -np.inf, 0, -np.inf], np.float32)
    ref = store.model_from_flat(CFG, masked)
    ids = _ids(3)
    np.testing.assert_array_equal(np.asarray(_fwd(small, ids)), np.asarray(_fwd(ref, ids)))


def test_ffn_pruning_equals_zeroed_channels(rand):
    flat, _ = rand
    rng = np.random.default_rng(4)
    pruned, zeroed = dict(flat), dict(flat)
    keep_dense = np.sort(rng.choice(64, 40, replace=False))
    keep_shared = np.sort(rng.choice(32, 16, replace=False))
    keep_routed = np.stack([np.sort(rng.choice(32, 16, replace=False)) for _ in range(4)])
    slice_channels(pruned, "groups.blocks.0.ffn.", keep_dense)
    slice_channels(pruned, "groups.blocks.1.ffn.shared.", keep_shared)
    slice_channels(pruned, "groups.blocks.1.ffn.experts.", keep_routed)

    def zero(prefix, keep, expert=None):
        for n, axis in (("gate", -1), ("up", -1), ("down", -2)):
            a = zeroed[prefix + n].copy()
            drop = np.setdiff1d(np.arange(a.shape[axis]), keep)
            idx = [slice(None)] * a.ndim
            if expert is not None:
                idx[0] = expert
            idx[axis] = drop
            a[tuple(idx)] = 0
            zeroed[prefix + n] = a

    zero("groups.blocks.0.ffn.", keep_dense)
    zero("groups.blocks.1.ffn.shared.", keep_shared)
    for e in range(4):
        zero("groups.blocks.1.ffn.experts.", keep_routed[e], e)
    small = store.model_from_flat(CFG.replace(dense_ff=40, moe={"expert_ff": 16}), pruned)
    ref = store.model_from_flat(CFG, zeroed)
    ids = _ids(5)
    np.testing.assert_allclose(_fwd(small, ids), _fwd(ref, ids), atol=1e-6, rtol=0)


def test_pruned_model_exports_to_hf_with_same_logits(random_flat, tmp_path):
    """Experts, widths and a layer cut from a 3-layer model chosen on calibration data; the result
    is a valid config whose HF export transformers loads with the same logits (≤1e-4)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = CFG.replace(num_layers=3, interleave_moe_layer_step=2, no_rope_layer_interval=2)  # dense, MoE+NoPE, dense
    flat = random_flat(cfg, seed=6)
    model = store.model_from_flat(cfg, flat)
    calib = np.asarray(_ids(8, B=4, L=32))
    pcfg, pflat = prune_model(model, flat, calib, PruneSpec(experts=3, ffn_keep=0.5, drop_layers=1))
    assert (pcfg.num_layers, pcfg.moe.num_experts, pcfg.moe.expert_ff, pcfg.dense_ff) == (2, 3, 16, 32)
    assert pcfg.moe_layers and any(not pcfg.uses_rope(i) for i in range(2))
    store.save_params(tmp_path / "p", pcfg, pflat)
    assert cli.main(["convert", "to-hf", str(tmp_path / "p"), str(tmp_path / "hf")]) == 0
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = _ids(9, L=40)
    with torch.no_grad():
        want = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    got = np.asarray(_fwd(store.model_from_flat(pcfg, pflat), ids))
    assert np.max(np.abs(got - want)) <= 1e-4


def test_drop_layers_keeps_each_layer_kind():
    cfg = CFG.replace(num_layers=4, interleave_moe_layer_step=2, no_rope_layer_interval=2)
    flat = {f"groups.blocks.{i}.x": np.full(1, i) for i in range(4)}
    new, out = drop_layers(cfg, flat, [1, 2])
    assert new.num_layers == 2 and new.moe_layers == (1,) and new.no_rope_layers == (1, 0)
    assert new.layer_types == ("chunked_attention", "full_attention")
    assert [int(out[f"groups.blocks.{i}.x"][0]) for i in range(2)] == [0, 3]


# --- the CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def params_dir(rand, tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "model"
    store.save_params(d, CFG, rand[0])
    return d


def test_cli_quantize_awq_then_eval_and_generate(params_dir, tmp_path, capsys):
    """The output loads through eval's and generate's loaders (the quantized decode path itself:
    test_int4_path_equals_dequantize_then_matmul's gather dispatch)."""
    from llama4_jax.evals.loading import load_model
    from llama4_jax.infer.cli import load_source

    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 40)
    out, hf = tmp_path / "q", tmp_path / "hf"
    assert cli.main(["quantize", "awq", str(params_dir), str(out), "--calib", str(calib), "--group-size", "32",
                     "--calib-rows", "4", "--seq-len", "32", "--autoawq", str(hf)]) == 0
    assert (hf / "model.safetensors").is_file() and (out / "quantization.json").is_file()
    model = load_model(out)
    assert model.rt.quant.method == "awq"
    assert np.isfinite(np.asarray(_fwd(model, _ids(1)))).all()
    gen_model, tok, _ = load_source(out, "byte")
    np.testing.assert_array_equal(_fwd(gen_model, _ids(1)), _fwd(model, _ids(1)))


@pytest.mark.parametrize("argv, msg", [
    (["quantize", "awq", "{src}", "{out}", "--group-size", "48", "--rtn"], "does not divide"),
    (["prune", "{src}", "{out}", "--experts", "9", "--calib", "{src}"], "has 4 experts"),
    (["quantize", "awq", "{bad}", "{out}", "--rtn"], "neither a params checkpoint"),
    (["prune", "{bad}", "{out}", "--experts", "2"], "neither a params checkpoint"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(params_dir, tmp_path, capsys, argv, msg):
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    (bad / "config.txt").write_text("x")
    out = tmp_path / "out"
    args = [a.format(src=params_dir, out=out, bad=bad) for a in argv]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
