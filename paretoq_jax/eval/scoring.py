"""Token log-likelihoods of many token windows: the batched, jitted kernel behind perplexity,
multiple choice and the lm-evaluation-harness adapter.

A *window* is a token sequence ``tokens`` and an index ``score_from >= 1``: the kernel feeds the
whole window to the model and scores the predictions of ``tokens[score_from:]`` (the token at
``t`` is predicted by the logits at ``t - 1``, as in causal-LM training). For each window it
returns the summed negative log-likelihood, the number of scored tokens, and whether every
scored token was the argmax prediction (lm-eval's ``is_greedy``).

The negative log-likelihood of a token is ``logsumexp(z) - z[label]`` (no log-softmax over the
vocabulary is stored). Logits are computed from the final hidden states in chunks of positions,
so at most ``(batch, chunk, vocab)`` logits exist at a time. Windows are right-padded to a
common (bucketed) length and batches to a fixed ``batch_size`` with masked rows, so one
compilation serves every batch of a given length. With a ``mesh`` the batch is sharded over its
data-parallel axes (``data``, ``fsdp``); the sums are the same on any number of devices.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["Window", "score_windows", "BATCH_AXES"]

BATCH_AXES = ("data", "fsdp")
LOGIT_CHUNK = 128  # positions whose logits exist at once (per batch row)

Window = tuple[Sequence[int], int]  # (tokens, score_from)


def _chunk_size(seq: int) -> int:
    if seq <= LOGIT_CHUNK:
        return seq
    for c in range(LOGIT_CHUNK, 0, -1):
        if seq % c == 0:
            return c
    return seq


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _score_batch(graphdef, state, ids, targets, mask, *, chunk):
    """Per-row (sum of masked NLL, masked count, all masked tokens greedy) for one batch."""
    model = nnx.merge(graphdef, state)
    hidden = model(ids, return_hidden=True)  # (B, S, D)
    b, s, d = hidden.shape
    n = s // chunk

    def one(xs):
        h, t = xs  # (B, C, D), (B, C)
        logits = model.lm_logits(h).astype(jnp.float32)  # (B, C, V)
        lse = jax.nn.logsumexp(logits, axis=-1)
        label = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logits, axis=-1) == t
        return lse - label, greedy

    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    nll, greedy = jax.lax.map(one, (split(hidden), split(targets)))
    nll = jnp.moveaxis(nll, 0, 1).reshape(b, s)
    greedy = jnp.moveaxis(greedy, 0, 1).reshape(b, s)
    m = mask.astype(jnp.float32)
    return (
        jnp.sum(nll * m, axis=1),
        jnp.sum(m, axis=1),
        jnp.all(greedy | (mask == 0), axis=1),
    )


def _bucket(n: int, cap: int | None) -> int:
    """Pad length for a window of ``n`` tokens: the next multiple of 32 (of 128 above 512)."""
    step = 32 if n <= 512 else 128
    b = -(-n // step) * step
    return b if cap is None else max(n, min(b, cap))


def score_windows(
    model: nnx.Module,
    windows: Sequence[Window],
    *,
    batch_size: int = 8,
    pad_to: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score ``windows``; returns float64 NLL sums, int counts and bool greedy flags (one each
    per window, in input order).

    ``pad_to``: pad every window to exactly this length (one compilation; perplexity uses it);
    otherwise windows are sorted by length and padded to bucketed lengths. ``mesh``: shard each
    batch over the mesh's ``data``/``fsdp`` axes (``batch_size`` is rounded up to a multiple of
    their size); the model should already be placed on that mesh
    (:func:`paretoq_jax.sharding.shard_model`, or ``load_pretrained(..., mesh=mesh)``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(windows)
    lengths = np.array([len(t) for t, _ in windows], dtype=np.int64)
    for i, (toks, start) in enumerate(windows):
        if not 1 <= start <= len(toks):
            raise ValueError(
                f"window {i}: score_from={start} must be in [1, {len(toks)}] (the first token "
                "has no prediction; give it context, e.g. a BOS token)"
            )
    if pad_to is not None and n and lengths.max() > pad_to:
        raise ValueError(f"a window has {lengths.max()} tokens, more than pad_to={pad_to}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and n and lengths.max() > max_pos:
        raise ValueError(
            f"a window has {lengths.max()} tokens but the model's context is {max_pos}; use a "
            "shorter seq_len / max_length"
        )
    sharding = None
    if mesh is not None:
        shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
        batch_size = -(-batch_size // shards) * shards
        sharding = NamedSharding(mesh, P(BATCH_AXES))
    graphdef, state = nnx.split(model)
    nll = np.zeros(n, np.float64)
    count = np.zeros(n, np.int64)
    greedy = np.zeros(n, bool)
    order = np.argsort(-lengths, kind="stable") if pad_to is None else np.arange(n)
    for lo in range(0, n, batch_size):
        rows = order[lo : lo + batch_size]
        seq = pad_to if pad_to is not None else _bucket(int(lengths[rows].max()), max_pos)
        ids = np.zeros((batch_size, seq), np.int32)
        targets = np.zeros((batch_size, seq), np.int32)
        mask = np.zeros((batch_size, seq), np.int32)
        for r, w in enumerate(rows):
            toks, start = windows[w]
            toks = np.asarray(toks, np.int32)
            ids[r, : len(toks)] = toks
            targets[r, : len(toks) - 1] = toks[1:]
            mask[r, start - 1 : len(toks) - 1] = 1
        arrays = (ids, targets, mask)
        if sharding is not None:  # every process holds the same batch: each places its shards
            arrays = tuple(
                jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in arrays
            )
        out = _score_batch(graphdef, state, *arrays, chunk=_chunk_size(seq))
        if jax.process_count() > 1:  # rows sharded over processes: gather them everywhere
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        s, c, g = (np.asarray(x) for x in jax.device_get(out))
        k = len(rows)
        nll[rows], count[rows], greedy[rows] = s[:k], c[:k].round().astype(np.int64), g[:k]
    return nll, count, greedy
