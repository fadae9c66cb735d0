"""`llama4-jax data inspect DIR`: a token store's manifest as a table and decoded sample rows per
source, packed exactly as training packs them (what the model will read)."""

from __future__ import annotations

import os
from pathlib import Path

from .pipeline import PackedStream, pack_row
from .store import StoreDocs, open_store_sources
from .tokenizer import ByteTokenizer, Tokenizer


def _tokenizer_for(manifest: dict, tokenizer: Tokenizer | None):
    """The given tokenizer, or the one the manifest names if it can be rebuilt (byte), else None."""
    if tokenizer is not None:
        return tokenizer
    return ByteTokenizer() if manifest["tokenizer"]["fingerprint"] == ByteTokenizer.fingerprint else None


def inspect_store(store_dir: str | os.PathLike, *, tokenizer: Tokenizer | None = None, rows: int = 2,
                  seq_len: int = 256, seed: int = 0, console=None) -> None:
    """Prints the store's manifest as a table and `rows` decoded training rows per source (the
    first rows of epoch 0 under `seed`: what the model reads first)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if os.isatty(1) else 160)
    sources = open_store_sources(store_dir)
    table = Table(title=f"token store {store_dir}")
    for col in ("source", "path", "files", "train docs", "train tokens", "eval docs", "eval tokens",
                "dtype", "tokenizer"):
        table.add_column(col, justify="right" if "docs" in col or "tokens" in col or col == "files" else "left")
    for name, m in sources.items():
        tr, ev = m["splits"]["train"], m["splits"]["eval"]
        table.add_row(name, str(m["path"]), str(len(m["inputs"])), f"{tr['docs']:,}", f"{tr['tokens']:,}",
                      f"{ev['docs']:,}", f"{ev['tokens']:,}", m["dtype"], m["tokenizer"]["fingerprint"])
    console.print(table)
    for name, m in sources.items():
        tok = _tokenizer_for(m, tokenizer)
        docs = StoreDocs(Path(store_dir) / name, "train", m)
        stream = PackedStream(docs, seed=seed, name=name, shuffle=True, pad_id=m["tokenizer"]["pad_id"])
        for r in range(rows):
            row = pack_row(stream, r * seq_len, seq_len)
            ids = row["inputs"].tolist()
            text = tok.decode(ids) if tok is not None else " ".join(map(str, ids))
            console.rule(f"{name} row {r} (tokens {r * seq_len}..{(r + 1) * seq_len})")
            console.print(text, markup=False, highlight=False)
