"""Llama 4 image processing: HF `Llama4ImageProcessor` and `Llama4Processor`'s prompt, in numpy.

An image becomes tiles of S×S pixels (S = `tile_size`, the vision tower's image_size):
1. the canvas: among the (h·S, w·S) grids with h·w ≤ `max_patches`, the one the image fits with
   the smallest upscale ≥ 1 (or, if none, the least downscale); ties go to the smallest area;
2. resize without distortion into the canvas (never upscaling past S unless
   `resize_to_max_canvas`), pad right and bottom with black, split into h×w tiles (row-major);
3. when h·w > 1, a global thumbnail (the whole image resized to S×S) follows the tiles;
4. pixels x ↦ (x/255 − 0.5)/0.5, each step rounded to bfloat16 as HF does; the values come back
   as float32 arrays (exactly HF's bfloat16 values).

Resizing is bilinear with antialiasing, computed exactly as torch's uint8 CPU kernel (which
torchvision and so HF use): per axis, Pillow-style triangle-filter weights in double, scaled to
int16 with the largest precision that keeps the biggest weight below 2^15, integer sums
rounded and clamped to uint8, horizontal pass first. Pillow's own resize differs from it by one
level on some pixels, so it is not used.

The prompt of one image (`image_prompt`) is HF's: `<|image_start|>`, then for a multi-tile
image each tile row's tiles as `<|patch|>`×T separated by `<|tile_x_separator|>` and ended by
`<|tile_y_separator|>`, then `<|image|>`, the thumbnail's `<|patch|>`×T and `<|image_end|>`
(T = (S/patch_size)²·pixel_shuffle_ratio²). `expand_prompt` replaces each `<|image|>` a text
holds with its image's prompt, refusing a count that does not match.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGE = "<|image|>"
IMAGE_START, IMAGE_END = "<|image_start|>", "<|image_end|>"
PATCH = "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"
IMAGE_TOKENS = (IMAGE_START, IMAGE_END, IMAGE, PATCH, TILE_X, TILE_Y)


@dataclass(frozen=True)
class ImageConfig:
    """HF Llama4ImageProcessor's `size`, `max_patches`, `resize_to_max_canvas`, and the
    processor's `patch_size` / `pixel_shuffle_ratio` (which must match the vision tower's)."""

    tile_size: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def tokens_per_tile(self) -> int:
        downsample = int(round(1.0 / self.pixel_shuffle_ratio ** 2))
        return (self.tile_size // self.patch_size) ** 2 // downsample


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: np.ndarray  # float32 [tiles, 3, S, S]
    aspect_ratio: tuple[int, int]  # (tile rows, tile columns) of the canvas


# --- the canvas ------------------------------------------------------------------------------
def supported_resolutions(max_patches: int, tile: int) -> list[tuple[int, int]]:
    """Every (h·S, w·S) with h·w ≤ max_patches, grouped by aspect ratio as HF lists them."""
    by_ratio: dict[float, list] = defaultdict(list)
    for n in range(max_patches, 0, -1):
        for h in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[h / (n // h)].append((h, n // h))
    return [(h * tile, w * tile) for group in by_ratio.values() for h, w in group]


def best_fit(size: tuple[int, int], resolutions: list[tuple[int, int]], resize_to_max_canvas: bool) -> tuple[int, int]:
    """HF `get_best_fit` (scales in float32, as its torch tensors compute them)."""
    res = np.asarray(resolutions, np.int64)
    h, w = size
    scale_h = res[:, 0].astype(np.float32) / np.float32(h)
    scale_w = res[:, 1].astype(np.float32) / np.float32(w)
    scales = np.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up):
        chosen_scale = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen_scale = scales[scales < 1].max()
    chosen = res[scales == chosen_scale]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def fit_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """HF `get_max_res_without_distortion`."""
    (h, w), (th, tw) = size, target
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(int(np.floor(h * sw)), th), tw
    return th, min(int(np.floor(w * sh)), tw)


# --- resizing (torch's uint8 bilinear antialias kernel) -------------------------------------
def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """[n_out, n_in] int64 weight matrix and its precision (bits)."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    rows = []
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), n_in) - lo
        w = [max(0.0, 1.0 - abs((j + lo - center + 0.5) * inv)) for j in range(n)]
        total = sum(w)
        rows.append((lo, [x / total if total != 0.0 else x for x in w]))
    w_max = max([0.0] + [x for _, w in rows for x in w])
    prec = 0
    while prec < 22 and int(0.5 + w_max * (1 << (prec + 1))) < (1 << 15):
        prec += 1
    mat = np.zeros((n_out, n_in), np.int64)
    for i, (lo, w) in enumerate(rows):
        mat[i, lo:lo + len(w)] = [int(0.5 + x * (1 << prec)) for x in w]
    return mat, prec


