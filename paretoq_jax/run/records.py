"""The per-cell results record: what a committed results file holds for each run.

A sweep cell's ``result.json`` row (and each row of ``results.json``), and the quickstart's
``quickstart.json``, carry besides their final metrics:

- ``config``: the run's whole resolved training config (``paretoq_jax.config.to_dict``), as run
  (:func:`record_config` reads it in the current layout, whichever version wrote it);
- ``curve``: the metrics curve, one record per logged training step (:func:`curve_of`);
- ``software``: the versions the numbers depend on (:func:`software`): the same code and
  config can differ in the last bits elsewhere (another dequantizer, XLA, CPU), and low-bit QAT
  amplifies that.

A report or a README table is then rebuilt from the committed file alone, with no run
directory. Rows copied from an older committed report, whose run directories were never
committed, say so in ``provenance`` (see ``docs/sweeps.md``).
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from paretoq_jax.config import migrate

from .config import RunConfig
from .metrics import read_metrics

__all__ = [
    "CURVE_KEYS",
    "curve_of",
    "curve_from_file",
    "mean_codes_changed",
    "record_config",
    "software",
]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "gguf", "ml_dtypes")

CURVE_KEYS = ("step", "tokens", "loss", "lr", "grad_norm", "elapsed_s", "val_loss", "val_ppl")
"""Keys of ``metrics.jsonl`` rows kept in a curve record (when the row has them)."""


def mean_codes_changed(quant: Mapping[str, Mapping[str, Any]] | None) -> float | None:
    """Mean over the quantized projections of a ``metrics.jsonl`` row's ``codes_changed``
    (the fraction of integer codes flipped since the previous quant log); None when absent."""
    vals = [v.get("codes_changed") for v in (quant or {}).values()]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def curve_of(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A metrics curve from ``metrics.jsonl`` rows: per logged step the :data:`CURVE_KEYS` it
    has, plus ``codes_changed`` (:func:`mean_codes_changed`) at quant-stat logs. Timing noise
    (``tokens_per_sec``, ``step_time_s``) and the per-projection statistics are left out."""
    curve = []
    for r in rows:
        rec = {k: r[k] for k in CURVE_KEYS if k in r}
        codes = mean_codes_changed(r.get("quant"))
        if codes is not None:
            rec["codes_changed"] = codes
        curve.append(rec)
    return curve


def curve_from_file(metrics_jsonl: str | Path) -> list[dict[str, Any]]:
    """:func:`curve_of` the rows of a run's ``metrics.jsonl`` (empty when there is none)."""
    return curve_of(read_metrics(metrics_jsonl))


def record_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's ``config`` in the current layout: keys renamed since an earlier version wrote
    it (``train.lr`` -> ``train.optimizer.lr``, ...) read at their new place."""
    return migrate(RunConfig, record.get("config") or {})


def software() -> dict[str, Any]:
    """Python, the numerics packages' versions, the JAX backend and device count, CPU count."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out.update(
        backend=jax.default_backend(),
        devices=jax.device_count(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )
    return out
