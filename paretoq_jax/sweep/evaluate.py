"""What a sweep measures on one cell: validation perplexity, model size, weight movement.

The model at a checkpoint is rebuilt with the trainer's own pieces (``build_model``, the optimizer
and state shardings) and restored from ``RUN_DIR/checkpoints``; the start of training (for the
learning-transition numbers) is the model as the trainer builds it before step 1: the loaded
float weights with freshly initialized scales, or the seeded random init.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.analysis import TransitionStats, transition_stats
from paretoq_jax.eval.perplexity import validation_perplexity
from paretoq_jax.run.build import build_model
from paretoq_jax.run.config import RunConfig
from paretoq_jax.run.restore import checkpoint_steps as _run_checkpoint_steps
from paretoq_jax.run.restore import restore_params, set_params
from paretoq_jax.train.metrics import quantized_kernels

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
    return build_model(cfg, mesh)


def quantized_arrays(model: nnx.Module, params: dict) -> dict[str, tuple[Any, Any, Any]]:
    """``{path: (kernel, scale or None, spec)}`` for every quantized projection in ``params``."""
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
    """``{"val_loss", "val_ppl", "val_tokens"}``: :func:`paretoq_jax.eval.perplexity.
    validation_perplexity`, the trainer's and ``eval``'s measure (same overflow: ``inf``)."""
    if np.asarray(blocks).ndim != 2 or len(blocks) == 0:
        raise ValueError(
            "no validation blocks: set data.val_blocks (or data.val_path / data.val_fraction) "
            "in the training config so the sweep can measure perplexity"
        )
    return validation_perplexity(model, blocks, batch_size=batch_size)
