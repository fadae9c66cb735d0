"""A synthetic audio-text set: DTMF tone sequences that spell digits, with their transcripts.

Each row is a clip of 3 to 6 digits (count and digits uniformly random), each digit its
telephone-keypad DTMF pair (one of four row tones 697-941 Hz plus one of three column tones
1209-1477 Hz) for `digit_seconds`, with a short fade at both ends of every tone, a random level
per digit and faint white noise, written as 16-bit PCM WAV at `sample_rate`. The transcript is
the digits. The defaults (8 kHz, 0.128 s a digit) make a 6-digit clip exactly 6144 samples, and
with experiments/audio_tiny.yaml's front end (hop 256) every digit spans 4 STFT frames, so one
encoder output (after the two stride-2 convolutions) per digit.

`write_tones` writes

    OUT/clips/<i>.wav
    OUT/transcripts.jsonl        {"text": "<|audio|>314", "audio": ["clips/<i>.wav"]}
    OUT/transcripts_text.jsonl   {"text": "<|audio|>314"}   the same rows without the audio

In the text-only rows `<|audio|>` is one token with nothing behind it, so both runs predict
exactly the same targets (every digit, then the end of the document) from the same text
context, and only the audio run can know them: a text-only model cannot beat ln 10 ≈ 2.303
nats per digit, and ln 4 nats per transcript for where it ends (its length is uniform over
four values), (4.5·ln 10 + ln 4) / 5.5 ≈ 2.136 nats per target token on average.
Same seed, same files, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .audio import AUDIO

# Telephone keypad: digit → (row tone, column tone), Hz.
DTMF = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209), "5": (770, 1336),
        "6": (770, 1477), "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "0": (941, 1336)}
MIN_DIGITS, MAX_DIGITS = 3, 6


def tone_clip(rng: np.random.Generator, digits: str, *, sample_rate: int = 8000,
              digit_seconds: float = 0.128) -> np.ndarray:
    """float32 [len(digits) · digit samples] in [-1, 1]: the digits' DTMF tones back to back."""
    n = int(round(digit_seconds * sample_rate))
    t = np.arange(n) / sample_rate
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.1 * n))
    parts = []
    for d in digits:
        lo, hi = DTMF[d]
        level = rng.uniform(0.2, 0.45)
        parts.append(level * fade * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t)))
    wave = np.concatenate(parts) + rng.normal(0.0, 0.005, n * len(digits))
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def write_tones(out: str | Path, n: int, *, seed: int = 0, sample_rate: int = 8000,
                digit_seconds: float = 0.128) -> Path:
    """Writes n rows under `out` (module doc); returns `out`."""
    import soundfile  # the `audio` extra

    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, text_rows = [], []
    for i in range(n):
        digits = "".join(rng.choice(list("0123456789"), size=rng.integers(MIN_DIGITS, MAX_DIGITS + 1)))
        wave = tone_clip(rng, digits, sample_rate=sample_rate, digit_seconds=digit_seconds)
        soundfile.write(out / "clips" / f"{i}.wav", wave, sample_rate, subtype="PCM_16")
        rows.append({"text": AUDIO + digits, "audio": [f"clips/{i}.wav"]})
        text_rows.append({"text": AUDIO + digits})
    for name, data in (("transcripts.jsonl", rows), ("transcripts_text.jsonl", text_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    return out
