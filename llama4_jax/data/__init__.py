"""Data layer: the source schema, tokenizers, document sources, the embedded corpus, the prepared
token store (`store.py`), the mixture pipeline, and the long-tail sampler. See `pipeline.py` for
the batch format and the iterator state."""

from ..errors import DataError
from .corpus import builtin_source_names, load_builtin
from .pipeline import MixtureIterator, build_mixture
from .sampler import LongTailSampler
from .sources import Source, load_documents
from .tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer", "DataError", "HFTokenizer", "LongTailSampler", "MixtureIterator",
    "SentencePieceTokenizer", "Source", "Tokenizer", "build_mixture",
    "builtin_source_names", "load_builtin", "load_documents", "make_tokenizer",
]
