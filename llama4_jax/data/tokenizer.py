"""Tokenizers behind one small protocol: byte-level (default), HF `tokenizer.json`, SentencePiece.

The data pipeline only needs `encode`, `decode`, the vocabulary size and three special ids.
`fingerprint` (optional) identifies the exact vocabulary so tokenized corpora can be cached on
disk; a tokenizer without one is simply never cached.

ByteTokenizer id layout (vocab_size = 259, needs no files):
    0..255  the UTF-8 bytes of the text
    256     <pad>
    257     <bos>
    258     <eos>
ByteImageTokenizer ("byte_image", vocab_size = 265): the same plus Llama 4's image tokens as
single ids, so image-text sources train without a tokenizer file:
    259..264  <|image_start|> <|image_end|> <|image|> <|patch|> <|tile_x_separator|> <|tile_y_separator|>
A multimodal model's vision ids must match: image_token_id 262, boi_token_id 259, eoi_token_id 260.
ByteMMTokenizer ("byte_mm", vocab_size = 268): byte_image plus the audio tokens (data/audio.py):
    265..267  <|audio_start|> <|audio_end|> <|audio|>
An audio model's ids must match: audio_token_id 267, boa_token_id 265, eoa_token_id 266
(AudioConfig's defaults).

The model's vocabulary must be at least `tokenizer.vocab_size` (the trainer rounds it up); the
`tiny` preset's 256 is therefore raised to >= 259 when paired with this tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import DataError

TOKENIZER_KINDS = ("byte", "byte_image", "byte_mm", "hf", "sentencepiece")

# Spellings of the special tokens used by common vocabularies, tried in order when a file does
# not say which of its tokens is the end-of-document marker.
_EOS_NAMES = ("<|end_of_text|>", "<|eot|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>")
_PAD_NAMES = ("<|finetune_right_pad|>", "<pad>", "<|pad|>", "[PAD]")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus three specials; lossless for any text."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    fingerprint = "byte-v1"
    special_ids = {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a uint8 array, without building a Python list (the token store's path)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        # Specials carry no text; invalid byte sequences (a row cut mid-character) become U+FFFD.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class ByteImageTokenizer(ByteTokenizer):
    """`ByteTokenizer` plus the six image tokens at ids 259..264 (module docstring)."""

    SPECIALS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                "<|tile_x_separator|>", "<|tile_y_separator|>")
    vocab_size = 259 + len(SPECIALS)
    fingerprint = "byte-image-v1"
    _SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")
    _IDS = {t: 259 + i for i, t in enumerate(SPECIALS)}

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for i, piece in enumerate(self._SPLIT.split(text)):
            if i % 2:
                out.append(self._IDS[piece])
            else:
                out += piece.encode("utf-8")
        return out

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        names = {v: k for k, v in self._IDS.items()}
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            elif i in names:
                out += [run.decode("utf-8", errors="replace"), names[i]]
                run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")


class ByteMMTokenizer(ByteImageTokenizer):
    """`ByteImageTokenizer` plus the three audio tokens at ids 265..267 (module docstring)."""

    SPECIALS = ByteImageTokenizer.SPECIALS + ("<|audio_start|>", "<|audio_end|>", "<|audio|>")
    vocab_size = 259 + len(SPECIALS)
    fingerprint = "byte-mm-v1"
    _SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")
    _IDS = {t: 259 + i for i, t in enumerate(SPECIALS)}


def single_token_id(tokenizer: Tokenizer, token: str) -> int | None:
    """The id `tokenizer` encodes `token` to when that is one id (a special token), else None."""
    ids = list(tokenizer.encode(token))
    return int(ids[0]) if len(ids) == 1 else None


def _file_fingerprint(kind: str, path: str) -> str:
    with open(path, "rb") as f:
        return f"{kind}-{hashlib.sha256(f.read()).hexdigest()[:32]}"


def _first_present(lookup, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = lookup(name)
        if token_id is not None:
            return token_id
    return None


def _require_file(path: str | None, kind: str) -> str:
    if not path:
        raise DataError(f"tokenizer kind {kind!r} needs a path to its file")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file not found: {path}")
    return path


class HFTokenizer:
    """A Hugging Face `tokenizer.json` loaded with the `tokenizers` package."""

    def __init__(self, path: str, *, eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        path = _require_file(path, "hf")
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise DataError(f"cannot read tokenizer file {path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = _file_fingerprint("hf", path)
        lookup = self._tok.token_to_id
        eos = _first_present(lookup, [eos_token] if eos_token else _EOS_NAMES)
        if eos is None:
            raise DataError(f"no end-of-document token found in {path}; pass eos_token=...")
        self.eos_id = eos
        # Packing never pads training rows, so a missing bos/pad falls back to eos harmlessly.
        bos = _first_present(lookup, [bos_token] if bos_token else _BOS_NAMES)
        pad = _first_present(lookup, [pad_token] if pad_token else _PAD_NAMES)
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad
        # What the vocabulary really has (None: not found), recorded with the weights (model/special_tokens.py).
        self.special_ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The Rust side tokenizes a batch on all cores.
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    def __init__(self, path: str):
        import sentencepiece as spm

        path = _require_file(path, "sentencepiece")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"cannot read sentencepiece model {path}: {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        self.fingerprint = _file_fingerprint("sp", path)
        # SentencePiece reports -1 for a special the model was trained without.
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"sentencepiece model {path} has no eos piece")
        self.eos_id = eos
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else eos
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else eos
        self.special_ids = {"bos_token_id": self._sp.bos_id() if self._sp.bos_id() >= 0 else None,
                            "eos_token_id": eos, "pad_token_id": self._sp.pad_id() if self._sp.pad_id() >= 0 else None}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def make_tokenizer(kind: str = "byte", path: str | None = None, **special_tokens) -> Tokenizer:
    """Builds a tokenizer; `special_tokens` (eos_token=..., ...) only apply to kind "hf"."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "byte_image":
        return ByteImageTokenizer()
    if kind == "byte_mm":
        return ByteMMTokenizer()
    if kind == "hf":
        return HFTokenizer(path, **special_tokens)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise DataError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")
