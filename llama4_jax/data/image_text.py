"""Image-text sources: JSONL rows of text with `<|image|>` markers and the images they stand for.

A row is `{"text": "...<|image|>...", "images": ["a.png", ...]}` (field names from the source's
`field` / `images_field`; one image may be given as a plain string). An image is a path
(relative to the JSONL file's folder) or an inline `data:...;base64,` / `base64:` string,
decoded with Pillow. Each image is processed as HF's Llama 4 processor does (`images.py`: tiles,
thumbnail, normalisation) and its marker expanded into the image prompt, so the document the
tokenizer sees is exactly the prompt a Llama 4 processor would build. An unreadable image, a
missing field or a marker count that does not match the images is a DataError naming the file
and row (`file:row`).

The held-out split hashes the row's text together with its image references, so rows that share
a caption but not an image can fall on either side.

Everything is held in memory: the documents and every tile as bfloat16 (the processor's values
are bfloat16-exact). That suits the small and mid-sized sets this project trains on; the token
store (`store.py`) holds text only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from ..errors import DataError
from .images import ImageConfig, expand_prompt, load_image, preprocess
from .sources import Source, _input_files, _KIND_SUFFIXES, _open_text, is_eval_document


@dataclasses.dataclass(frozen=True)
class ImageDocuments:
    """Documents (expanded prompts) with their tiles: document d owns tiles[tile_starts[d]:tile_starts[d+1]],
    in the order its `<|patch|>` runs appear."""

    texts: list[str]
    tiles: np.ndarray  # bfloat16 [n_tiles, 3, S, S]
    tile_starts: np.ndarray  # int64 [n_docs + 1]


def references(record: dict, field: str, where: str) -> list[str]:
    """The row's media references in `field` (a string or a list of strings; absent: none)."""
    if field not in record:
        return []
    value = record[field]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {field!r} must be a string or a list of strings")
    return value


def media_records(spec: Source, kind: str, media_field: str) -> Iterator[tuple[str, Path, str, list[str]]]:
    """(`file:row`, the file, the row's text, its media references) of every non-blank JSONL row
    of a media source (`image_text`, `audio_text`), in file and line order; DataError naming
    `file:row` for a row that is not a JSON object with a string text field."""
    for path in _input_files(spec.path, _KIND_SUFFIXES[kind]):
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(spec.field), str):
                    raise DataError(f"{where}: record has no string field {spec.field!r}")
                yield where, path, record[spec.field], references(record, media_field, where)


def split_documents(name: str, spec: Source, rows) -> tuple[list, list]:
    """(train, held-out) lists of (text, media) from (text, media, split key) rows, by the
    source's eval_fraction; DataError if no row is left for training."""
    train, held_out = [], []
    for text, media, key in rows:
        (held_out if is_eval_document(key, spec.eval_fraction) else train).append((text, media))
    if not train:
        raise DataError(f"source {name!r} ({spec.path}) has no training rows")
    return train, held_out


def iter_rows(spec: Source, cfg: ImageConfig) -> Iterator[tuple[str, list[np.ndarray], str]]:
    """(expanded text, tiles of each image, split key) of every row, in file and line order."""
    for where, path, raw, refs in media_records(spec, "image_text", spec.images_field):
        images = [preprocess(load_image(r, where, path.parent), cfg) for r in refs]
        text = expand_prompt(raw, images, cfg, where)
        if text.strip():
            yield text, [im.pixel_values for im in images], "\0".join([raw, *refs])


def _collect(rows: list[tuple[str, list[np.ndarray]]], cfg: ImageConfig) -> ImageDocuments:
    S = cfg.tile_size
    counts = [sum(len(t) for t in tiles) for _, tiles in rows]
    tiles = [t.astype(ml_dtypes.bfloat16) for _, per_image in rows for t in per_image]
    array = np.concatenate(tiles) if tiles else np.zeros((0, 3, S, S), ml_dtypes.bfloat16)
    return ImageDocuments([text for text, _ in rows], array, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def load_image_documents(name: str, spec: Source, cfg: ImageConfig) -> tuple[ImageDocuments, ImageDocuments]:
    """(train, eval) documents of an image-text source; DataError if it has no train rows."""
    train, held_out = split_documents(name, spec, iter_rows(spec, cfg))
    return _collect(train, cfg), _collect(held_out, cfg)
