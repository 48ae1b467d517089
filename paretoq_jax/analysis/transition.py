"""ParetoQ's "learning transition" (Sec. 2.2, Fig. 3): how far QAT moves the weights.

At 3 and 4 bits QAT stays close to the float start ("compensation"): the relative L1 change of
the weights is ~10-20%; at 2 bits and below it "reconstructs" them: ~40%. Two measures:

- relative L1: ``||W_T - W_0||_1 / ||W_0||_1`` of the float (latent) weights, summed over all
  quantized kernels before dividing;
- code-change fraction: the fraction of integer codes ``k`` (``paretoq_jax.quant.to_codes``)
  that differ between the start and the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

__all__ = ["TransitionStats", "relative_l1", "code_change_fraction", "transition_stats"]


def relative_l1(w0: np.ndarray, w1: np.ndarray) -> float:
    """``||w1 - w0||_1 / ||w0||_1`` (float64); 0 when ``w0`` is all zeros and ``w1 == w0``."""
    w0, w1 = _pair(w0, w1)
    num, den = np.abs(w1 - w0).sum(), np.abs(w0).sum()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)


def code_change_fraction(k0: np.ndarray, k1: np.ndarray) -> float:
    """The fraction of integer codes that differ between ``k0`` and ``k1``."""
    k0, k1 = np.asarray(k0), np.asarray(k1)
    if k0.shape != k1.shape:
        raise ValueError(f"code arrays differ in shape: {k0.shape} vs {k1.shape}")
    if k0.size == 0:
        raise ValueError("no codes to compare")
    return float(np.mean(k0 != k1))


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"weight arrays differ in shape: {a.shape} vs {b.shape}")
    return a, b


@dataclasses.dataclass(frozen=True)
class TransitionStats:
    """Movement of all quantized kernels of a model together, and per kernel."""

    relative_l1: float
    codes_changed: float
    per_kernel: dict[str, dict[str, float]]


def transition_stats(
    kernels: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> TransitionStats:
    """Aggregate ``(name, w0, w1, codes0, codes1)`` over kernels.

    The totals weight every weight equally: ``sum |w1 - w0| / sum |w0|`` over all kernels and
    the mean of ``codes0 != codes1`` over all codes.
    """
    num = den = 0.0
    changed = total = 0
    per: dict[str, dict[str, float]] = {}
    for name, w0, w1, k0, k1 in kernels:
        w0, w1 = _pair(w0, w1)
        k0, k1 = np.asarray(k0), np.asarray(k1)
        if k0.shape != k1.shape:
            raise ValueError(f"{name}: code arrays differ in shape: {k0.shape} vs {k1.shape}")
        d, n = float(np.abs(w1 - w0).sum()), float(np.abs(w0).sum())
        c = int(np.count_nonzero(k0 != k1))
        num, den, changed, total = num + d, den + n, changed + c, total + k0.size
        per[name] = {
            "relative_l1": d / n if n else float("nan"),
            "codes_changed": c / k0.size if k0.size else float("nan"),
        }
    if total == 0:
        raise ValueError("no quantized kernels to compare")
    return TransitionStats(num / den if den else float("nan"), changed / total, per)
