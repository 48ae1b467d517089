"""CLI: ``python -m paretoq_jax.report [SWEEP_DIR] [--out DIR] [--readme] [--check]``.

``SWEEP_DIR``: a sweep directory (report into ``SWEEP_DIR/report`` unless ``--out``) or a
committed report folder (regenerated in place). Without ``SWEEP_DIR``: every committed report
under ``reports/`` and the README's generated tables. ``--check`` writes nothing and exits 1
when a committed file differs from what would be generated.

``--out`` may be a new or empty folder or an earlier report (regenerated in place); never a
training run or a folder of other files (``docs/cli.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paretoq_jax.cli import run_cli
from paretoq_jax.outputs import MARKER, check_output, marker_text

from .build import build_report, is_report_dir


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paretoq_jax.report", description="Figures + Markdown page of a sweep."
    )
    parser.add_argument(
        "sweep_dir", nargs="?",
        help="a sweep directory (cells/*/result.json) or a report folder (results.json); "
        "default: every folder under reports/ and the README's tables",
    )  # fmt: skip
    parser.add_argument("--out", help="output folder (default: SWEEP_DIR/report)")
    parser.add_argument("--readme", action="store_true", help="only the README's generated tables")
    parser.add_argument(
        "--check", action="store_true",
        help="compare with the committed files instead of writing (exit 1 on a difference)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.sweep_dir and not args.check:
        sweep_dir = Path(args.sweep_dir)
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"no sweep directory or report folder at {sweep_dir}")
        out = Path(args.out) if args.out else None
        target = out or (sweep_dir if is_report_dir(sweep_dir) else sweep_dir / "report")
        in_place = target.resolve() == sweep_dir.resolve()
        # checked before any work; in place (a committed report folder) only its own files
        # are rewritten, and never inside a training run
        check_output(target, "report", directory=True, resume=in_place)
        page = build_report(sweep_dir, out)
        if not in_place:
            (target / MARKER).write_text(marker_text("report"))
        print(f"[report] {page}")
        return 0
    return _committed(args.sweep_dir, readme_only=args.readme, check=args.check)


def _committed(folder: str | None, *, readme_only: bool, check: bool) -> int:
    """Regenerate (or ``check``) the committed reports and the README's generated blocks."""
    from .published import check_report, report_dirs
    from .readme import README, update_readme

    bad = 0
    if not readme_only:
        for d in [folder] if folder else report_dirs():
            if check:
                problems, notes = check_report(d)
                for line in notes:
                    print(f"[report] note: {line}")
                for line in problems:
                    print(f"[report] {line}", file=sys.stderr)
                bad += len(problems)
                print(f"[report] {d}: {'ok' if not problems else 'DIFFERS'}")
            else:
                print(f"[report] {build_report(d)}")
    if readme_only or not folder:
        changed = update_readme(README, check=check)
        verb = "differ" if check else "rewritten"
        print(
            f"[report] {README}: " + (f"blocks {verb}: {', '.join(changed)}" if changed else "ok")
        )
        bad += len(changed) if check else 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
