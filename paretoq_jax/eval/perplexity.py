"""Perplexity of a causal LM over a token stream: non-overlapping blocks or a strided window.

Two protocols (docs/evaluation.md):

- **blocks** (ParetoQ's, and the trainer's validation): the stream is cut into non-overlapping
  blocks of ``seq_len`` tokens (the remainder is dropped); each block is one forward pass and
  its tokens ``1 .. seq_len-1`` are scored from the tokens before them in the block.
- **strided** (Hugging Face's sliding-window recipe): windows of up to ``seq_len`` tokens start
  every ``stride`` tokens; each window scores only the tokens the previous window did not, so
  every token after the first is scored exactly once, with up to ``seq_len - 1`` tokens of
  context (at least ``seq_len - stride``).

``loss`` is the mean negative log-likelihood (nats) over scored tokens and
``perplexity = exp(loss)``. Both are token-weighted means, which for equal blocks equals the
mean of per-block losses that ParetoQ averages. Overflow: ``exp`` of a loss above ~709.78 nats
does not fit a float64; the perplexity is then ``inf`` (never capped), and a NaN loss gives a
NaN perplexity (:func:`perplexity_from_loss`).

:func:`validation_perplexity` is the one validation measure of the project: the trainer's
``val_loss``/``val_ppl`` every ``train.logging.eval_every`` steps, a sweep cell's, and
``python -m paretoq_jax.eval --data`` on the same blocks all come from it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .scoring import Window, score_windows

__all__ = [
    "perplexity",
    "perplexity_from_loss",
    "validation_perplexity",
    "block_windows",
    "strided_windows",
]


def perplexity_from_loss(loss: float) -> float:
    """``exp(loss)``; ``inf`` when that overflows a float (loss > ~709.78 nats), NaN for NaN."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def block_windows(tokens: np.ndarray, seq_len: int) -> list[Window]:
    """Non-overlapping blocks of ``seq_len`` tokens, each scoring its tokens ``1..seq_len-1``."""
    n = len(tokens) // seq_len
    return [(tokens[i * seq_len : (i + 1) * seq_len], 1) for i in range(n)]


def strided_windows(tokens: np.ndarray, seq_len: int, stride: int) -> list[Window]:
    """HF's sliding window: window ``[begin, begin + seq_len)`` for ``begin = 0, stride, ...``
    scores the tokens after the previous window's end, so each token is scored once."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, max(len(tokens) - 1, 1), stride):
        end = min(begin + seq_len, len(tokens))
        out.append((tokens[begin:end], max(prev_end - begin, 1)))
        prev_end = end
        if end == len(tokens):
            break
    return out


def perplexity(
    model: nnx.Module,
    data: Any,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    stride: int | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``data``; returns a dict with ``perplexity``, ``loss`` (mean
    NLL in nats), ``tokens`` (scored tokens), ``windows``, ``seq_len``, ``stride``, ``protocol``.

    ``data``: token blocks ``(n, seq_len)`` (a ``paretoq_jax.data.TokenBlocks`` or 2-D int
    array, e.g. the validation split of ``build_splits``) or a 1-D token stream.
    Without ``stride``: the blocks protocol (a stream is cut into blocks of ``seq_len``; blocks
    keep their own length, ``seq_len`` must match it if given). With ``stride``: the strided
    protocol over the stream (blocks are concatenated back into one stream first).
    ``batch_size``: windows per forward pass (the last batch is padded and masked).
    ``mesh``: shard batches over its ``data``/``fsdp`` axes; the model must be placed on it.

    From the trainer, every N steps (``graphdef, _, rest = nnx.split(model, nnx.Param, ...)``
    and the train state's pure-dict params)::

        model = nnx.merge(graphdef, state["params"], rest)
        row = perplexity(model, val_blocks, batch_size=B, mesh=mesh)
        writer.write({"step": step, "val_loss": row["loss"], "val_ppl": row["perplexity"]})
    """
    arr = np.asarray(data)
    if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"data must be int token blocks (n, seq_len) or a 1-D token stream, got "
            f"{arr.dtype} {arr.shape}"
        )
    if arr.ndim == 2 and stride is None:
        if seq_len is not None and seq_len != arr.shape[1]:
            raise ValueError(
                f"blocks have {arr.shape[1]} tokens but seq_len={seq_len}; pass seq_len=None "
                "or re-cut the token stream"
            )
        seq_len = arr.shape[1]
        windows = [(arr[i], 1) for i in range(arr.shape[0])]
    else:
        stream = arr.reshape(-1)
        if seq_len is None:
            seq_len = arr.shape[1] if arr.ndim == 2 else 1024
        if stride is None:
            windows = block_windows(stream, seq_len)
        else:
            windows = strided_windows(stream, seq_len, stride)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a block scores seq_len - 1 tokens), got {seq_len}")
    if not windows:
        raise ValueError(
            f"{arr.size} tokens give no window of seq_len={seq_len}; use more text or a smaller "
            "seq_len"
        )
    nll, count, _ = score_windows(model, windows, batch_size=batch_size, pad_to=seq_len, mesh=mesh)
    total, tokens = float(nll.sum()), int(count.sum())
    if tokens == 0:
        raise ValueError(f"{arr.size} tokens leave nothing to score; use more text")
    loss = total / tokens
    return {
        "perplexity": perplexity_from_loss(loss),
        "loss": loss,
        "tokens": tokens,
        "windows": len(windows),
        "seq_len": int(seq_len),
        "stride": stride,
        "protocol": "blocks" if stride is None else "strided",
    }


def validation_perplexity(
    model: nnx.Module, blocks: Any, *, batch_size: int = 8, mesh: Mesh | None = None
) -> dict[str, float]:
    """``{"val_loss", "val_ppl", "val_tokens"}`` of ``model`` on validation ``blocks`` (2-D,
    ``(n, seq_len)``): the blocks protocol of :func:`perplexity`, the training loss's
    next-token NLL within each block. Used by the trainer, sweeps and evaluation alike.
    Raises ``ValueError`` when there are no blocks."""
    arr = np.asarray(blocks)
    if arr.ndim != 2 or len(arr) == 0:
        raise ValueError(
            "no validation blocks: set data.val_blocks (or data.val_path / data.val_fraction) "
            "in the training config"
        )
    row = perplexity(model, arr, batch_size=batch_size, mesh=mesh)
    return {"val_loss": row["loss"], "val_ppl": row["perplexity"], "val_tokens": row["tokens"]}
