"""Audio clips for the audio encoder: reading WAV files and the audio prompt, in numpy.

A clip is read with soundfile (any format libsndfile reads: WAV, FLAC, OGG, ...), mixed down to
mono (the mean of its channels) as float32 in [-1, 1], checked against the encoder's sample
rate, and padded at the end with silence to `clip_samples`, so every clip gives the encoder's
`tokens_per_clip` features (as a tile gives `tokens_per_tile`). A clip at another rate is a
DataError unless `resample` is on (then `librosa.resample`, soxr's high-quality filter); a clip
longer than `clip_samples` is a DataError (cutting it would drop part of what the transcript
says). The log-mel front end runs inside the model (model/audio.py), on these waveforms.

The prompt of one clip (`audio_prompt`): `<|audio_start|>`, `<|audio|>` × tokens_per_clip,
`<|audio_end|>`. `expand_prompt` replaces each `<|audio|>` marker of a row's text with its clip's
prompt, refusing a marker count that does not match the clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

AUDIO = "<|audio|>"
AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
AUDIO_TOKENS = (AUDIO_START, AUDIO_END, AUDIO)


@dataclass(frozen=True)
class ClipConfig:
    """What the data pipeline needs of the audio encoder (model.config.AudioConfig's
    sample_rate, clip_samples, tokens_per_clip) and whether other rates are resampled."""

    sample_rate: int = 16000
    clip_samples: int = 160000
    tokens_per_clip: int = 251
    resample: bool = False


def audio_prompt(tokens_per_clip: int) -> str:
    return AUDIO_START + AUDIO * tokens_per_clip + AUDIO_END


def expand_prompt(text: str, n_clips: int, cfg: ClipConfig, where: str = "text") -> str:
    """Each `<|audio|>` of `text` replaced, in order, by a clip's prompt."""
    parts = text.split(AUDIO)
    if len(parts) - 1 != n_clips:
        raise DataError(f"{where}: {len(parts) - 1} {AUDIO} markers for {n_clips} audio clips")
    return audio_prompt(cfg.tokens_per_clip).join(parts)


def load_clip(ref: str, where: str, cfg: ClipConfig, base_dir: Path | None = None) -> np.ndarray:
    """An audio file (path relative to `base_dir`) → float32 [clip_samples], mono, at
    `cfg.sample_rate`, padded with silence; anything unreadable, at the wrong rate (resampling
    off) or too long is a DataError naming `where` (file:row) and the file."""
    import soundfile  # the `audio` extra

    path = Path(ref) if base_dir is None or Path(ref).is_absolute() else Path(base_dir) / ref
    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, ValueError, TypeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise DataError(f"{where}: cannot read audio {path}: {type(e).__name__}: {first}") from None
    wave = wave.mean(axis=1)
    if rate != cfg.sample_rate:
        if not cfg.resample:
            raise DataError(f"{where}: audio {path} is sampled at {rate} Hz, the audio encoder takes "
                            f"{cfg.sample_rate} Hz (set audio.resample: true to resample)")
        import librosa

        wave = librosa.resample(wave, orig_sr=rate, target_sr=cfg.sample_rate).astype(np.float32)
    if len(wave) > cfg.clip_samples:
        raise DataError(f"{where}: audio {path} is {len(wave) / cfg.sample_rate:.3f} s, longer than the "
                        f"encoder's clip of {cfg.clip_samples / cfg.sample_rate:.3f} s (audio.encoder.clip_samples)")
    return np.pad(wave, (0, cfg.clip_samples - len(wave)))
