"""Image-text training: the image_text source kind, packed rows with their tiles, frozen towers,
and `llama4-jax train` with images (data/image_text.py, data/pipeline.py, train/optimizer.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from llama4_jax.cli import main
from llama4_jax.data.image_text import load_image_documents
from llama4_jax.data.images import PATCH, ImageConfig
from llama4_jax.data.pipeline import build_mixture
from llama4_jax.data.shapes import COLOURS, write_shapes
from llama4_jax.data.sources import Source
from llama4_jax.data.tokenizer import make_tokenizer
from llama4_jax.errors import DataError
from llama4_jax.model.config import ModelConfig, MoEConfig, VisionConfig
from llama4_jax.train.optimizer import freeze_by_stage, tower_of
from llama4_jax.train.state import init_state
from llama4_jax.train.step import StepConfig, make_train_step

ICFG = ImageConfig(tile_size=32, max_patches=1, patch_size=8)  # 4 tokens per tile
EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "multimodal_tiny.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), 40, seed=1)


def _sources(shapes: Path, eval_fraction=0.3) -> dict[str, Source]:
    return {"img": Source(kind="image_text", path=str(shapes / "captions.jsonl"), eval_fraction=eval_fraction),
            "txt": Source(kind="jsonl", path=str(shapes / "captions_text.jsonl"), eval_fraction=0.0)}


def _mixture(shapes, **kw):
    return build_mixture(_sources(shapes), make_tokenizer("byte_image"), seed=3, seq_len=24, global_batch=6,
                         image_config=ICFG, prefetch=0, **kw)


def _dominant_colour(tile_3xSxS: np.ndarray) -> str:
    """The palette colour of the brightest pixels (the shape; the noise is dark)."""
    rgb = np.round((tile_3xSxS * 0.5 + 0.5) * 255).reshape(3, -1).T
    bright = rgb[rgb.sum(1) > 200]
    return min(COLOURS, key=lambda c: np.abs(bright - np.asarray(COLOURS[c])).sum(1).mean())


def test_eval_rows_place_each_tile_at_its_placeholders(shapes):
    """Reference: the held-out documents in order, tokenized one by one; the k-th placeholder of
    that stream is feature k % T of tile k // T. Rows cut documents (and images) at any token."""
    tok = make_tokenizer("byte_image")
    _, held_out = load_image_documents("img", _sources(shapes)["img"], ICFG)
    stream = np.concatenate([tok.encode(t) + [tok.eos_id] for t in held_out.texts])
    k_of = np.cumsum(stream == tok.encode(PATCH)[0]) - 1
    it = _mixture(shapes)
    T, L, seen = ICFG.tokens_per_tile, 24, 0
    for b, batch in enumerate(it.eval_batches("img", seq_len=L, global_batch=6)):
        assert set(batch) >= {"pixel_values", "image_index"}
        for r in range(6):
            lo = (b * 6 + r) * L
            for i in np.flatnonzero(batch["image_index"][r] >= 0):
                assert batch["inputs"][r, i] == stream[lo + i]
                k, j = k_of[lo + i], batch["image_index"][r, i]
                assert j % T == k % T
                np.testing.assert_array_equal(batch["pixel_values"][r, j // T],
                                              held_out.tiles[k // T].astype(np.float32))
                seen += 1
            # no placeholder is left without a feature, nothing else gets one
            np.testing.assert_array_equal(batch["image_index"][r] >= 0,
                                          batch["inputs"][r] == tok.encode(PATCH)[0])
    assert seen == (stream == tok.encode(PATCH)[0]).sum()


def test_train_rows_mix_sources_and_keep_image_and_caption_together(shapes):
    it = _mixture(shapes)
    tok = make_tokenizer("byte_image")
    image_ids = [tok.encode(t)[0] for t in ("<|image_start|>", "<|image_end|>", "<|image|>", PATCH)]
    checked = cut = text_rows = text_batches = 0
    for _ in range(40):  # enough rows that some begin inside an image
        batch = next(it)
        # image tokens are never targets; text rows of a mixed batch have no features
        assert not (np.isin(batch["targets"], image_ids) & (batch["loss_mask"] > 0)).any()
        if "pixel_values" not in batch:  # no image row: exactly the text pipeline's batch
            assert (batch["source_ids"] == 1).all()
            text_batches += 1
            continue
        for r in range(6):
            if batch["source_ids"][r] == 1:
                text_rows += 1
                assert (batch["image_index"][r] == -1).all() and not batch["pixel_values"][r].any()
                continue
            idx, ids = batch["image_index"][r], batch["inputs"][r]
            cut += int(idx[idx >= 0][:1].tolist() not in ([], [0]))
            # the tile placed just before an <|image_end|> shows the colour its caption names
            for m in np.flatnonzero(ids == image_ids[1]):
                caption = tok.decode(ids[m + 1:].tolist()).split(" ")[1:2]
                caption = caption[0] if caption else ""
                placed = idx[:m][idx[:m] >= 0]
                if caption in COLOURS and placed.size:
                    assert _dominant_colour(batch["pixel_values"][r, placed[-1] // ICFG.tokens_per_tile]) == caption
                    checked += 1
    assert checked >= 10 and cut >= 1 and text_rows >= 1 and text_batches >= 1


def test_batches_are_a_function_of_the_step_and_resume_exactly(shapes):
    a = _mixture(shapes)
    for _ in range(3):
        next(a)
    state = a.get_state()
    expect = [next(a) for _ in range(2)]
    b = _mixture(shapes)
    b.set_state(state)
    for want in expect:
        got = next(b)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, message", [
    ([{"text": "<|image|>ok", "images": ["images/0.png"]}, {"text": "<|image|>x", "images": ["nope.png"]}],
     r"bad\.jsonl:2: cannot read image .*nope\.png"),
    ([{"text": "<|image|><|image|>two", "images": ["images/0.png"]}],
     r"bad\.jsonl:1: 2 <\|image\|> markers for 1 images"),
    ([{"text": "<|image|>x", "images": ["base64:not-base64!"]}], r"bad\.jsonl:1: cannot read image inline base64"),
    ([{"caption": "x"}], r"bad\.jsonl:1: record has no string field 'text'"),
])
def test_bad_rows_name_file_and_row(shapes, rows, message):
    bad = _write_rows(shapes / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        build_mixture({"bad": Source(kind="image_text", path=str(bad))}, make_tokenizer("byte_image"), seed=0,
                      seq_len=16, global_batch=2, image_config=ICFG, prefetch=0)


def test_image_source_needs_image_tokens(shapes):
    with pytest.raises(DataError, match="does not encode .* as single tokens"):
        build_mixture(_sources(shapes), make_tokenizer("byte"), seed=0, seq_len=16, global_batch=2,
                      image_config=ICFG, prefetch=0)


def _tiny_mm() -> ModelConfig:
    vision = VisionConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=64, image_size=32, patch_size=8,
                          projector_input_dim=16, projector_output_dim=16, vision_output_dim=16,
                          image_token_id=262, boi_token_id=259, eoi_token_id=260)
    return ModelConfig(vocab_size=272, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                       dense_ff=32, moe=MoEConfig(num_experts=2, top_k=1, expert_ff=16), interleave_moe_layer_step=0,
                       attention_chunk_size=None, max_position_embeddings=64, vision=vision)


def test_frozen_towers_stay_bit_identical(shapes):
    """Stage 0 trains [text, projector], stage 1 everything: after the first step the vision
    params are bitwise the initial ones (and the rest moved); after the second they moved too."""
    it = _mixture(shapes)
    batch = next(it)
    assert "pixel_values" in batch
    make_tx = lambda p: freeze_by_stage(optax.adamw(1e-2, weight_decay=0.1), [1, 2], [["text", "projector"], None])
    graphdef, state, tx = init_state(_tiny_mm(), 0, make_tx)
    step = jax.jit(make_train_step(graphdef, tx, StepConfig(num_sources=2)))
    flat = lambda s: {jax.tree_util.keystr(p): (tower_of(p), np.asarray(v))
                      for p, v in jax.tree_util.tree_leaves_with_path(s.params)}
    before = flat(state)
    assert {t for t, _ in before.values()} == {"text", "vision", "projector"}
    state, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert bool(m["finite"])
    after = flat(state)
    for name, (tower, v) in before.items():
        if tower == "vision":
            assert np.array_equal(after[name][1], v), name
    assert all(not np.array_equal(after[n][1], v) for n, (t, v) in before.items() if t != "vision" and v.ndim > 1)
    state, _ = step(state, {k: jnp.asarray(v) for k, v in next(it).items()})
    moved = [not np.array_equal(np.asarray(x), before[jax.tree_util.keystr(p)][1])
             for p, x in jax.tree_util.tree_leaves_with_path(state.params) if tower_of(p) == "vision"]
    assert all(moved)


def test_train_cli_runs_with_images(shapes, tmp_path):
    """`llama4-jax train` on an image-text + text mixture, frozen tower in stage 1 (a few steps of
    the smallest shapes): it finishes, reports a finite caption loss, and evaluates the image
    source."""
    raw = yaml.safe_load(EXPERIMENT.read_text())
    raw["model"]["overrides"].update(num_layers=1, hidden_size=32, dense_ff=64)
    raw["vision"]["tower"].update(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=64,
                                  projector_input_dim=32, projector_output_dim=32, vision_output_dim=32)
    raw["data"]["sources"]["shapes"].update(path=str(shapes / "captions.jsonl"), eval_fraction=0.3)
    raw["data"]["prefetch"] = 0
    for stage, steps in zip(raw["curriculum"]["stages"], (1, 2)):
        stage.update(steps=steps, seq_len=32, batch_size=4)
        stage["lr_phase"].pop("warmup_steps", None)
    raw.update(checkpoint={"every_steps": 100, "keep_last": 1, "async_save": False},
               logging={"every_steps": 1, "tensorboard": False, "progress": False}, eval={"every_steps": 3, "batches": 1})
    exp = tmp_path / "mm.yaml"
    exp.write_text(yaml.safe_dump(raw))
    assert main(["train", str(exp), "--workdir", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("loss/shapes", np.nan)) for r in rows)
    assert any(np.isfinite(r.get("eval/loss/shapes", np.nan)) for r in rows)


def test_tower_scale_and_stage_table_on_plain_sgd():
    """Reference: plain SGD. Stage 0 freezes vision, stage 1 trains all with vision ×3."""
    params = {"vision": jnp.ones(3), "projector": jnp.ones(2), "embed": jnp.ones(4)}
    grads = {"vision": jnp.full(3, 0.5), "projector": jnp.full(2, -1.0), "embed": jnp.full(4, 2.0)}
    tx = freeze_by_stage(optax.sgd(0.1), [1, 3], [["text", "projector"], None], {"vision": 3.0})
    plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params))
    state = tx.init(params)
    u0, state = tx.update(grads, state, params)
    u1, state = tx.update(grads, state, params)
    assert np.array_equal(u0["vision"], np.zeros(3)) and np.array_equal(u0["embed"], plain["embed"])
    np.testing.assert_allclose(u1["vision"], 3.0 * plain["vision"], rtol=1e-7)
    np.testing.assert_array_equal(u1["projector"], plain["projector"])


@pytest.mark.parametrize("edit, where", [
    (lambda raw: raw.pop("vision"), "data.sources.shapes.kind"),
    (lambda raw: raw["vision"]["tower"].update(patch_size=7), "vision.tower"),
    (lambda raw: raw["curriculum"]["stages"][0].update(trainable=["audio"]), "curriculum.stages[0].trainable"),
    (lambda raw: raw["model"]["overrides"].update(vision={"hidden_size": 8}), "model.overrides.vision"),
])
def test_vision_config_errors_name_the_key(tmp_path, edit, where):
    from llama4_jax.config import load_experiment
    from llama4_jax.errors import ConfigError

    raw = yaml.safe_load(EXPERIMENT.read_text())
    raw["data"]["sources"]["shapes"]["path"] = str(tmp_path / "c.jsonl")
    edit(raw)
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_experiment(exp)
    assert where in str(err.value) and "\n" not in str(err.value), str(err.value)
