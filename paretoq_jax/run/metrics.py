"""Reading a run's ``metrics.jsonl`` (written by ``paretoq_jax.train.metrics.MetricsWriter``;
the row format is in ``docs/training.md``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a ``metrics.jsonl``."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
