"""Data layer: tokenizers, document sources, the embedded corpus, the mixture pipeline, and the
long-tail sampler. See `pipeline.py` for the batch format and the iterator state."""

from llama4_jax.data.corpus import builtin_source_names, load_builtin
from llama4_jax.data.pipeline import MixtureIterator, build_mixture
from llama4_jax.data.sampler import LongTailSampler
from llama4_jax.data.sources import DataError, SourceSpec, load_documents
from llama4_jax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    make_tokenizer,
)

__all__ = [
    "ByteTokenizer", "DataError", "HFTokenizer", "LongTailSampler", "MixtureIterator",
    "SentencePieceTokenizer", "SourceSpec", "Tokenizer", "build_mixture",
    "builtin_source_names", "load_builtin", "load_documents", "make_tokenizer",
]
