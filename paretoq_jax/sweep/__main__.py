"""CLI: ``python -m paretoq_jax.sweep --config configs/sweeps/NAME.yaml [--cell I | --shard K/N]
[--out SWEEP_DIR] [--dry-run]``.

Rerunning the same command skips finished cells and resumes an interrupted one from its
checkpoint. Several processes (or hosts sharing the directory) may run the same sweep at once:
each cell is claimed with a file lock; ``--shard K/N`` splits the grid deterministically.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from paretoq_jax.cli import EXIT_SIGNAL_BASE, run_cli
from paretoq_jax.outputs import MARKER, check_output, marker_text
from paretoq_jax.runtime import reexec_with_malloc_tunables

from .runner import cell_config, run_cells, write_json_atomic, write_results
from .spec import SweepError, expand, load_sweep, parse_shard, select


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all chosen cells done, 1 some failed, 128 + N a cell stopped by signal N
    (saved; rerun to resume), 2 bad input."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paretoq_jax.sweep",
        description="Run a grid of QAT runs + evaluation (resumable; see docs/sweeps.md).",
    )
    parser.add_argument(
        "--config", required=True, help="sweep file, e.g. configs/sweeps/tiny-bits.yaml"
    )
    parser.add_argument("--out", help="sweep directory (default: out_dir of the sweep file)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cell", help="run only this cell (index or name)")
    group.add_argument("--shard", help="run cells i with i %% N == K, given as K/N")
    parser.add_argument(
        "--kind", choices=("train", "rtn", "float"), action="append",
        help="run only cells of this kind (repeatable), e.g. --kind rtn --kind float first",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    parser.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    args = parser.parse_args(argv)

    spec = load_sweep(args.config)
    shard = parse_shard(args.shard) if args.shard else None
    out = args.out or spec.out_dir
    if out is None:
        raise SweepError("pass --out DIR or set out_dir in the sweep file")
    sweep_dir = Path(out)
    # a new or empty folder, or this sweep's own folder (continued): never a run or other files
    check_output(sweep_dir, "sweep", directory=True, resume=True)

    # Validate every cell's config before running anything (cheap: no model is loaded), so that
    # indices and shards are over the valid cells only.
    cells, invalid = [], {}
    for c in expand(spec):
        try:
            cell_config(spec, c, sweep_dir / "cells" / c.name)
            cells.append(c)
        except ValueError as e:
            invalid[c.name] = str(e)
    if invalid and not spec.drop_invalid:
        bad = "; ".join(f"cell {name}: {why}" for name, why in invalid.items())
        raise SweepError(
            f"{bad}. Fix the sweep file, add an exclude rule, or set drop_invalid: true"
        )
    for name, why in invalid.items():
        print(f"[sweep] dropped cell {name}: {why}")
    chosen = select(cells, cell=args.cell, shard=shard)
    if args.kind:
        chosen = [c for c in chosen if c.kind in args.kind]
    index = {c.name: i for i, c in enumerate(cells)}

    if args.dry_run:
        for c in chosen:
            print(f"{index[c.name]:4d}  {c.kind:5s}  {c.name}")
        print(f"{len(chosen)} of {len(cells)} cells -> {sweep_dir}")
        return 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / MARKER).exists():
        (sweep_dir / MARKER).write_text(marker_text("sweep"))
    if spec.source is not None:
        shutil.copyfile(spec.source, sweep_dir / "sweep.yaml")
    write_json_atomic(
        sweep_dir / "cells.json",
        [
            {"index": i, "name": c.name, "kind": c.kind, "overrides": c.overrides}
            for i, c in enumerate(cells)
        ],
    )
    report = run_cells(
        spec, [(index[c.name], c) for c in chosen], sweep_dir, progress=args.progress
    )
    write_results(sweep_dir)
    stopped = report.pop("interrupted", None)
    print("[sweep] " + json.dumps({k: len(v) for k, v in report.items()}) + f" -> {sweep_dir}")
    if stopped:
        return EXIT_SIGNAL_BASE + int(stopped[1])
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    reexec_with_malloc_tunables()
    sys.exit(main())
