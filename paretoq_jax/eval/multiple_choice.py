"""Zero-shot multiple choice (ARC / PIQA / HellaSwag style) from a local jsonl file.

One example per line (docs/evaluation.md)::

    {"context": "The capital of France is", "choices": ["Paris", "London"], "label": 0}

Each choice is scored as the continuation ``delimiter + choice`` of ``context`` (delimiter
``" "`` by default, as lm-eval's ``target_delimiter``): the summed log-likelihood of its tokens
given the context's tokens. Tokenization follows lm-eval: ``context + continuation`` is encoded
whole and split after the context's own tokens, so a merge across the boundary stays with the
continuation. Metrics:

- ``acc``: the choice with the highest summed log-likelihood;
- ``acc_norm``: highest log-likelihood per character of the choice (lm-eval's ``acc_norm``);
- ``acc_norm_token``: highest log-likelihood per continuation token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .scoring import Window, score_windows

__all__ = ["load_mc", "encode_pair", "score_choices", "evaluate_mc"]


def load_mc(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a multiple-choice jsonl (``context``, ``choices``, ``label`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            where = f"{path}:{i}"
            if not isinstance(ex, dict) or not {"context", "choices", "label"} <= set(ex):
                raise ValueError(
                    f'{where}: each line needs "context" (str), "choices" (list of str) and '
                    f'"label" (int), got keys {sorted(ex) if isinstance(ex, dict) else ex!r}'
                )
            ch = ex["choices"]
            if not isinstance(ex["context"], str):
                raise ValueError(f"{where}: context must be a string")
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
                raise ValueError(f"{where}: choices must be a list of at least 2 strings")
            label = ex["label"]
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(ch):
                raise ValueError(f"{where}: label must be an int in [0, {len(ch)}), got {label!r}")
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(
    tokenizer: Any, context: str, continuation: str, *, prefix: list[int] = ()
) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation, the joined text
    is encoded and cut after the context's tokens. ``prefix`` (e.g. ``[bos]``) goes before the
    context; an empty context (and no prefix) is an error: nothing would predict the first
    continuation token."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = _encode(tokenizer, context) if context else []
    whole = _encode(tokenizer, context + continuation)
    cont = whole[len(ctx) :]
    ctx = list(prefix) + ctx
    if not ctx:
        raise ValueError("empty context and no prefix token: pass prefix=[bos_or_eos_id]")
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont


def score_choices(
    model: nnx.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood (float64) and is-greedy of each continuation given its context (token
    lists). Sequences longer than ``max_length`` (default: the model's context) keep their last
    tokens; the continuation itself is always kept whole."""
    if max_length is None:
        max_length = model.config.max_position_embeddings
    windows: list[Window] = []
    for ctx, cont in pairs:
        if len(cont) >= max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length")
        toks = (list(ctx) + list(cont))[-max_length:]
        windows.append((toks, len(toks) - len(cont)))
    nll, _, greedy = score_windows(model, windows, batch_size=batch_size, mesh=mesh)
    return -nll, greedy


def evaluate_mc(
    model: nnx.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]] | str | Path,
    *,
    batch_size: int = 8,
    delimiter: str = " ",
    add_bos: bool = False,
    mesh: Mesh | None = None,
    return_scores: bool = False,
) -> dict[str, Any]:
    """Zero-shot accuracy on ``examples`` (a list of dicts or a jsonl path). Returns ``acc``,
    ``acc_norm`` (per character), ``acc_norm_token`` and ``n``; with ``return_scores``, also
    ``scores``: per example the raw log-likelihood of every choice."""
    if isinstance(examples, (str, Path)):
        examples = load_mc(examples)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    prefix = [bos] if add_bos and bos is not None else []
    pairs, owner, n_chars = [], [], []
    for i, ex in enumerate(examples):
        for choice in ex["choices"]:
            pre = prefix or ([] if ex["context"] else [bos if bos is not None else eos])
            pairs.append(encode_pair(tokenizer, ex["context"], delimiter + choice, prefix=pre))
            owner.append(i)
            n_chars.append(max(len(choice), 1))
    ll, _ = score_choices(model, pairs, batch_size=batch_size, mesh=mesh)
    n_tok = np.array([len(c) for _, c in pairs], np.float64)
    n_chars = np.asarray(n_chars, np.float64)
    owner = np.asarray(owner)
    hits = {"acc": 0, "acc_norm": 0, "acc_norm_token": 0}
    scores = []
    for i, ex in enumerate(examples):
        sel = owner == i
        for name, s in (("acc", ll[sel]), ("acc_norm", ll[sel] / n_chars[sel]),
                        ("acc_norm_token", ll[sel] / n_tok[sel])):  # fmt: skip
            hits[name] += int(np.argmax(s) == ex["label"])
        scores.append(ll[sel].tolist())
    n = len(examples)
    out: dict[str, Any] = {k: v / n for k, v in hits.items()}
    out["n"] = n
    if return_scores:
        out["scores"] = scores
    return out
