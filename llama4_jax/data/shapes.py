"""A synthetic image-text set: one coloured shape in one quadrant of a small noisy image.

Each row is a PNG of `size`×`size` pixels (dark noise, one filled square, circle or cross in one
of four colours, centred near the middle of one quadrant, radius and offset jittered) and its
caption "a <colour> <shape> <place>." (4 × 3 × 4 = 48 captions, log 48 ≈ 3.87 nats per caption,
all of it in the image; the leading "a" makes every caption's first token the same, so a text-only
model, which is never asked for a document's first token, does not get the colour's for free). `write_shapes` writes

    OUT/images/<i>.png
    OUT/captions.jsonl        {"text": "<|image|><caption>", "images": ["images/<i>.png"]}
    OUT/captions_text.jsonl   {"text": "<caption>"}   the same captions without images

so a model trained on `captions.jsonl` can be compared with a text-only one trained on
`captions_text.jsonl` (experiments/multimodal_tiny*.yaml). Same seed, same files, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .images import IMAGE

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle", "cross")
PLACES = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def draw(rng: np.random.Generator, colour: str, shape: str, place: str, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: the shape on dark noise."""
    img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    (qy, qx), half = PLACES[place], size // 2
    jitter = max(size // 16, 1)
    cy = qy * half + half // 2 + rng.integers(-jitter, jitter + 1)
    cx = qx * half + half // 2 + rng.integers(-jitter, jitter + 1)
    yy, xx = np.mgrid[:size, :size]
    dy, dx = yy - cy, xx - cx
    r = rng.integers(size // 8, size // 5 + 1)
    mask = {"square": (abs(dy) <= r) & (abs(dx) <= r), "circle": dy ** 2 + dx ** 2 <= r * r,
            "cross": ((abs(dy) <= 1) & (abs(dx) <= r)) | ((abs(dx) <= 1) & (abs(dy) <= r))}[shape]
    img[mask] = COLOURS[colour]
    return img


def write_shapes(out: str | Path, n: int, *, seed: int = 0, size: int = 32) -> Path:
    """Writes n rows under `out` (module doc); returns `out`."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, text_rows = [], []
    for i in range(n):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        Image.fromarray(draw(rng, colour, shape, place, size)).save(out / "images" / f"{i}.png")
        caption = f"a {colour} {shape} {place}."
        rows.append({"text": IMAGE + caption, "images": [f"images/{i}.png"]})
        text_rows.append({"text": caption})
    for name, data in (("captions.jsonl", rows), ("captions_text.jsonl", text_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    return out
