"""Token streams -> fixed-length blocks, and the train/validation split.

A block is ``seq_len`` consecutive tokens of the concatenated stream; blocks do not overlap and
the remainder shorter than a block (at the end of the stream) is dropped. The split, in order of
precedence (see `DataConfig`):

1. ``val_path``: training blocks from ``path``, validation blocks from ``val_path``.
2. ``val_fraction > 0``: hold out ``round(val_fraction * n_docs)`` (at least 1) whole documents,
   chosen by a permutation seeded with ``seed``; each side is concatenated in document order
   and cut into blocks. A single-document corpus holds out that fraction of its tail blocks.
3. ``val_blocks > 0``: the last ``val_blocks`` blocks are validation, the blocks before them
   train (the anchors' split of the default corpus: the last 32 blocks of 256 tokens).
4. otherwise no validation blocks.

Training blocks are ``train_seq_len`` tokens long when that is set (validation blocks always
``seq_len``), so a run can train on shorter sequences and still be scored on the same blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import DataConfig, DataError
from .iterator import permutation
from .sources import resolve_source
from .tokenize import TokenStream, cached_token_stream

__all__ = ["TokenBlocks", "to_blocks", "build_splits"]


class TokenBlocks:
    """An int32 array ``(n_blocks, seq_len)`` of token blocks (often a view of a memory-mapped
    cache file). Indexing and ``np.asarray`` give plain numpy arrays."""

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 2 or array.dtype != np.int32:
            raise ValueError(f"TokenBlocks need an int32 (n, seq_len) array, got {array.dtype}")
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        return np.asarray(self.array[idx])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = np.asarray(self.array)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"TokenBlocks(n_blocks={len(self)}, seq_len={self.seq_len})"

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def seq_len(self) -> int:
        return self.array.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.array.shape[0] * self.array.shape[1]


def to_blocks(tokens: np.ndarray, seq_len: int) -> TokenBlocks:
    """Cut a 1-D token stream into ``len // seq_len`` blocks (a view; the remainder is dropped)."""
    n = len(tokens) // seq_len
    return TokenBlocks(tokens[: n * seq_len].reshape(n, seq_len))


def _gather_docs(stream: TokenStream, docs: np.ndarray) -> np.ndarray:
    off = stream.doc_offsets
    parts = [stream.tokens[off[d] : off[d + 1]] for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _too_short(what: str, n_tokens: int, seq_len: int, need: int, hint: str) -> DataError:
    return DataError(
        f"{what} has {n_tokens} tokens = {n_tokens // seq_len} blocks of seq_len={seq_len}, "
        f"needs at least {need}; {hint}"
    )


def _split(stream: TokenStream, cfg: DataConfig, spec: str) -> tuple[TokenBlocks, TokenBlocks]:
    L, n_tok = cfg.seq_len, int(stream.tokens.size)
    n_blocks = n_tok // L
    if n_blocks < 1:
        raise _too_short(
            f"corpus {spec!r}", n_tok, L, 1, "use a longer corpus or a smaller seq_len"
        )
    if cfg.val_fraction > 0 and stream.num_docs >= 2:
        k = min(max(1, round(cfg.val_fraction * stream.num_docs)), stream.num_docs - 1)
        held = np.zeros(stream.num_docs, bool)
        held[permutation(stream.num_docs, cfg.seed, 0xDA7A)[:k]] = True
        train = to_blocks(_gather_docs(stream, np.flatnonzero(~held)), cfg.train_len)
        val = to_blocks(_gather_docs(stream, np.flatnonzero(held)), L)
        if len(val) == 0:
            raise DataError(
                f"data.val_fraction={cfg.val_fraction} holds out {k} of {stream.num_docs} "
                f"documents of {spec!r}, fewer tokens than one block of {L}; raise val_fraction "
                "or use data.val_blocks"
            )
    else:
        if cfg.val_fraction > 0:
            n_val = max(1, round(cfg.val_fraction * n_blocks))
        else:
            n_val = cfg.val_blocks or 0
        if n_blocks <= n_val:
            raise _too_short(
                f"corpus {spec!r}",
                n_tok,
                L,
                n_val + 1,
                f"{n_val} held out for validation plus 1 to train; use a longer corpus, a smaller "
                "seq_len, fewer validation blocks or data.val_path",
            )
        # validation: the last n_val blocks of L tokens; training: the tokens before them, in
        # blocks of train_len (the same blocks as validation's when train_seq_len is unset)
        cut = (n_blocks - n_val) * L if n_val else n_tok
        train = to_blocks(stream.tokens[:cut], cfg.train_len)
        val = to_blocks(stream.tokens[cut : n_blocks * L], L)
    if len(train) == 0:
        raise _too_short(
            f"training part of {spec!r}",
            train.num_tokens,
            cfg.train_len,
            1,
            "lower val_fraction or data.train_seq_len",
        )
    return train, val


def build_splits(cfg: DataConfig, tokenizer: Any) -> tuple[Any, Any]:
    """Train and validation blocks for ``cfg`` (tokenized once, then served from the cache).

    Raises `DataError` before any training for a missing file, unsupported extension, wrong
    text field, empty corpus or a corpus shorter than the blocks it must provide.
    A prepared dataset (``python -m paretoq_jax.data.prepare``) gives its lazily read
    `PreparedBlocks` instead (see `prepared.prepared_splits`).
    """
    from .prepared import is_prepared, prepared_splits

    if is_prepared(cfg.path):
        return prepared_splits(cfg, tokenizer)
    corpus_cache = None if cfg.cache_dir is None else f"{cfg.cache_dir}/corpora"

    def stream_of(spec: str | None) -> TokenStream:
        return cached_token_stream(
            resolve_source(spec, corpus_cache),
            tokenizer,
            text_field=cfg.text_field,
            add_bos=cfg.add_bos,
            add_eos=cfg.add_eos,
            separator=cfg.separator,
            cache_dir=cfg.cache_dir,
        )

    spec = "default" if cfg.path is None else cfg.path
    stream = stream_of(spec)
    if cfg.val_path:
        train = to_blocks(stream.tokens, cfg.train_len)
        if len(train) == 0:
            raise _too_short(f"corpus {spec!r}", stream.tokens.size, cfg.train_len, 1, "")
        vstream = stream_of(cfg.val_path)
        val = to_blocks(vstream.tokens, cfg.seq_len)
        if len(val) == 0:
            raise _too_short(
                f"validation corpus {cfg.val_path!r}",
                vstream.tokens.size,
                cfg.seq_len,
                1,
                "use a longer validation corpus or a smaller seq_len",
            )
    else:
        train, val = _split(stream, cfg, spec)
    if cfg.max_val_blocks is not None and len(val) > cfg.max_val_blocks:
        val = TokenBlocks(val.array[: cfg.max_val_blocks])
    return train, val
