"""Named data sources for the data tests: the experiment holds sources in a `name → Source`
mapping; these tests build them one at a time, with kind `auto` (inferred from the path)."""

from __future__ import annotations

from typing import NamedTuple

from llama4_jax.data import load_documents
from llama4_jax.data.sources import Source


class Named(NamedTuple):
    name: str
    source: Source


def named(name, path, **kw) -> Named:
    return Named(name, Source(kind=kw.pop("kind", "auto"), path=path, **kw))


def load_docs(src: Named):
    return load_documents(src.name, src.source)
