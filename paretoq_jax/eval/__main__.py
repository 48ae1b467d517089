"""``python -m paretoq_jax.eval --model PATH --data FILE [--mc FILE.jsonl] [--out results.json]``.

Perplexity (non-overlapping blocks of ``--seq-len``, or a strided window with ``--stride``) on a
local .txt/.jsonl/.json/.parquet file, a folder, ``default`` (the Wikipedia sample) or a
dataset name; zero-shot multiple-choice accuracy on local jsonl files. Prints the results and
writes them as JSON with ``--out``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from paretoq_jax.cli import run_cli
from paretoq_jax.data import DataConfig, build_splits, cached_token_stream, resolve_source
from paretoq_jax.outputs import JSON_KIND_KEY, atomic_write_text, check_output
from paretoq_jax.runtime import reexec_with_malloc_tunables
from paretoq_jax.sharding import make_mesh

__all__ = ["main", "eval_tokens"]


def eval_tokens(
    data: str,
    tokenizer: Any,
    *,
    seq_len: int,
    split: str = "all",
    text_field: str = "text",
    val_blocks: int = 32,
) -> np.ndarray:
    """Tokens to evaluate, through ``paretoq_jax.data`` (same sources, tokenization and cache
    as training): ``split="all"``: the whole corpus as one stream; ``"val"`` / ``"train"``: the
    blocks of ``build_splits`` with the last ``val_blocks`` blocks held out (the anchors' split)."""
    cfg = DataConfig(path=data, text_field=text_field, seq_len=seq_len, val_blocks=val_blocks)
    if split == "all":
        stream = cached_token_stream(
            resolve_source(data), tokenizer, text_field=text_field, add_bos=cfg.add_bos,
            add_eos=cfg.add_eos, separator=cfg.separator,
        )  # fmt: skip
        return np.asarray(stream.tokens)
    if split not in ("val", "train"):
        raise ValueError(f"--split must be all, val or train, got {split!r}")
    train, val = build_splits(cfg, tokenizer)
    return np.asarray(val if split == "val" else train)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m paretoq_jax.eval",
        description="Perplexity and zero-shot multiple choice of a model.",
    )
    p.add_argument("--model", required=True, help="run dir, HF folder, .gguf file or hub id")
    p.add_argument("--data", help='corpus: file, folder, "default" or a dataset name')
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per block/window")
    p.add_argument("--stride", type=int, default=None, help="strided sliding window (tokens)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split", default="all", choices=("all", "val", "train"),
                   help="all: whole corpus; val/train: the training split (last --val-blocks "
                   "blocks are val)")  # fmt: skip
    p.add_argument("--val-blocks", type=int, default=32)
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N only")
    p.add_argument("--mc", action="append", default=[], help="multiple-choice jsonl (repeat)")
    p.add_argument("--mc-delimiter", default=" ", help="text between context and choice")
    p.add_argument("--add-bos", action="store_true", help="BOS before every MC context")
    p.add_argument("--bits", default=None, help="quantize a float checkpoint at load (RTN)")
    p.add_argument("--method", default=None, help="quantizer method with --bits")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--force", action="store_true", help="replace an earlier eval JSON at --out")
    args = p.parse_args(argv)
    if args.data is None and not args.mc:
        p.error("give --data (perplexity) and/or --mc (multiple choice)")
    if args.out:  # checked before any work: a long evaluation never ends in a lost result
        check_output(args.out, "eval", directory=False, force=args.force, reads=[args.model])
    for path in args.mc:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no multiple-choice file at {path} (--mc)")

    from . import describe_model, evaluate_mc, load_model, perplexity

    mesh = make_mesh(data=jax.device_count())
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, bits=args.bits, method=args.method, mesh=mesh)
    results: dict[str, Any] = describe_model(args.model, args.bits, args.method)
    results["devices"] = jax.device_count()
    results["load_s"] = round(time.perf_counter() - t0, 2)
    if args.data is not None:
        t0 = time.perf_counter()
        tokens = eval_tokens(
            args.data, tokenizer, seq_len=args.seq_len, split=args.split,
            text_field=args.text_field, val_blocks=args.val_blocks,
        )  # fmt: skip
        if args.max_windows is not None:
            n = args.max_windows * (args.seq_len if tokens.ndim == 1 else 1)
            if args.stride is not None and tokens.ndim == 1:
                n = args.seq_len + (args.max_windows - 1) * args.stride
            tokens = tokens[:n]
        ppl = perplexity(
            model, tokens, batch_size=args.batch_size,
            seq_len=args.seq_len if tokens.ndim == 1 or args.stride else None,
            stride=args.stride, mesh=mesh,
        )  # fmt: skip
        results.update(data=args.data, split=args.split, **ppl)
        results["ppl_s"] = round(time.perf_counter() - t0, 2)
        print(
            f"perplexity {ppl['perplexity']:.4f}  loss {ppl['loss']:.5f}  tokens {ppl['tokens']}"
            f"  ({ppl['protocol']}, seq_len {ppl['seq_len']})"
        )
    if args.mc:
        results["mc"] = {}
        for path in args.mc:
            mc = evaluate_mc(
                model, tokenizer, path, batch_size=args.batch_size,
                delimiter=args.mc_delimiter, add_bos=args.add_bos, mesh=mesh,
            )  # fmt: skip
            results["mc"][Path(path).stem] = {"file": path, **mc}
            print(
                f"{Path(path).stem}: acc {mc['acc']:.4f}  acc_norm {mc['acc_norm']:.4f}  "
                f"acc_norm_token {mc['acc_norm_token']:.4f}  n {mc['n']}"
            )
    if args.out:
        out = check_output(
            args.out, "eval", directory=False, force=args.force, reads=[args.model]
        )  # again: did anything appear there meanwhile?
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({JSON_KIND_KEY: "eval", **results}, indent=1) + "\n")
    else:
        sys.stdout.write(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    reexec_with_malloc_tunables()
    raise SystemExit(main())
