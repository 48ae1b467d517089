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

from paretoq_jax.config import ConfigError, load_config


def init_distributed(force: bool = False) -> bool:
    """Call ``jax.distributed.initialize`` when running multi-process; True if it did.

    Explicit settings come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; with ``force`` and none of them, JAX auto-detects the cluster (TPU pod
    slices, SLURM, Open MPI).
    """
    import jax

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
    parser = argparse.ArgumentParser(
        prog="python -m paretoq_jax.train",
        description="ParetoQ quantization-aware training (resumes from RUN_DIR/checkpoints).",
    )
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize()")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    args = parser.parse_args(argv)

    from paretoq_jax.train.config import RunConfig

    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed(args.distributed)

    from paretoq_jax.train.checkpoint import CheckpointSaveError
    from paretoq_jax.train.loop import NonFiniteLossError, train

    try:
        summary = train(cfg, progress=not args.no_progress)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    import jax

    if jax.process_index() == 0:
        print(f"[train] done: step {summary['step']} loss {summary['loss']:.6f} in {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    from paretoq_jax.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()
    sys.exit(main())
