"""The data section of the training config (``data.*``) and the pipeline's error type."""

from __future__ import annotations

import dataclasses

from paretoq_jax.errors import ParetoQError

__all__ = ["DataConfig", "DataError"]


class DataError(ParetoQError, ValueError):
    """A corpus or data setting that cannot produce training data; raised before training."""


@dataclasses.dataclass
class DataConfig:
    """Where the text comes from, how it becomes token blocks, and which blocks are held out.

    path: a local file or folder (``.txt``, ``.jsonl``, ``.json``, ``.parquet``), a Hugging Face
        dataset name (``name``, ``name:config``, ``name@split``) where a hub is reachable, or
        ``"default"`` (the embedded Wikipedia sample) / ``"default:shakespeare"``. ``None`` means
        ``"default"``. Or a prepared dataset (``python -m paretoq_jax.data.prepare``: a folder
        with a ``manifest.json``, or a ``gs://`` / ``s3://`` URL): its recorded split is used,
        and what shapes its tokens and split (text_field, add_bos/eos, separator, val_fraction,
        val_blocks, seed, cache_dir) was fixed when preparing; val_path must be unset.
    text_field: the field holding the text in ``.jsonl``/``.json``/``.parquet``/hub rows.
    seq_len: tokens per block (one training sequence, and one validation block).
    train_seq_len: tokens per *training* block when it should differ from ``seq_len``;
        validation blocks keep ``seq_len``, so runs that train on shorter (or longer) sequences
        are scored on the same held-out blocks. ``None``: ``seq_len``.
    val_path: validation corpus (same forms as ``path``); when set nothing is held out of ``path``.
    val_fraction: if > 0 (and no ``val_path``), hold out this fraction of the documents (chosen
        with ``seed``); a corpus of a single document holds out this fraction of its tail blocks.
    val_blocks: if no ``val_path`` and ``val_fraction == 0``: the last ``val_blocks`` blocks of the
        token stream are validation, training uses the blocks before them (the anchors' split:
        the last 32 blocks of 256 tokens). ``0``/``None``: no validation split.
    seed: seed of the document hold-out (the batch order has its own seed in ``BatchIterator``).
    add_bos / add_eos: put the tokenizer's BOS / EOS token before / after every document
        (ParetoQ adds neither).
    separator: text appended to every document before tokenization, so documents do not run
        into each other; ``""`` concatenates the raw texts.
    cache_dir: token cache folder (default ``$PARETOQ_CACHE/tokens``, i.e.
        ``~/.cache/paretoq_jax/tokens``).
    shuffle: shuffle training blocks (read by the trainer when building its ``BatchIterator``).
    max_val_blocks: use at most this many validation blocks (the first ones), to bound eval time.
    """

    path: str | None = "default"
    text_field: str = "text"
    seq_len: int = 256
    train_seq_len: int | None = None
    val_path: str | None = None
    val_fraction: float = 0.0
    val_blocks: int | None = 32
    seed: int = 0
    add_bos: bool = False
    add_eos: bool = False
    separator: str = "\n\n"
    cache_dir: str | None = None
    shuffle: bool = True
    max_val_blocks: int | None = None

    @property
    def train_len(self) -> int:
        """Tokens per training block (``train_seq_len``, else ``seq_len``)."""
        return self.seq_len if self.train_seq_len is None else self.train_seq_len

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise DataError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.train_seq_len is not None and self.train_seq_len < 1:
            raise DataError(
                f"data.train_seq_len must be >= 1 or null (= seq_len), got {self.train_seq_len}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_blocks is not None and self.val_blocks < 0:
            raise DataError(f"data.val_blocks must be >= 0 or null, got {self.val_blocks}")
        if self.max_val_blocks is not None and self.max_val_blocks < 0:
            raise DataError(f"data.max_val_blocks must be >= 0 or null, got {self.max_val_blocks}")
