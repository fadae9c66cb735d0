"""The vision tower and early fusion against Hugging Face `Llama4ForConditionalGeneration`.

Random-weight tiny checkpoints saved by transformers (two vision shapes: 32-pixel tiles of 8×8
patches with 2 heads, 28-pixel tiles of 7×7 patches with 4 heads and 3 layers). Checked, all in
float32 at ≤ 1e-4:
- our image features == HF `get_image_features` (before the projector) for 1 and 2 tiles;
- our logits with images (3 tiles over 2 rows: HF's all-tiles layout with 2 padding tiles for
  one case, one tile list per row for the other) == HF's language model fed the merged
  embeddings built from HF's own parts (`multi_modal_projector` applied by hand,
  `masked_scatter` at the image tokens): 5.24's `Llama4ForConditionalGeneration.forward` raises
  AttributeError for every input;
- from-hf → to-hf writes every tensor back bit for bit, transformers loads the result, and
  `load_hf` onto a mesh reads the same values;
- a text-only batch through the multimodal model gives bit-identical logits and loss to the
  text-only model, with the same traced program (the tower costs nothing).
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama4_jax
from llama4_jax.convert.hf import config_to_hf, from_hf, read_hf_params, to_hf
from llama4_jax.model import store
from llama4_jax.model.multimodal import Llama4Multimodal, text_loss_mask
from llama4_jax.model.transformer import Llama4
from llama4_jax.train.loss import token_losses

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

TOL = 1e-4
IMG, BOI, EOI = 100, 101, 102
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, head_dim=16,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
            num_hidden_layers=2, interleave_moe_layer_step=2, attention_chunk_size=16, no_rope_layers=[1, 0],
            floor_scale=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
CASES = {
    # 4×4 patches of 8 px → 4 tokens per tile; head_dim 16.
    "tile32_patch8": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          image_size=32, patch_size=8, projector_input_dim=48, projector_output_dim=48,
                          vision_output_dim=48),
    # 4×4 patches of 7 px → 4 tokens per tile; head_dim 8, 3 layers, another rope theta.
    "tile28_patch7_heads4": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                 image_size=28, patch_size=7, projector_input_dim=40, projector_output_dim=40,
                                 vision_output_dim=40, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}
TILES = {"tile32_patch8": (1,), "tile28_patch7_heads4": (2,)}  # and 3 + 2 padding tiles in the logits test
FIRST = pytest.mark.parametrize("case", ["tile32_patch8"], indirect=True)  # tests that need one case only


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, make_hf_vlm):
    hf, hf_dir = make_hf_vlm(request.param, text=TEXT, vision=CASES[request.param], seed=len(request.param),
                             image_token_index=IMG, boi_token_index=BOI, eoi_token_index=EOI)
    ours = llama4_jax.load_hf(hf_dir)
    v = CASES[request.param]
    return SimpleNamespace(name=request.param, hf=hf, dir=hf_dir, ours=ours, size=v["image_size"],
                           per_tile=(v["image_size"] // v["patch_size"]) ** 2 // 4)


def pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def test_loads_as_multimodal(case):
    assert isinstance(case.ours, Llama4Multimodal)
    v = case.ours.cfg.vision
    assert (v.image_token_id, v.boi_token_id, v.eoi_token_id) == (IMG, BOI, EOI)
    assert v.tokens_per_tile == case.per_tile


def test_image_features_match_hf(case):
    for tiles in TILES[case.name]:  # each tile count is a compile: few of them
        pv = pixels(tiles, case.size, seed=tiles)
        with torch.no_grad():
            ref = case.hf.get_image_features(torch.as_tensor(pv)).last_hidden_state.numpy()
        got = np.asarray(nnx.jit(lambda m, x: m.image_features(x))(case.ours, jnp.asarray(pv)))
        assert got.shape == ref.shape == (tiles, case.per_tile, case.hf.config.vision_config.vision_output_dim)
        d = max_diff(got, ref)
        print(f"{case.name} tiles={tiles}: max |Δfeatures| = {d:.2e} (|features| ≤ {np.abs(ref).max():.2f})")
        assert np.abs(ref).std() > 0.05 and d <= TOL


def image_rows(per_tile: int, seed: int = 0) -> np.ndarray:
    """Two rows: text, an image of 1 tile, text | text, an image of 2 tiles, text."""
    rng = np.random.default_rng(seed)
    text = lambda n: list(rng.integers(0, IMG, n))
    row0 = text(3) + [BOI] + [IMG] * per_tile + [EOI] + text(9)
    row1 = text(2) + [BOI] + [IMG] * (2 * per_tile) + [EOI] + text(6)
    L = max(len(row0), len(row1))
    return np.array([row0 + text(L - len(row0)), row1 + text(L - len(row1))], np.int64)


def hf_fused_logits(model, ids: np.ndarray, pv: np.ndarray) -> np.ndarray:
    """HF's language model on embeddings merged from HF's parts, as its forward would merge them."""
    with torch.no_grad():
        ids_t = torch.as_tensor(ids)
        emb = model.language_model.get_input_embeddings()(ids_t)
        feats = model.get_image_features(torch.as_tensor(pv)).last_hidden_state
        proj = model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        emb = emb.masked_scatter((ids_t == model.config.image_token_id)[..., None], proj)
        return model.language_model(inputs_embeds=emb).logits.float().numpy()


def test_logits_with_images_match_hf(case):
    ids = image_rows(case.per_tile)
    pv = pixels(3, case.size, seed=7)
    ref = hf_fused_logits(case.hf, ids, pv)
    if case.name == "tile32_patch8":
        # HF's layout, all tiles in order, with two padding tiles after the three real ones.
        pad = lambda p: jnp.asarray(np.concatenate([p, np.zeros_like(p[:2])]))
    else:
        # Per row [B, T, C, S, S]: row 0 owns tile 0 (+ a padding tile), row 1 tiles 1 and 2.
        pad = lambda p: jnp.asarray(np.stack([np.stack([p[0], np.zeros_like(p[0])]), p[1:3]]))
    run = nnx.jit(lambda m, x, p: m(x, pixel_values=p))
    got = np.asarray(run(case.ours, jnp.asarray(ids, jnp.int32), pad(pv)))
    d = max_diff(got, ref)
    print(f"{case.name}: max |Δlogits| with images = {d:.2e} (|logits| ≤ {np.abs(ref).max():.1f})")
    assert np.abs(ref).max() > 1.0 and d <= TOL
    # The images matter: other pixels change the logits.
    other = np.asarray(run(case.ours, jnp.asarray(ids, jnp.int32), pad(pixels(3, case.size, seed=8))))
    assert max_diff(other, got) > 1e-2


@FIRST
def test_text_only_batch_is_the_text_model(case):
    """Same logits and loss, bit for bit, and the same traced program as the text-only model."""
    cfg, flat = read_hf_params(case.dir)
    text_cfg = cfg.replace(vision=None)
    text_flat = {k: v for k, v in flat.items() if not k.startswith(("vision.", "projector."))}
    text_model = store.model_from_flat(text_cfg, text_flat)
    assert type(text_model) is Llama4
    ids = jnp.asarray(np.random.default_rng(3).integers(0, IMG, (2, 12)), jnp.int32)
    f = lambda m: m(ids)
    mm_logits, text_logits = nnx.jit(f)(case.ours), nnx.jit(f)(text_model)
    np.testing.assert_array_equal(np.asarray(mm_logits), np.asarray(text_logits))
    targets = jnp.roll(ids, -1, axis=1)
    assert float(token_losses(mm_logits, targets).mean()) == float(token_losses(text_logits, targets).mean())
    eqns = lambda m: len(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(m), s)(ids))(nnx.state(m)).eqns)
    assert eqns(case.ours) == eqns(text_model)


@FIRST
def test_from_hf_to_hf_is_bit_identical(case, tmp_path):
    from_hf(case.dir, tmp_path / "ours")
    cfg, _, _ = store.load_params(tmp_path / "ours")
    assert cfg.vision is not None and cfg.vision.image_token_id == IMG
    to_hf(tmp_path / "ours", tmp_path / "hf")
    want, got = load_file(case.dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert any(k.startswith("vision_model.") for k in got) and "multi_modal_projector.linear_1.weight" in got
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    back = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert back.config.vision_config.image_size == case.size and back.config.image_token_id == IMG
    # Read onto a mesh (each variable straight into its sharding: hf_sharded's block reader).
    from llama4_jax.parallel.rules import MESH_AXES

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
    on_mesh = llama4_jax.load_hf(case.dir, mesh=mesh)
    want_state = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(case.ours))}
    for p, v in nnx.to_flat_state(nnx.state(on_mesh)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want_state[".".join(map(str, p))]))
    # Our config survives its own HF form.
    from_hf(tmp_path / "hf", tmp_path / "ours2")
    assert config_to_hf(store.load_params(tmp_path / "ours2")[0]) == config_to_hf(cfg)


@FIRST
def test_loss_mask_drops_image_positions(case):
    ids = image_rows(case.per_tile)
    inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
    mask = np.asarray(text_loss_mask(inputs, targets, jnp.ones(inputs.shape, jnp.float32), case.ours.cfg))
    t = ids[:, 1:]
    in_image = np.zeros_like(t, bool)
    for r in range(t.shape[0]):
        b, e = list(t[r]).index(BOI), list(t[r]).index(EOI)
        in_image[r, b:e + 1] = True
    np.testing.assert_array_equal(mask, (~in_image).astype(np.float32))
    text_only = text_loss_mask(inputs, targets, jnp.ones(inputs.shape), case.ours.cfg.replace(vision=None))
    assert float(text_only.min()) == 1.0

