"""CLI: ``python -m paretoq_jax.report SWEEP_DIR [--out DIR]`` (default DIR: SWEEP_DIR/report)."""

from __future__ import annotations

import argparse
import sys

from .build import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paretoq_jax.report", description="Figures + Markdown page of a sweep."
    )
    parser.add_argument("sweep_dir", help="a sweep directory (holds cells/*/result.json)")
    parser.add_argument("--out", help="output folder (default: SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    try:
        page = build_report(args.sweep_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[report] {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
