"""Audio-text sources: JSONL rows of text with `<|audio|>` markers and the audio clips they stand for.

A row is `{"text": "...<|audio|>...", "audio": ["clip.wav", ...]}` (field names from the source's
`field` / `audio_field`; one clip may be given as a plain string), clip paths relative to the
JSONL file's folder. Each clip is read by `audio.py` (soundfile, mono, the encoder's sample
rate, padded to its clip length) and its marker expanded into the audio prompt
(`<|audio_start|>`, `<|audio|>` × tokens_per_clip, `<|audio_end|>`). An unreadable file, a clip
at the wrong sample rate (resampling off) or longer than the encoder's clip, a missing field or
a marker count that does not match the clips is a DataError naming the file and row
(`file:row`).

The held-out split hashes the row's text together with its clip references. Everything is held
in memory (clips as float32), as image-text sources are.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from .audio import ClipConfig, expand_prompt, load_clip
from .image_text import media_records, split_documents
from .sources import Source


@dataclasses.dataclass(frozen=True)
class AudioDocuments:
    """Documents (expanded prompts) with their clips: document d owns
    clips[clip_starts[d]:clip_starts[d+1]], in the order its `<|audio|>` runs appear."""

    texts: list[str]
    clips: np.ndarray  # float32 [n_clips, clip_samples]
    clip_starts: np.ndarray  # int64 [n_docs + 1]


def iter_rows(spec: Source, cfg: ClipConfig) -> Iterator[tuple[str, list[np.ndarray], str]]:
    """(expanded text, clips, split key) of every row, in file and line order."""
    for where, path, raw, refs in media_records(spec, "audio_text", spec.audio_field):
        text = expand_prompt(raw, len(refs), cfg, where)
        clips = [load_clip(r, where, cfg, path.parent) for r in refs]
        if text.strip():
            yield text, clips, "\0".join([raw, *refs])


def _collect(rows: list[tuple[str, list[np.ndarray]]], cfg: ClipConfig) -> AudioDocuments:
    counts = [len(clips) for _, clips in rows]
    clips = [c for _, per_row in rows for c in per_row]
    array = np.stack(clips).astype(np.float32) if clips else np.zeros((0, cfg.clip_samples), np.float32)
    return AudioDocuments([text for text, _ in rows], array, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def load_audio_documents(name: str, spec: Source, cfg: ClipConfig) -> tuple[AudioDocuments, AudioDocuments]:
    """(train, eval) documents of an audio-text source; DataError if it has no train rows."""
    train, held_out = split_documents(name, spec, iter_rows(spec, cfg))
    return _collect(train, cfg), _collect(held_out, cfg)
