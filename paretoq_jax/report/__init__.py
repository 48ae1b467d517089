"""Sweep reports: ``python -m paretoq_jax.report SWEEP_DIR [--out DIR]``.

PNG figures (matplotlib) and a Markdown page from a sweep's results: quality vs model size with
the Pareto frontier, the quantizer ablation, the learning transition, loss curves, and ParetoQ's
findings checked on the measured cells. See ``docs/sweeps.md``.
"""

from .build import ablation_table, build_report, findings, load_rows

__all__ = ["ablation_table", "build_report", "findings", "load_rows"]
