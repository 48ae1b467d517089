"""Data pipeline: corpora -> cached token stream -> fixed-length blocks -> resumable batches.

    train, val = build_splits(DataConfig(path="default", seq_len=256), tokenizer)
    it = BatchIterator(train, global_batch_size=4, seed=0)
    batch = it.next()            # int32 (4, 256)
    saved = it.state.to_dict()   # {"epoch": 0, "position": 4}: store it in the checkpoint

A corpus prepared once (``python -m paretoq_jax.data.prepare``) is read lazily, chunk by chunk:
``build_splits(cfg, tokenizer)`` returns its blocks when ``cfg.path`` names one.

See docs/data.md for sources, the cache, the split and the batch order.
"""

from .blocks import TokenBlocks, build_splits, to_blocks
from .config import DataConfig, DataError
from .corpora import DEFAULT_CORPORA, default_corpus
from .iterator import BatchIterator, IteratorState, permutation
from .prepared import (
    ChunkError,
    Prefetcher,
    PreparedBlocks,
    PreparedDataError,
    PreparedDataset,
    TokenizerMismatchError,
    is_prepared,
    prepared_splits,
)
from .sources import SUPPORTED_EXTENSIONS, read_documents, resolve_source
from .tokenize import cached_token_stream, encode_documents, tokenizer_fingerprint
from .wikitext import iter_wiki_articles, strip_wiki_markup

__all__ = [
    "DataConfig",
    "DataError",
    "TokenBlocks",
    "build_splits",
    "to_blocks",
    "BatchIterator",
    "IteratorState",
    "permutation",
    "ChunkError",
    "PreparedBlocks",
    "PreparedDataError",
    "PreparedDataset",
    "Prefetcher",
    "TokenizerMismatchError",
    "is_prepared",
    "prepared_splits",
    "DEFAULT_CORPORA",
    "default_corpus",
    "SUPPORTED_EXTENSIONS",
    "resolve_source",
    "read_documents",
    "cached_token_stream",
    "encode_documents",
    "tokenizer_fingerprint",
    "iter_wiki_articles",
    "strip_wiki_markup",
]
