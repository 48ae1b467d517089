"""CLI: ``python -m paretoq_jax.report SWEEP_DIR [--out DIR]`` (default DIR: SWEEP_DIR/report).

DIR may be SWEEP_DIR itself (the layout of the committed ``reports/*``), a new or empty folder,
or an earlier report (regenerated in place); never a training run or a folder of other files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paretoq_jax.cli import run_cli
from paretoq_jax.outputs import MARKER, check_output, find_run_dir, marker_text

from .build import build_report


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paretoq_jax.report", description="Figures + Markdown page of a sweep."
    )
    parser.add_argument("sweep_dir", help="a sweep directory (holds cells/*/result.json)")
    parser.add_argument("--out", help="output folder (default: SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {sweep_dir}")
    out = Path(args.out) if args.out else sweep_dir / "report"
    if out.resolve() == sweep_dir.resolve():  # the report beside the sweep's own results
        run = find_run_dir(out)
        if run is not None:
            check_output(out, "report", directory=True)  # raises: a training run
    else:
        check_output(out, "report", directory=True)
    page = build_report(sweep_dir, out)
    if out.resolve() != sweep_dir.resolve():
        (out / MARKER).write_text(marker_text("report"))
    print(f"[report] {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
