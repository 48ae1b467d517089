"""``python -m paretoq_jax.plan --config CONFIG (--topology v5p:4x4x4 [--slices N] | --gpu h100:1x2x8) [key=value ...]``"""

from __future__ import annotations

import argparse
import json
import os
import sys

from paretoq_jax.cli import run_cli
from paretoq_jax.outputs import JSON_KIND_KEY, atomic_write_text, check_output


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paretoq_jax.plan",
        description="Compile the train step of CONFIG for a TPU topology or GPUs (none needed) and "
        "print per-chip memory, FLOPs, collectives and the roofline step time.",
    )
    parser.add_argument("--config", required=True, help="a training config (YAML)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help="TPU topology, e.g. v5p:4x4x4")
    where.add_argument(
        "--gpu",
        help="GPUs as <gpu>:<slices>x<nodes>x<gpus per node>, e.g. h100:1x2x8 (needs the "
        "gpu-plan extra; memory and collectives, no FLOP count)",
    )
    parser.add_argument("--slices", type=int, default=1, help="TPU slices (data across DCN)")
    parser.add_argument("--out", help="also write the plan as JSON here")
    parser.add_argument("--force", action="store_true", help="replace an earlier plan at --out")
    parser.add_argument(
        "--no-flops", action="store_true", help="memory and collectives only (one compile)"
    )
    parser.add_argument("--hlo", help="also keep the optimized HLO text here (.gz: gzipped)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.tensor=4")
    args = parser.parse_args(argv)
    # compile-only: never touch a local accelerator; libtpu must not query a metadata server
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    from paretoq_jax.config import load_config
    from paretoq_jax.plan import format_plan, plan
    from paretoq_jax.run.config import RunConfig

    if args.out:  # checked before the (minutes-long) compile
        check_output(args.out, "plan", directory=False, force=args.force)
    if args.hlo:  # only an earlier HLO dump is replaced
        check_output(args.hlo, "hlo", directory=False, flag="--hlo")
    cfg = load_config(RunConfig, args.config, args.overrides)
    result = plan(
        cfg, args.topology or args.gpu, args.slices, count_flops=not args.no_flops,
        name=args.config, hlo_out=args.hlo,
    )  # fmt: skip
    print(format_plan(result))
    if args.out:
        out = check_output(args.out, "plan", directory=False, force=args.force)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({JSON_KIND_KEY: "plan", **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
