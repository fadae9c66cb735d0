"""Document sources: turn a `SourceSpec` into a deterministic list of documents (strings).

Kinds (`kind="auto"` infers it from the path):
    text          a file, a folder (every non-hidden file, recursively) or a glob; UTF-8
    jsonl         one JSON object per line, the document in `field` (default "text")
    parquet       the string column `field`, read with pyarrow
    array_record  each record is UTF-8 text, or a JSON object whose `field` holds the text
                  (a record is parsed as JSON only if it starts with "{" and has that key)
    builtin       `builtin:<name>`: the embedded corpus of `corpus.py`, needs no files
Files of a folder or glob are read in sorted path order; `.gz` text/jsonl files are decompressed.

`split` cuts each record (file, line of jsonl, row, ...) further: "file" keeps it whole,
"paragraph" splits on blank lines, "line" on newlines. Blank documents are dropped.

Held-out split: a document is eval iff blake2b(its UTF-8 bytes) / 2**64 < eval_fraction.
Hashing the content rather than the index keeps exact duplicates on the same side (no leak of
a repeated document from train into eval) and keeps the split stable when files are added.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

SOURCE_KINDS = ("text", "jsonl", "parquet", "array_record", "builtin")
SPLIT_MODES = ("file", "paragraph", "line")
BUILTIN_PREFIX = "builtin:"

_SUFFIX_KIND = {
    ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
    ".array_record": "array_record", ".arrayrecord": "array_record",
}
# Suffixes read when a folder or glob is given for a record format (text reads every file).
_KIND_SUFFIXES = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz"),
    "parquet": (".parquet",),
    "array_record": (".array_record", ".arrayrecord"),
}
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_READ_CHUNK = 1024  # array_record records per read call


class DataError(ValueError):
    """A user-facing data problem (missing file, empty source, bad option); one-line message."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    kind: str = "auto"
    field: str = "text"
    split: str = "file"
    eval_fraction: float = 0.01

    def __post_init__(self):
        if self.kind != "auto" and self.kind not in SOURCE_KINDS:
            raise DataError(f"source {self.name!r}: unknown kind {self.kind!r}; "
                            f"expected auto or one of {', '.join(SOURCE_KINDS)}")
        if self.split not in SPLIT_MODES:
            raise DataError(f"source {self.name!r}: unknown split {self.split!r}; "
                            f"expected one of {', '.join(SPLIT_MODES)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"source {self.name!r}: eval_fraction must be in [0, 1), "
                            f"got {self.eval_fraction}")

    @property
    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        if self.path.startswith(BUILTIN_PREFIX):
            return "builtin"
        name = self.path[:-3] if self.path.endswith(".gz") else self.path
        return _SUFFIX_KIND.get(os.path.splitext(name)[1].lower(), "text")


def _has_suffix(path: Path, suffixes: tuple[str, ...] | None) -> bool:
    return suffixes is None or path.name.lower().endswith(suffixes)


def _input_files(path: str, suffixes: tuple[str, ...] | None) -> list[Path]:
    """The files a path names (file, folder or glob), sorted; DataError when none exist."""
    if glob.has_magic(path):
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if os.path.isfile(p)]
    elif os.path.isdir(path):
        root = Path(path)
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    elif os.path.isfile(path):
        return [Path(path)]
    else:
        raise DataError(f"data source path not found: {path}")
    files = [p for p in files if _has_suffix(p, suffixes)]
    if not files:
        raise DataError(f"no input files found under {path}")
    return files


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _read_text(files: list[Path], field: str) -> Iterator[str]:
    del field
    for path in files:
        with _open_text(path) as f:
            yield f.read()


def _jsonl_field(record: object, field: str, where: str) -> str | None:
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{where}: record has no field {field!r}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def _read_jsonl(files: list[Path], field: str) -> Iterator[str]:
    for path in files:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg})") from e
                text = _jsonl_field(record, field, f"{path}:{line_no}")
                if text is not None:
                    yield text


def _read_parquet(files: list[Path], field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in files:
        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no column {field!r} (columns: "
                            f"{', '.join(parquet.schema_arrow.names)})")
        for batch in parquet.iter_batches(columns=[field], batch_size=4096):
            yield from (v for v in batch.column(0).to_pylist() if v is not None)


def _decode_record(record: bytes, field: str) -> str | None:
    if record.lstrip()[:1] == b"{":
        try:
            obj = json.loads(record)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and field in obj:
            value = obj[field]
            return value if isinstance(value, str) else None
    return record.decode("utf-8", errors="replace")


def _read_array_record(files: list[Path], field: str) -> Iterator[str]:
    from array_record.python import array_record_module

    for path in files:
        reader = array_record_module.ArrayRecordReader(str(path))
        try:
            total = reader.num_records()
            for start in range(0, total, _READ_CHUNK):
                for record in reader.read(start, min(start + _READ_CHUNK, total)):
                    text = _decode_record(record, field)
                    if text is not None:
                        yield text
        finally:
            reader.close()


_READERS = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "array_record": _read_array_record,
}


def _raw_records(spec: SourceSpec) -> Iterable[str]:
    kind = spec.resolved_kind
    if kind == "builtin":
        from llama4_jax.data import corpus  # corpus imports DataError from here

        name = spec.path[len(BUILTIN_PREFIX):] if spec.path.startswith(BUILTIN_PREFIX) else spec.path
        return corpus.load_builtin(name)
    files = _input_files(spec.path, _KIND_SUFFIXES.get(kind))
    return _READERS[kind](files, spec.field)


def _split_record(text: str, split: str) -> Iterator[str]:
    if split == "file":
        pieces: Iterable[str] = (text,)
    elif split == "paragraph":
        pieces = _BLANK_LINES.split(text)
    else:
        pieces = text.split("\n")
    for piece in pieces:
        if piece.strip():
            yield piece


def iter_documents(spec: SourceSpec) -> Iterator[str]:
    """Every document of a source, in a deterministic order (train and eval together)."""
    for record in _raw_records(spec):
        yield from _split_record(record, spec.split)


def is_eval_document(text: str, eval_fraction: float) -> bool:
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2.0**64


def load_documents(spec: SourceSpec) -> tuple[list[str], list[str]]:
    """(train, eval) documents of a source; DataError if it has no train documents."""
    train: list[str] = []
    held_out: list[str] = []
    for doc in iter_documents(spec):
        (held_out if is_eval_document(doc, spec.eval_fraction) else train).append(doc)
    if not train:
        raise DataError(f"source {spec.name!r} ({spec.path}) has no training documents")
    return train, held_out
