"""What a sweep measures on one cell: validation perplexity, model size, weight movement.

The model at a checkpoint is rebuilt with the trainer's own pieces (``build_model``, the optimizer
and state shardings) and restored from ``RUN_DIR/checkpoints``; the start of training (for the
learning-transition numbers) is the model as the trainer builds it before step 1: the loaded
float weights with freshly initialized scales, or the seeded random init.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.analysis import TransitionStats, transition_stats
from paretoq_jax.train.config import RunConfig
from paretoq_jax.train.restore import checkpoint_steps as _run_checkpoint_steps
from paretoq_jax.train.restore import restore_params, set_params

__all__ = [
    "build_start_model",
    "restore_params",
    "set_params",
    "quantized_arrays",
    "codes_of",
    "movement",
    "validation_loss",
]


def checkpoint_steps(cfg: RunConfig) -> list[int]:
    """Steps of the complete checkpoints in ``cfg.run_dir`` (ascending)."""
    return _run_checkpoint_steps(cfg.run_dir)


def build_start_model(cfg: RunConfig, mesh: jax.sharding.Mesh) -> nnx.Module:
    """The model exactly as the trainer builds it before its first step."""
    from paretoq_jax.train.loop import build_model

    return build_model(cfg, mesh)


def quantized_arrays(model: nnx.Module, params: dict) -> dict[str, tuple[Any, Any, Any]]:
    """``{path: (kernel, scale or None, spec)}`` for every quantized projection in ``params``."""
    from paretoq_jax.train.metrics import quantized_kernels

    out = {}
    for path, spec in quantized_kernels(model).items():
        node = params
        for k in path:
            node = node[k]
        out[".".join(map(str, path))] = (node["kernel"], node.get("scale"), spec)
    return out


def codes_of(kernel, scale, spec) -> np.ndarray:
    """Integer codes of a (possibly stacked) kernel, as int8 numpy."""
    return np.asarray(jax.device_get(quant.to_codes(kernel, scale, spec)))


def movement(start: dict[str, tuple], end: dict[str, tuple]) -> TransitionStats:
    """Relative L1 movement and code-change fraction from ``start`` to ``end`` (both from
    :func:`quantized_arrays`)."""

    def rows():
        for name, (w0, s0, spec) in start.items():
            w1, s1, _ = end[name]
            yield (
                name,
                np.asarray(jax.device_get(w0)),
                np.asarray(jax.device_get(w1)),
                codes_of(w0, s0, spec),
                codes_of(w1, s1, spec),
            )

    return transition_stats(rows())


def validation_loss(model: nnx.Module, blocks: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mean next-token NLL over the validation blocks and its perplexity ``exp(nll)``.

    The same token loss as training (``paretoq_jax.train.step.token_nll_sum``): every position
    but the last of a block predicts the next token. The last batch is padded with masked rows.
    """
    from paretoq_jax.train.step import split_batch, token_nll_sum

    blocks = np.asarray(blocks, np.int32)
    if blocks.ndim != 2 or len(blocks) == 0:
        raise ValueError(
            "no validation blocks: set data.val_blocks (or data.val_path / data.val_fraction) "
            "in the training config so the sweep can measure perplexity"
        )

    @nnx.jit
    def nll(model, tokens, mask):
        data = split_batch(tokens, mask)
        return token_nll_sum(model(data["inputs"]), data["labels"], data["mask"])

    total = count = 0.0
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i : i + batch_size]
        mask = np.ones_like(chunk)
        if len(chunk) < batch_size:  # pad: one compiled shape for every batch
            pad = batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)])
            mask = np.concatenate([mask, np.zeros((pad, chunk.shape[1]), np.int32)])
        s, n = nll(model, jnp.asarray(chunk), jnp.asarray(mask))
        total, count = total + float(s), count + float(n)
    loss = total / count
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss) if loss < 700 else float("inf"),
        "val_tokens": int(count),
    }
