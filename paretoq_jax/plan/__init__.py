"""``python -m paretoq_jax.plan``: will this run fit a TPU slice or GPU nodes, with which mesh,
how fast?

Compiles the exact train step for compile-only TPU devices or H100s (no accelerator, no
weights, no data) and
reports per-chip memory against HBM, FLOPs, collectives and the roofline step time / MFU.
See ``docs/scale.md``.
"""

from .chips import CHIPS, Chip, chip_for
from .core import (
    HBMError,
    PlanError,
    architecture,
    gpu_devices,
    model_flops_per_token,
    plan,
    tpu_devices,
)
from .table import format_plan

__all__ = [
    "CHIPS",
    "Chip",
    "chip_for",
    "HBMError",
    "PlanError",
    "architecture",
    "model_flops_per_token",
    "plan",
    "tpu_devices",
    "gpu_devices",
    "format_plan",
]
