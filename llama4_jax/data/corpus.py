"""The embedded default corpus: text every Python installation already has (no downloads).

Built from the standard library directory (`sysconfig.get_paths()["stdlib"]`), never from
site-packages, dist-packages, __pycache__, lib-dynload, config-* or bundled wheels:

    stdlib_prose  one document per module: its module/class/function docstrings (read with `ast`)
                  under "# module" / "## Qualified.name" headers; test packages are skipped.
                  Plus pydoc's topic pages (the language reference shipped with pydoc) and any
                  .txt/.rst files outside test folders.
    stdlib_code   the source of stdlib modules, docstrings and comments kept; test packages and
                  files over 128 KB (generated tables, pydoc topics) are skipped.
    stdlib_rare   material a model seldom sees:
                  - non-Python text files shipped with the stdlib, test data included (decimal
                    test vectors, xml/json/toml/cfg/pem samples, ...), each cut at 16 KB;
                  - the byte → character → Unicode name table of every charmap codec in
                    `encodings` (cp437, koi8_r, mac_roman, ...);
                  - Unicode character name tables in blocks of 128 code points (names that just
                    spell the code point, like CJK ideographs, are left out).

Each source (or part) has a byte budget. When the candidates exceed it, a deterministic
subset is kept by ordering candidates on a hash of their path/key (a spread over the whole
library rather than the alphabetically first modules), then restoring path order. File walks are
sorted, so a build is a pure function of the stdlib on disk.

The first load builds (a few seconds) and caches the documents as JSON in
`$LLAMA4_JAX_CACHE/corpus/py<major>.<minor>/` (default root `~/.cache/llama4_jax`), written
atomically (temp file + rename). The file records the exact Python version and a format
version; a mismatch rebuilds.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import pkgutil
import sys
import sysconfig
import tempfile
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Iterator

from ..errors import DataError

CORPUS_VERSION = 1
MB = 1 << 20
PROSE_BUDGET = 4 * MB
CODE_BUDGET = 4 * MB
RARE_FILES_BUDGET = 3 * MB // 2
RARE_CODECS_BUDGET = 1 * MB
RARE_UNICODE_BUDGET = 3 * MB // 2
MAX_CODE_FILE = 128 * 1024
MAX_RARE_FILE = 16 * 1024
UNICODE_BLOCK = 128

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "_bundled"}
_TEST_DIRS = {"test", "tests", "idle_test"}
_BINARY_SUFFIXES = {".py", ".pyc", ".pyo", ".so", ".pyd", ".dll", ".whl", ".zip", ".tar", ".gz",
                    ".bz2", ".xz", ".png", ".gif", ".jpg", ".bmp", ".ico", ".wav", ".au", ".aif",
                    ".aiff", ".aifc", ".exe", ".a"}


def builtin_source_names() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(include_tests: bool) -> list[tuple[str, Path]]:
    """(relative posix path, path) of stdlib files in sorted order."""
    root = _stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith(("config-", "."))
            and (include_tests or d not in _TEST_DIRS))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    return found


def _key_hash(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()


def _fit_budget(items: list[tuple[str, str]], budget: int) -> list[str]:
    """Documents of (key, text) items that fit in `budget` bytes, chosen by key hash, in key order."""
    kept, used = [], 0
    for key, text in sorted(items, key=lambda item: _key_hash(item[0])):
        size = len(text.encode("utf-8"))
        if used + size <= budget:
            kept.append((key, text))
            used += size
    return [text for _, text in sorted(kept)]


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse(path: Path) -> ast.Module | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes in old modules warn on parse
        try:
            return ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            return None  # e.g. lib2to3 fixtures written in Python 2


def _docstrings(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            doc = ast.get_docstring(child)
            if doc:
                yield name, doc
            yield from _docstrings(child, f"{name}.")


def _module_prose(rel: str, path: Path) -> str | None:
    tree = _parse(path)
    if tree is None:
        return None
    sections = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        sections.append(module_doc)
    sections += [f"## {name}\n{doc}" for name, doc in _docstrings(tree, "")]
    if not sections:
        return None
    return f"# {_module_name(rel)}\n\n" + "\n\n".join(sections)


def _pydoc_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        return []
    return [(f"~pydoc/{key}", f"{key}\n\n{topics[key]}") for key in sorted(topics)]


def build_prose() -> list[str]:
    items = []
    for rel, path in _stdlib_files(include_tests=False):
        if rel.endswith(".py") and not rel.startswith("pydoc_data/"):
            text = _module_prose(rel, path)
        elif rel.endswith((".txt", ".rst")):
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            continue
        if text and text.strip():
            items.append((rel, text))
    return _fit_budget(items + _pydoc_topics(), PROSE_BUDGET)


def build_code() -> list[str]:
    items = []
    for rel, path in _stdlib_files(include_tests=False):
        if rel.endswith(".py") and path.stat().st_size <= MAX_CODE_FILE:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                items.append((rel, text))
    return _fit_budget(items, CODE_BUDGET)


def _read_small_text(path: Path) -> str | None:
    """The file's text cut at MAX_RARE_FILE on a line boundary, or None if it looks binary."""
    with open(path, "rb") as f:
        data = f.read(MAX_RARE_FILE)
    if not data or b"\0" in data:
        return None
    if len(data) == MAX_RARE_FILE and b"\n" in data:
        data = data[: data.rindex(b"\n") + 1]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _rare_files() -> list[str]:
    items = []
    for rel, path in _stdlib_files(include_tests=True):
        if path.suffix.lower() in _BINARY_SUFFIXES:
            continue
        text = _read_small_text(path)
        if text and text.strip():
            items.append((rel, f"{rel}\n\n{text}"))
    return _fit_budget(items, RARE_FILES_BUDGET)


