"""Sweep reports: ``python -m paretoq_jax.report [SWEEP_DIR] [--out DIR] [--readme] [--check]``.

SVG figures (matplotlib) and a Markdown page from a sweep's result rows: quality vs model size
with the Pareto frontier, the quantizer ablation, the learning transition, loss curves, and
ParetoQ's findings checked on the measured cells. Every row is a complete record of its cell
(``records``: config, metrics curve, final metrics), so the committed reports (``published``)
and the README's result tables (``readme``) regenerate byte for byte from committed files.
See ``docs/sweeps.md``.
"""

from .build import ablation_table, build_report, findings, is_report_dir, load_rows

__all__ = ["ablation_table", "build_report", "findings", "is_report_dir", "load_rows"]
