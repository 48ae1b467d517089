"""The committed reports (``reports/*/``) and their byte-for-byte check.

A report folder holds its inputs, ``results.json`` (one row per cell: final metrics, the
config as run, the metrics curve; ``paretoq_jax.run.records``) and ``sweep.yaml``, and what
``python -m paretoq_jax.report`` makes of them: ``report.md``, ``results.csv`` and SVG figures.
:func:`check_report` rebuilds a folder in a temporary directory and compares every file.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import matplotlib

from paretoq_jax.outputs import MARKER

from .build import build_report, is_report_dir

__all__ = ["REPORTS_DIR", "report_dirs", "check_report", "figure_version"]

REPORTS_DIR = Path(__file__).resolve().parents[2] / "reports"
"""``reports/`` of the source checkout this package runs from."""

INPUTS = ("results.json", "sweep.yaml")
_CREATOR = re.compile(rb"Matplotlib v([0-9][^,<\s]*)")


def report_dirs(root: str | Path | None = None) -> list[Path]:
    """The report folders (:func:`~paretoq_jax.report.build.is_report_dir`) under ``root``
    (default :data:`REPORTS_DIR`), sorted."""
    root = Path(root) if root is not None else REPORTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_report_dir(p))


def figure_version(svg: bytes) -> str | None:
    """The matplotlib version that wrote an SVG figure (its metadata's creator), else None."""
    m = _CREATOR.search(svg[:4096])
    return m.group(1).decode() if m else None


def check_report(folder: str | Path) -> tuple[list[str], list[str]]:
    """Rebuild ``folder`` from its ``results.json`` and ``sweep.yaml`` and compare byte for byte.

    Returns ``(problems, notes)``: a problem is a file that differs, is missing or is not
    generated (a stale figure); a note is an SVG figure written by another matplotlib version
    than the installed one, which is not compared (its bytes depend on that version).
    """
    folder = Path(folder)
    problems, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        build_report(folder, tmp)
        made = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    # the output marker (paretoq_jax.outputs) says what wrote the folder and when: not a report file
    have = {p.name for p in folder.iterdir() if p.is_file() and p.name != MARKER}
    for name in sorted(have - set(made)):
        problems.append(f"{folder / name}: not generated from results.json (stale?)")
    for name, data in sorted(made.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing (the report makes it)")
            continue
        old = path.read_bytes()
        if old == data:
            continue
        if name.endswith(".svg"):
            v = figure_version(old)
            if v != matplotlib.__version__:
                notes.append(
                    f"{path}: written by matplotlib {v}, {matplotlib.__version__} installed: "
                    "not compared"
                )
                continue
        problems.append(f"{path}: differs from what `python -m paretoq_jax.report` makes")
    return problems, notes
