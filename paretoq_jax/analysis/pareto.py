"""The Pareto frontier of (cost, quality) points: ParetoQ's accuracy-vs-model-size curve."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["pareto_frontier"]


def pareto_frontier(
    sizes: Sequence[float], values: Sequence[float], *, minimize: bool = True
) -> list[int]:
    """Indices of the points no other point dominates, sorted by increasing size.

    A point ``j`` dominates ``i`` when it is no larger (``sizes[j] <= sizes[i]``), no worse
    (``values[j] <= values[i]`` when ``minimize``, e.g. perplexity; ``>=`` otherwise, e.g.
    accuracy) and strictly better in at least one of the two. Points whose size or value is not
    finite (NaN, inf: a diverged run) are never on the frontier. Of exact duplicates the first
    index is kept.
    """
    if len(sizes) != len(values):
        raise ValueError(f"sizes ({len(sizes)}) and values ({len(values)}) differ in length")
    sign = 1.0 if minimize else -1.0
    pts = [
        (float(s), sign * float(v), i)
        for i, (s, v) in enumerate(zip(sizes, values, strict=True))
        if math.isfinite(float(s)) and math.isfinite(float(v))
    ]
    # Sweep by size (ties: best value first, then index); keep each strict improvement.
    pts.sort()
    frontier: list[int] = []
    best = math.inf
    for _, v, i in pts:
        if v < best:
            frontier.append(i)
            best = v
    return frontier