def _resample(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    mat, prec = _axis_weights(x.shape[axis], n_out)
    moved = np.moveaxis(x.astype(np.int64), axis, 0)
    acc = np.tensordot(mat, moved, axes=(1, 0)) + (1 << (prec - 1) if prec else 0)
    out = np.clip(acc >> prec, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize(img_HxWxC: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, C] → [height, width, C], bilinear with antialias (torch's uint8 CPU kernel)."""
    out = img_HxWxC
    if width != out.shape[1]:
        out = _resample(out, 1, width)
    if height != out.shape[0]:
        out = _resample(out, 0, height)
    return out


def normalize(img_HxWxC: np.ndarray, mean, std) -> np.ndarray:
    """uint8 → (x·(1/255) − mean)/std with each step rounded to bfloat16 (HF's Llama 4 override),
    → float32 [C, H, W]."""
    import ml_dtypes  # ships with jax

    bf16 = ml_dtypes.bfloat16
    x = np.moveaxis(img_HxWxC, -1, 0).astype(np.float32)
    x = (x * np.float32(1 / 255)).astype(bf16).astype(np.float32)
    m = np.asarray(mean, np.float32).astype(bf16).astype(np.float32)[:, None, None]
    s = np.asarray(std, np.float32).astype(bf16).astype(np.float32)[:, None, None]
    x = (x - m).astype(bf16).astype(np.float32)
    return (x / s).astype(bf16).astype(np.float32)


def preprocess(img_HxWx3: np.ndarray, cfg: ImageConfig) -> ProcessedImage:
    """One RGB uint8 image → its tiles (and thumbnail) and canvas grid, as HF's processor."""
    S = cfg.tile_size
    h, w = img_HxWx3.shape[:2]
    th, tw = best_fit((h, w), supported_resolutions(cfg.max_patches, S), cfg.resize_to_max_canvas)
    limit = (th, tw) if cfg.resize_to_max_canvas else (min(max(h, S), th), min(max(w, S), tw))
    nh, nw = fit_without_distortion((h, w), limit)
    canvas = np.zeros((th, tw, 3), np.uint8)
    canvas[: max(nh, 1), : max(nw, 1)] = resize(img_HxWx3, max(nh, 1), max(nw, 1))
    x = normalize(canvas, cfg.mean, cfg.std)  # [3, th, tw]
    rh, rw = th // S, tw // S
    tiles = x.reshape(3, rh, S, rw, S).transpose(1, 3, 0, 2, 4).reshape(rh * rw, 3, S, S)
    if rh * rw > 1:
        thumb = normalize(resize(img_HxWx3, S, S), cfg.mean, cfg.std)
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return ProcessedImage(np.ascontiguousarray(tiles), (rh, rw))


# --- the prompt ------------------------------------------------------------------------------
def image_prompt(aspect_ratio: tuple[int, int], tokens_per_tile: int) -> str:
    """HF `Llama4Processor._prompt_split_image`."""
    rh, rw = aspect_ratio
    out = [IMAGE_START]
    if rh * rw > 1:
        for _ in range(rh):
            for x in range(rw):
                out.append(PATCH * tokens_per_tile)
                if x < rw - 1:
                    out.append(TILE_X)
            out.append(TILE_Y)
    out += [IMAGE, PATCH * tokens_per_tile, IMAGE_END]
    return "".join(out)


def expand_prompt(text: str, images: list[ProcessedImage], cfg: ImageConfig, where: str = "text") -> str:
    """Each `<|image|>` of `text` replaced, in order, by its image's prompt."""
    parts = text.split(IMAGE)
    if len(parts) - 1 != len(images):
        raise DataError(f"{where}: {len(parts) - 1} {IMAGE} markers for {len(images)} images")
    out = [parts[0]]
    for img, rest in zip(images, parts[1:]):
        out += [image_prompt(img.aspect_ratio, cfg.tokens_per_tile), rest]
    return "".join(out)


# --- reading images ----------------------------------------------------------------------------
def to_rgb(image) -> np.ndarray:
    """A PIL image (transparency composited on white, as HF does) or an array → uint8 [H, W, 3]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")
    return arr


def load_image(ref: str, where: str, base_dir: Path | None = None) -> np.ndarray:
    """An image path (relative to `base_dir`) or a `data:...;base64,` / `base64:` string →
    uint8 RGB [H, W, 3]; anything unreadable is a DataError naming `where` (file:row)."""
    from PIL import Image, UnidentifiedImageError

    name = "inline base64 image" if ref.startswith(("data:", "base64:")) else ref
    try:
        if ref.startswith(("data:", "base64:")):
            raw = base64.b64decode(ref.split(",", 1)[1] if ref.startswith("data:") else ref[len("base64:"):],
                                   validate=True)
            src = io.BytesIO(raw)
        else:
            src = Path(ref) if base_dir is None or Path(ref).is_absolute() else Path(base_dir) / ref
            name = str(src)
        with Image.open(src) as im:
            im.load()
            return to_rgb(im)
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError, IndexError) as e:
        raise DataError(f"{where}: cannot read image {name}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from None
