"""The from-scratch scaling study (issue 21, docs/scaling.md): glue between its two sweeps.

Stage 1 (`configs/sweeps/scaling-float.yaml`) float-pretrains every size with a checkpoint every
25 steps; stage 2 (`configs/sweeps/scaling-qat.yaml`) starts QAT from some of those checkpoints,
which it reads as HF folders (``model.path``). ``export`` writes them::

    python -m paretoq_jax.scaling export runs/sweeps/scaling-float [--steps 125,200,225,250,400,450,475]

For every cell of the float sweep and every listed step that cell has a checkpoint of,
``SWEEP_DIR/hf/<size>-step<N>/`` (``<size>``: the basename of the cell's ``model.path``) is
written with `paretoq_jax.io.save_pretrained` (float32 safetensors + config + tokenizer) as an
HF export (`paretoq_jax.outputs.atomic_output`: a temporary folder renamed into place), unless
it is already there. Steps not yet reached are skipped, so the command can be rerun while the
float runs go on, and QAT cells whose start exists can run meanwhile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paretoq_jax.cli import run_cli
from paretoq_jax.config import read_yaml
from paretoq_jax.errors import ParetoQError
from paretoq_jax.export import output_kind_of
from paretoq_jax.io import save_pretrained
from paretoq_jax.outputs import atomic_output
from paretoq_jax.run.restore import checkpoint_steps, load_run

__all__ = ["export_float_starts", "main", "start_name"]

DEFAULT_STEPS = (125, 200, 225, 250, 400, 450, 475)


class ScalingError(ParetoQError, ValueError):
    """A bad argument to ``python -m paretoq_jax.scaling``."""


def start_name(model_path: str, step: int) -> str:
    """The folder name of the float start of size ``model_path`` at ``step``."""
    return f"{Path(model_path).name}-step{step}"


def export_float_starts(
    sweep_dir: str | Path, steps: tuple[int, ...] = DEFAULT_STEPS
) -> list[Path]:
    """Export each float cell's checkpoints at ``steps`` to ``sweep_dir/hf``; the folders
    written now (existing ones are left as they are)."""

    sweep_dir = Path(sweep_dir)
    cells = sweep_dir / "cells"
    if not cells.is_dir():
        raise ScalingError(f"{sweep_dir} has no cells/; run the float sweep first")
    written = []
    for cell in sorted(p for p in cells.iterdir() if (p / "config.yaml").exists()):
        cfg = read_yaml(cell / "config.yaml")
        if float(cfg["model"]["bits"]) < 16:
            raise ScalingError(f"{cell} is not a float run (model.bits={cfg['model']['bits']})")
        have = set(checkpoint_steps(cell))
        for step in steps:
            out = sweep_dir / "hf" / start_name(cfg["model"]["path"], step)
            if step not in have or (out / "config.json").exists():
                continue
            model, tokenizer, _, _ = load_run(cell, step)
            with atomic_output(out, output_kind_of("hf"), directory=True) as tmp:
                save_pretrained(model, tmp, tokenizer=tokenizer)
            written.append(out)
            print(f"[scaling] {cell.name} step {step} -> {out}", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m paretoq_jax.scaling export SWEEP_DIR [--steps ...]``."""

    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m paretoq_jax.scaling", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="float checkpoints -> HF folders for the QAT stage")
    e.add_argument("sweep_dir")
    e.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)))
    a = p.parse_args(argv)
    try:
        steps = tuple(int(s) for s in a.steps.split(",") if s)
    except ValueError:
        raise ScalingError(f"--steps must be comma-separated integers, got {a.steps!r}") from None
    export_float_starts(a.sweep_dir, steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
