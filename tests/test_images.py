"""Our Llama 4 image processing against HF's Llama4Processor (transformers 5.24 + torchvision 0.28).

The reference is HF's output on the inputs of tests/llama4_processor_cases.py, recorded by
tools/make_llama4_processor_ref.py in tests/data/llama4_processor/ref.npz (HF's image processor
needs torchvision, which this environment cannot import next to a CPU-only torch: see the
tool). Compared exactly: every tile's bfloat16 pixels and the canvas grid for 8 images (wide,
tall, square, smaller than a tile, RGBA, greyscale) at max_patches 4 and 6, and the token ids of
4 prompts (0 to 5 images each) with a local tokenizer.json holding the image special tokens.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import llama4_processor_cases as cases
from llama4_jax.data.images import ImageConfig, expand_prompt, load_image, preprocess, to_rgb
from llama4_jax.errors import DataError, UserError

REF = Path(__file__).parent / "data" / "llama4_processor" / "ref.npz"


@pytest.fixture(scope="module")
def ref():
    return np.load(REF)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    assert np.array_equal(x.astype(ml_dtypes.bfloat16).astype(np.float32), x)  # exactly bfloat16 values
    return x.astype(ml_dtypes.bfloat16).view(np.int16)


@pytest.mark.parametrize("max_patches", cases.MAX_PATCHES)
def test_tiles_equal_hf(ref, max_patches):
    cfg = ImageConfig(tile_size=cases.TILE, max_patches=max_patches, patch_size=cases.PATCH)
    grids = set()
    for i, img in enumerate(cases.images()):
        got = preprocess(to_rgb(img), cfg)
        want = ref[f"pixels/{max_patches}/{i}"]
        assert got.aspect_ratio == tuple(ref[f"aspect/{max_patches}/{i}"][0]), i
        assert got.pixel_values.shape == want.shape, i
        np.testing.assert_array_equal(bf16_bits(got.pixel_values), want, err_msg=f"image {i}")
        grids.add(got.aspect_ratio)
    assert len(grids) >= 4  # the cases really cover several canvases


@pytest.mark.parametrize("max_patches", cases.MAX_PATCHES)
def test_prompt_ids_equal_hf(ref, tmp_path, max_patches):
    from tokenizers import Tokenizer

    cases.build_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    cfg = ImageConfig(tile_size=cases.TILE, max_patches=max_patches, patch_size=cases.PATCH)
    processed = iter([preprocess(to_rgb(img), cfg) for img in cases.images()])
    pixels = []
    for j, prompt in enumerate(cases.PROMPTS):
        imgs = [next(processed) for _ in range(prompt.count("<|image|>"))]
        text = expand_prompt(prompt, imgs, cfg, where=f"prompt {j}")
        np.testing.assert_array_equal(tok.encode(text, add_special_tokens=False).ids, ref[f"ids/{max_patches}/{j}"])
        pixels += [im.pixel_values for im in imgs]
    np.testing.assert_array_equal(bf16_bits(np.concatenate(pixels)), ref[f"batch_pixels/{max_patches}"])


def test_marker_count_mismatch_names_the_row():
    cfg = ImageConfig(tile_size=cases.TILE, patch_size=cases.PATCH)
    img = preprocess(np.zeros((8, 8, 3), np.uint8), cfg)
    with pytest.raises(DataError, match=r"^data\.jsonl:3: 2 <\|image\|> markers for 1 images$"):
        expand_prompt("<|image|> and <|image|>", [img], cfg, where="data.jsonl:3")


def test_load_image_paths_base64_and_bad_input(tmp_path):
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    np.testing.assert_array_equal(load_image("x.png", "f:1", base_dir=tmp_path), a)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    np.testing.assert_array_equal(load_image("data:image/png;base64," + b64, "f:2"), a)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for ref_, where in (("bad.png", "f.jsonl:7"), ("missing.png", "f.jsonl:8"), ("base64:@@@", "f.jsonl:9")):
        with pytest.raises(UserError) as e:
            load_image(ref_, where, base_dir=tmp_path)
        msg = str(e.value)
        assert msg.startswith(f"{where}: cannot read image ") and "\n" not in msg
        assert ref_ in msg or "base64" in msg
