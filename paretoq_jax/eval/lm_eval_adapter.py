"""lm-evaluation-harness model ``paretoq_jax`` (lm_eval >= 0.4; an optional dependency).

    python -m paretoq_jax.eval.lm_eval_adapter --model paretoq_jax \\
        --model_args path=runs/smollm2-2bit,batch_size=16 --tasks piqa,arc_easy

This runs lm_eval's own command line after registering the model (lm_eval 0.4.x looks models up
only in its registry, so the plain ``lm_eval`` command does not see third-party models; from
Python, importing this module is enough: ``lm_eval.simple_evaluate(model="paretoq_jax", ...)``).

``model_args``: ``path`` (anything :func:`paretoq_jax.eval.load_model` accepts), ``batch_size``,
``max_length`` (default: the model's context), ``bits``/``method`` (quantize a float checkpoint
at load), ``add_bos`` (prepend BOS to every context; default False, as lm-eval's HF model),
``max_gen_toks`` (default 256). Scoring goes through :mod:`paretoq_jax.eval.scoring` (batched,
jitted, bucketed lengths); generation through :func:`paretoq_jax.generate.generate` (KV cache).

Differences from lm-eval's HF model, both at the context limit only: a scored sequence keeps its
last ``max_length`` tokens (HF keeps ``max_length + 1`` and drops the unscored last input), and
rolling windows hold ``max_length - 1`` predictions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
except ImportError as e:  # pragma: no cover - exercised only without lm_eval installed
    raise ImportError(
        "paretoq_jax.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm_eval"
    ) from e

from paretoq_jax.generate import generate

from .multiple_choice import score_choices

__all__ = ["ParetoQLM", "register", "main"]

MODEL_NAME = "paretoq_jax"


class ParetoQLM(TemplateLM):
    """An lm-eval ``LM`` over a paretoq_jax model (``loglikelihood``, ``loglikelihood_rolling``,
    ``generate_until``). Pass ``path=...`` or an already-built ``model`` and ``tokenizer``."""

    def __init__(
        self,
        path: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        bits: Any = None,
        method: str | None = None,
        add_bos: bool = False,
        max_gen_toks: int = 256,
        **unused: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if path is None:
                raise ValueError("paretoq_jax needs model_args path=<run dir|HF folder|.gguf>")
            from . import load_model

            model, tokenizer = load_model(path, bits=bits, method=method)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with model=")
        self.model, self.tokenizer = model, tokenizer
        # "auto" / "auto:N" (lm-eval's batch-size search) falls back to 8.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        ctx = model.config.max_position_embeddings
        self.max_length = min(int(max_length), ctx) if max_length else ctx
        self.add_bos = bool(add_bos)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's constructor hook; ``model_args`` win over the command line's defaults
        (``--batch_size`` is passed both ways)."""
        merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
        merged.update(arg_dict)
        return cls(**merged)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens: Sequence[int], **kw) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], list[bool]]:
        ll, greedy = score_choices(
            self.model, pairs, batch_size=self.batch_size, max_length=self.max_length
        )
        return [float(x) for x in ll], [bool(g) for g in greedy]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        ll, greedy = self._score(pairs)
        out = []
        for (key, _, _), lp, g in zip(requests, ll, greedy, strict=True):
            out.append((lp, g))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (lp, g))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of whole texts, in disjoint windows of the model's context."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1,
                context_len=1,
            )
            for w in windows:
                pairs.append(make_disjoint_window(w))
                owner.append(i)
        ll, _ = self._score(pairs) if pairs else ([], [])
        totals = [0.0] * len(requests)
        for i, lp in zip(owner, ll, strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations cut at the ``until`` strings."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        eos_text = self.tokenizer.decode([self.eot_token_id])
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if sample else 0.0
            for lo in range(0, len(idx), self.batch_size):
                rows = idx[lo : lo + self.batch_size]
                texts = generate(
                    self.model, self.tokenizer, [requests[i].args[0] for i in rows], max_new,
                    temperature=temperature, top_k=int(kwargs.get("top_k", 0) or 0),
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=int(kwargs.get("seed", 0)),
                    stop=until, add_bos=self.add_bos,
                )  # fmt: skip
                for i, text in zip(rows, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


def register() -> None:
    """Register ``ParetoQLM`` as lm-eval model ``paretoq_jax`` (idempotent; runs on import)."""
    import lm_eval.models  # noqa: F401  (lm_eval's own models first: it skips them otherwise)

    if model_registry.get(MODEL_NAME, None) is None:
        register_model(MODEL_NAME)(ParetoQLM)


if __name__ != "__main__":  # run as a script, the importable module registers its own class
    register()


def main(argv: Sequence[str] | None = None) -> int:
    """lm_eval's command line with ``paretoq_jax`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    from paretoq_jax.eval.lm_eval_adapter import main as _main  # the importable module's copy

    raise SystemExit(_main())
