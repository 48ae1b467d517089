"""Evaluation: perplexity, zero-shot multiple choice, the lm-evaluation-harness adapter.

    model, tokenizer = load_model("runs/smollm2-2bit")        # run dir, HF folder, .gguf, hub id
    perplexity(model, val_blocks, batch_size=8)               # {"perplexity", "loss", "tokens", ...}
    evaluate_mc(model, tokenizer, "tasks/piqa.jsonl")         # {"acc", "acc_norm", ...}

CLI: ``python -m paretoq_jax.eval --model PATH --data FILE``. See docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paretoq_jax.run.load import LOADERS, describe_model, is_run_dir, load_model, load_run

from .multiple_choice import encode_pair, evaluate_mc, load_mc, score_choices
from .perplexity import block_windows, perplexity, strided_windows
from .scoring import score_windows

__all__ = [
    "LOADERS",
    "block_windows",
    "describe_model",
    "encode_pair",
    "evaluate_mc",
    "is_run_dir",
    "load_mc",
    "load_model",
    "load_run",
    "perplexity",
    "score_choices",
    "score_windows",
    "strided_windows",
    "zero_shot",
]


def zero_shot(model: Any, tokenizer: Any, path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_mc` on a jsonl file, with ``accuracy`` (= ``acc``) added for sweeps."""
    out = evaluate_mc(model, tokenizer, path, **kwargs)
    out["accuracy"] = out["acc"]
    return out