def _char_line(prefix: str, char: str) -> str | None:
    name = unicodedata.name(char, "")
    return f"{prefix}\t{char}\t{name}" if name else None


def _codec_tables() -> list[str]:
    import encodings

    items = []
    for module_info in sorted(pkgutil.iter_modules(encodings.__path__), key=lambda m: m.name):
        try:
            module = importlib.import_module(f"encodings.{module_info.name}")
        except ImportError:  # platform-specific codecs (mbcs, oem) exist only on Windows
            continue
        table = getattr(module, "decoding_table", None)
        if not isinstance(table, str):
            continue
        # The ASCII half is the same in almost every table; keep only what the codec changes.
        lines = [_char_line(f"0x{byte:02X}", ch) for byte, ch in enumerate(table)
                 if ch != "\ufffe" and (byte >= 0x80 or ch != chr(byte))]
        body = "\n".join(line for line in lines if line)
        items.append((module_info.name, f"codec {module_info.name}: byte, character, name\n{body}"))
    return _fit_budget(items, RARE_CODECS_BUDGET)


def _unicode_tables() -> list[str]:
    items = []
    for start in range(0, sys.maxunicode + 1, UNICODE_BLOCK):
        lines = []
        for cp in range(start, start + UNICODE_BLOCK):
            line = _char_line(f"U+{cp:04X}", chr(cp))
            # Names that merely spell the code point (CJK UNIFIED IDEOGRAPH-4E00) teach nothing.
            if line and f"{cp:04X}" not in line.rsplit("\t", 1)[1]:
                lines.append(line)
        if lines:
            header = f"Unicode {unicodedata.unidata_version}, U+{start:04X} to U+{start + UNICODE_BLOCK - 1:04X}"
            items.append((f"{start:06X}", header + "\n" + "\n".join(lines)))
    return _fit_budget(items, RARE_UNICODE_BUDGET)


def build_rare() -> list[str]:
    return _rare_files() + _codec_tables() + _unicode_tables()


_BUILDERS: dict[str, Callable[[], list[str]]] = {
    "stdlib_prose": build_prose,
    "stdlib_code": build_code,
    "stdlib_rare": build_rare,
}


def corpus_cache_dir(cache_root: str | os.PathLike | None = None) -> Path:
    root = cache_root or os.environ.get("LLAMA4_JAX_CACHE") or Path.home() / ".cache" / "llama4_jax"
    return Path(root) / "corpus" / f"py{sys.version_info.major}.{sys.version_info.minor}"


def _stamp() -> dict:
    return {"corpus_version": CORPUS_VERSION, "python": list(sys.version_info[:3])}


def builtin_stamp() -> dict:
    """What identifies the builtin corpora's content (the token store compares it)."""
    return _stamp()


def _read_cache(path: Path) -> list[str] | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if {k: payload.get(k) for k in _stamp()} != _stamp():
        return None
    return payload.get("documents")


def _write_cache(path: Path, documents: list[str]) -> None:
    """Atomic write, so a concurrent reader (another host process) never sees half a file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**_stamp(), "documents": documents}, f, ensure_ascii=False)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs a rebuild next time
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"could not cache the builtin corpus at {path}: {e}")


def load_builtin(name: str, cache_root: str | os.PathLike | None = None) -> list[str]:
    """Documents of builtin source `name`, from the cache or built (and cached) now."""
    if name not in _BUILDERS:
        raise DataError(f"unknown builtin source {name!r}; available: "
                        f"{', '.join(builtin_source_names())}")
    path = corpus_cache_dir(cache_root) / f"{name}.json"
    documents = _read_cache(path)
    if documents is None:
        documents = _BUILDERS[name]()
        _write_cache(path, documents)
    return documents
