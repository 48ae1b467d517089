"""How the reports and the README tables write numbers and tables (one style everywhere)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["finite", "lr", "markdown_table", "num"]


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite number (not a bool, None, NaN, a string or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any) -> str:
    """A measured number as the reports write it: ``1.67e7``, ``1,764``, ``836.5``, ``33.16``;
    ``-`` when it is not a finite number."""
    if not finite(x):
        return "-"
    if abs(x) >= 1e5:
        mant, exp = f"{x:.3g}".split("e")
        return f"{mant}e{int(exp)}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def lr(x: float) -> str:
    """A learning rate as the configs write it: ``5e-4``, ``2e-5``, ``1e-3``."""
    m, e = f"{x:.2e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header row, the separator, one line per row of ``body``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
