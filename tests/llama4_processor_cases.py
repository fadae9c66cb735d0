"""Inputs shared by tests/test_images.py and tools/make_llama4_processor_ref.py (which records
HF's Llama4Processor output on them in tests/data/llama4_processor/ref.npz)."""

from __future__ import annotations

import numpy as np

IMAGE_TOKENS = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                "<|tile_y_separator|>"]
SPECIAL = ["<|begin_of_text|>", "<|eot|>", *IMAGE_TOKENS]
TILE, PATCH, MAX_PATCHES = 16, 4, (4, 6)  # 4×4 patches per tile → 4 <|patch|> tokens per tile
# (height, width, PIL mode): wide, tall, square, tiny (upscaled), near-square, odd ratios, RGBA, grey.
SIZES = [(50, 70, "RGB"), (16, 16, "RGB"), (20, 100, "RGB"), (130, 40, "RGB"), (10, 12, "RGB"),
         (65, 64, "RGB"), (33, 97, "RGBA"), (41, 23, "L")]
# Prompts over the images of SIZES in order: each <|image|> takes the next image.
PROMPTS = ["A picture: <|image|> shows shapes.", "<|image|><|image|> two at once", "no image here",
           "left <|image|> mid <|image|> right <|image|> end <|image|><|image|>"]


def images():
    """The test images as PIL images (deterministic)."""
    from PIL import Image

    out = []
    for i, (h, w, mode) in enumerate(SIZES):
        rng = np.random.default_rng(i)
        if i % 2:
            a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        else:  # smooth gradients: resizing errors show up as level changes
            a = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)) * 2, -1).astype(np.uint8)
        img = Image.fromarray(a, "RGBA")
        out.append(img if mode == "RGBA" else img.convert(mode))
    return out


def build_tokenizer(path) -> None:
    """A byte-level BPE tokenizer.json without merges, plus Llama 4's image special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tok.save(str(path))
