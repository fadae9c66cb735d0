"""A labelled matrix as an RGB image (rows × columns of shaded cells), for TensorBoard's image tab.

TensorBoard has no heatmap plot, and a histogram loses which column is which; an image keeps both
axes. Shades run from white (0) to dark blue (the largest value in the matrix, printed on top).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_LOW, _HIGH = np.array([255, 255, 255], np.float64), np.array([8, 48, 107], np.float64)
_PAD = 4


def _text_width(draw: ImageDraw.ImageDraw, font, text: str) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(math.ceil(right - left))


def heatmap(values_RxC: np.ndarray, row_labels: list[str], col_title: str = "expert") -> np.ndarray:
    """→ uint8 [H, W, 3]: one cell per value, row labels on the left, column indices on top."""
    values_RxC = np.asarray(values_RxC, np.float64)
    R, C = values_RxC.shape
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max(4, min(24, 768 // max(C, 1)))
    cell_h = 18
    label_w = max([_text_width(probe, font, s) for s in row_labels] + [0]) + 2 * _PAD
    # Label every `every`-th column so the indices never overlap.
    every = max(1, math.ceil((_text_width(probe, font, str(C - 1)) + _PAD) / cell_w))
    vmax = float(values_RxC.max()) if values_RxC.size and values_RxC.max() > 0 else 1.0
    title = f"{col_title} (max {vmax:.3g})"
    top = 2 * cell_h
    width = max(label_w + C * cell_w, label_w + _text_width(probe, font, title)) + _PAD
    img = Image.new("RGB", (width, top + R * cell_h + _PAD), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w, _PAD), title, fill="black", font=font)
    for c in range(0, C, every):
        draw.text((label_w + c * cell_w, cell_h), str(c), fill="black", font=font)
    for r in range(R):
        y = top + r * cell_h
        draw.text((_PAD, y + 3), row_labels[r], fill="black", font=font)
        for c in range(C):
            shade = _LOW + (_HIGH - _LOW) * min(max(values_RxC[r, c] / vmax, 0.0), 1.0)
            x = label_w + c * cell_w
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 2], fill=tuple(int(v) for v in shade))
    return np.asarray(img, np.uint8)
