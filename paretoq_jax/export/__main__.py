"""CLI: ``python -m paretoq_jax.export --checkpoint RUN_DIR --format packed|hf|gguf --out PATH``.

Options: ``--force`` (replace an earlier export of the same format at PATH; nothing else is ever
replaced, see ``paretoq_jax.outputs``), ``--step N`` (default: latest checkpoint),
``--ternary base3|2bit`` (packed, 1.58 bits), ``--gguf-qtype TQ1_0|TQ2_0|Q2_K|Q4_0|Q8_0``,
``--gguf-float f32|f16``. Exit status 2 with a one-line error for bad input (``docs/cli.md``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from paretoq_jax.cli import run_cli
from paretoq_jax.export import FORMATS, export_run


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paretoq_jax.export", description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="training run directory (RUN_DIR)")
    ap.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    ap.add_argument("--out", required=True, help="output folder (packed, hf) or .gguf file")
    ap.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--ternary", default="2bit", choices=("2bit", "base3"))
    ap.add_argument("--gguf-qtype", default=None, help="TQ1_0, TQ2_0, Q2_K, Q4_0 or Q8_0")
    ap.add_argument(
        "--gguf-float",
        default="f32",
        choices=("f32", "f16", "q8_0"),
        help="GGUF type of the embeddings / float lm_head",
    )
    ap.add_argument(
        "--packed-embed",
        default="float",
        choices=("float", "int8"),
        help="packed export: token embedding (tied LM head) as float or int8",
    )
    args = ap.parse_args(argv)
    out = export_run(
        args.checkpoint, args.format, args.out, step=args.step, force=args.force,
        ternary=args.ternary, gguf_qtype=args.gguf_qtype, float_type=args.gguf_float,
        packed_embed=args.packed_embed,
    )  # fmt: skip
    print(f"[export] wrote {args.format} export to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
