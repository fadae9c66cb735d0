"""Document sources: the `Source` schema (one definition; the experiment schema embeds it) and
the readers that turn a source into a deterministic list of documents (strings).

Kinds (`kind="auto"` infers it from the path):
    text          a file, a folder (every non-hidden file, recursively) or a glob; UTF-8
    jsonl         one JSON object per line, the document in `field` (default "text")
    parquet       the string column `field`, read with pyarrow
    array_record  each record is UTF-8 text, or a JSON object whose `field` holds the text
                  (a record is parsed as JSON only if it starts with "{" and has that key)
    builtin       `builtin:<name>`: the embedded corpus of `corpus.py`, needs no files
    image_text    JSONL rows of text with `<|image|>` markers (`field`) and the images they
                  stand for (`images_field`: paths relative to the file, or base64), read by
                  `image_text.py` into memory (not the token store)
    audio_text    JSONL rows of text with `<|audio|>` markers (`field`) and the audio clips
                  they stand for (`audio_field`: paths relative to the file), read by
                  `audio_text.py` into memory (not the token store)
Files of a folder or glob are read in sorted path order; `.gz` text/jsonl files are decompressed.

`split` cuts each record (file, line of jsonl, row, ...) further: "file" keeps it whole,
"paragraph" splits on blank lines, "line" on newlines. Blank documents are dropped.

`min_doc_chars` > 0 makes long documents for long-context stages: consecutive documents (after
`split`) are joined with a blank line until each has at least that many characters (the last
one may be shorter), so packed rows of a long seq_len hold a few long documents instead of many
short ones — synthetic long documents from any source, the embedded corpus included.

Held-out split: a document is eval iff blake2b(its UTF-8 bytes) / 2**64 < eval_fraction.
Hashing the content rather than the index keeps exact duplicates on the same side (no leak of
a repeated document from train into eval) and keeps the split stable when files are added.
"""

from __future__ import annotations

import difflib
import glob
import gzip
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Iterable, Iterator, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..errors import DataError
from . import corpus

SOURCE_KINDS = ("text", "jsonl", "parquet", "array_record", "builtin", "image_text", "audio_text")
# Kinds read into memory with their media (not plain documents, not in the token store).
MEDIA_KINDS = ("image_text", "audio_text")
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
    "image_text": (".jsonl", ".json", ".jsonl.gz"),
    "audio_text": (".jsonl", ".json", ".jsonl.gz"),
}
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_READ_CHUNK = 1024  # array_record records per read call


def resolve_path(value: str, info: ValidationInfo) -> str:
    """Relative paths mean "relative to the YAML file" (validation context `base_dir`), so a run
    does not depend on the cwd; gs:// and s3:// paths are left to the readers that open them."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return os.path.normpath(path) if path.is_absolute() else value


FilePath = Annotated[str, AfterValidator(resolve_path)]


class Source(BaseModel):
    """One named data source of an experiment (the name is its key in `data.sources`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # auto: from the path (`builtin:` prefix, file suffix); the experiment default is text.
    kind: Literal["text", "jsonl", "parquet", "array_record", "builtin", "image_text", "audio_text", "auto"] = "text"
    path: str  # file, directory or glob; for `builtin`, the corpus name (e.g. stdlib_prose)
    field: str = "text"  # jsonl / parquet / array_record / image_text: the record field holding the text
    images_field: str = "images"  # image_text: the field listing the row's images (or one string)
    audio_field: str = "audio"  # audio_text: the field listing the row's audio clips (or one string)
    split: Literal["file", "paragraph", "line"] = "file"  # text: what one document is
    eval_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.01
    min_doc_chars: Annotated[int, Field(ge=0)] = 0  # > 0: join consecutive documents up to this length

    @field_validator("path")
    @classmethod
    def _resolve(cls, path, info: ValidationInfo):
        if info.data.get("kind") != "builtin":
            return resolve_path(path, info)
        names = corpus.builtin_source_names()
        if path not in names:
            close = difflib.get_close_matches(path, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown builtin corpus {path!r}{hint} (builtins: {', '.join(names)})")
        return path

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
        row = 0
        for batch in parquet.iter_batches(columns=[field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{path}: row {row}: column {field!r} is "
                                    f"{type(value).__name__}, not a string")
                row += 1
                if value is not None:
                    yield value


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


def _raw_records(spec: Source) -> Iterable[str]:
    kind = spec.resolved_kind
    if kind in MEDIA_KINDS:
        raise DataError(f"{spec.path}: {kind} sources are read by data/{kind}.py, "
                        "not as plain documents")
    if kind == "builtin":
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


def iter_documents(spec: Source) -> Iterator[str]:
    """Every document of a source, in a deterministic order (train and eval together)."""
    docs = (doc for record in _raw_records(spec) for doc in _split_record(record, spec.split))
    yield from join_documents(docs, spec.min_doc_chars) if spec.min_doc_chars else docs


def join_documents(docs: Iterable[str], min_chars: int) -> Iterator[str]:
    """Consecutive documents joined with a blank line until each has ≥ min_chars characters."""
    parts: list[str] = []
    size = 0
    for doc in docs:
        parts.append(doc)
        size += len(doc) + 2
        if size - 2 >= min_chars:
            yield "\n\n".join(parts)
            parts, size = [], 0
    if parts:
        yield "\n\n".join(parts)


def is_eval_document(text: str, eval_fraction: float) -> bool:
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2.0**64


def load_documents(name: str, spec: Source) -> tuple[list[str], list[str]]:
    """(train, eval) documents of a source; DataError if it has no train documents."""
    train: list[str] = []
    held_out: list[str] = []
    for doc in iter_documents(spec):
        (held_out if is_eval_document(doc, spec.eval_fraction) else train).append(doc)
    if not train:
        raise DataError(f"source {name!r} ({spec.path}) has no training documents")
    return train, held_out
