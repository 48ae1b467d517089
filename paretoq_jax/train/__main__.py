"""CLI: ``python -m paretoq_jax.train --config configs/tiny.yaml [key=value ...]``.

Overrides use dotted keys (``train.steps=20 model.bits=2 mesh.fsdp=4``). Rerunning the same
command with the same ``run_dir`` resumes from the latest checkpoint. Multi-host: set
``--distributed`` (or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` environment variables) and start the same command on every host; see
``launch/README.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from paretoq_jax.cli import EXIT_SIGNAL_BASE, run_cli
from paretoq_jax.config import load_config
from paretoq_jax.run.config import RunConfig
from paretoq_jax.runtime import reexec_with_malloc_tunables
from paretoq_jax.train.loop import train


def init_distributed(force: bool = False) -> bool:
    """Call ``jax.distributed.initialize`` when running multi-process; True if it did.

    Explicit settings come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; with ``force`` and none of them, JAX auto-detects the cluster (TPU pod
    slices, SLURM, Open MPI).
    """
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        n = int(os.environ["JAX_NUM_PROCESSES"])
        pid = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
        return True
    if force:
        jax.distributed.initialize()
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 when the run reached ``train.steps``; 128 + N when signal N (SIGINT: 130,
    SIGTERM: 143) stopped it after saving (rerun to resume); 2 bad input; 3 non-finite loss;
    4 a checkpoint could not be saved; 1 an unexpected error (see ``docs/cli.md``)."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paretoq_jax.train",
        description="ParetoQ quantization-aware training (resumes from RUN_DIR/checkpoints).",
        epilog="--debug (or PARETOQ_DEBUG=1) shows the traceback of an error.",
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    args = parser.parse_args(argv)

    cfg = load_config(RunConfig, args.config, args.overrides)
    init_distributed(args.distributed)

    summary = train(cfg, progress=not args.no_progress)
    if summary.get("interrupted"):
        code = EXIT_SIGNAL_BASE + summary["interrupted"]
        if jax.process_index() == 0:
            print(
                f"[train] interrupted at step {summary['step']} (saved; exit status {code}): "
                "rerun the same command to resume",
                file=sys.stderr,
            )
        return code
    if jax.process_index() == 0:
        print(f"[train] done: step {summary['step']} loss {summary['loss']:.6f} in {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    reexec_with_malloc_tunables()
    sys.exit(main())
