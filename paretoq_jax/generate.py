"""Text generation with a KV cache: ``python -m paretoq_jax.generate --model PATH --prompt "..."``.

Greedy decoding (``temperature=0``, the default) or sampling with temperature, top-k and top-p
(nucleus) from a PRNG key. Prompts are left-padded to a bucketed length and prefilled in one
jitted call; the new tokens are then decoded by one compiled ``lax.while_loop`` over tokens
(:mod:`paretoq_jax.models.decode` keeps the KV cache), with no Python dispatch per token.
A row stops at an end-of-sequence token, at a stop string (the text is cut before it), or
after ``max_new_tokens``. Shapes are bucketed so a handful of compilations serve any prompt.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax.cli import run_cli
from paretoq_jax.models.decode import forward_cached, init_cache, materialize_quantized
from paretoq_jax.models.llama import Llama
from paretoq_jax.models.packed import use_kernel
from paretoq_jax.run.load import load_model

__all__ = [
    "SamplingConfig",
    "sample_logits",
    "generate_tokens",
    "generate",
    "load_for_generation",
    "main",
]

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this (one prefill compile per bucket)
CACHE_BUCKET = 64  # cache length is rounded up to a multiple of this
STOP_CHECK_EVERY = 16  # with stop strings, tokens decoded per compiled loop between host checks


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature=0``: greedy (argmax). Otherwise sample from ``softmax(logits / T)``
    restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set whose
    probability reaches ``top_p`` (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next tokens ``(B,)`` int32 from float logits ``(B, V)`` (pure; ``cfg`` is static)."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token while the mass of the tokens before it is below top_p (the first is kept)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < cfg.top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _prefill(graphdef, state, ids, cache, key, sampling):
    model = nnx.merge(graphdef, state)
    logits, cache = forward_cached(model, ids, cache, last_only=True)
    logits = logits[:, 0]
    return sample_logits(logits, key, sampling), logits, cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampling", "steps", "keep_logits"),
    donate_argnames=("cache",),
)  # fmt: skip
def _decode_loop(graphdef, state, token, cache, key, n, done, eos, sampling, steps, keep_logits):
    """Up to ``n <= steps`` decode steps as one compiled ``lax.while_loop`` (no per-token
    Python dispatch); it stops early once every row is ``done`` (has produced an ``eos`` id).
    Returns the steps run, the last token, cache, key and ``done``, the new tokens
    ``(B, steps)`` and, with ``keep_logits``, their float32 logits ``(B, steps, V)``."""
    model = nnx.merge(graphdef, state)
    b = token.shape[0]
    tokens = jnp.zeros((b, steps), jnp.int32)
    logits_buf = jnp.zeros((b, steps, model.config.vocab_size) if keep_logits else (0,))

    def cond(c):
        return (c[0] < n) & ~jnp.all(c[4])

    def body(c):
        i, token, cache, key, done, tokens, logits_buf = c
        key, sub = jax.random.split(key)
        logits, cache = forward_cached(model, token[:, None], cache)
        token = sample_logits(logits[:, 0], sub, sampling)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, 1)
        if keep_logits:
            logits_buf = jax.lax.dynamic_update_index_in_dim(logits_buf, logits[:, 0], i, 1)
        done = done | jnp.any(token[:, None] == eos[None, :], axis=-1)
        return i + 1, token, cache, key, done, tokens, logits_buf

    init = (jnp.zeros((), jnp.int32), token, cache, key, done, tokens, logits_buf)
    return jax.lax.while_loop(cond, body, init)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def generate_tokens(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    return_logits: bool = False,
    materialize: bool = True,
    kernel: str | None = None,
) -> list[list[int]] | tuple[list[list[int]], np.ndarray]:
    """New token ids for each prompt (token-id lists), decoded with a KV cache.

    A row stops after an ``eos_ids`` token (kept in its output), when ``should_stop(row,
    new_tokens)`` returns True, or after ``max_new_tokens``. Prompts longer than the model's
    context minus ``max_new_tokens`` keep their last tokens. With ``return_logits``, also the
    float32 logits of every step ``(B, steps, V)`` (for tests). ``materialize`` folds the
    fake-quantized weights once (:func:`~paretoq_jax.models.decode.materialize_quantized`)
    into a copy that scans its layers; ``materialize=False`` decodes ``model`` as it is.
    ``kernel``: how a packed model's products run, ``"auto"`` (the native CPU kernel when it
    builds, else XLA), ``"native"`` or ``"xla"``; ``None`` keeps the model's own setting
    (default ``$PARETOQ_KERNEL`` or auto; :mod:`paretoq_jax.kernels`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a BOS token to empty ones)")
    max_pos = model.config.max_position_embeddings
    if max_new_tokens >= max_pos:
        raise ValueError(f"max_new_tokens={max_new_tokens} >= the model's context of {max_pos}")
    keep = max_pos - max_new_tokens
    prompts = [list(p)[-keep:] for p in prompts]
    b = len(prompts)
    p_len = min(_round_up(max(len(p) for p in prompts), PROMPT_BUCKET), keep)
    t_len = min(_round_up(p_len + max_new_tokens, CACHE_BUCKET), max_pos)
    ids = np.full((b, p_len), pad_id, np.int32)
    start = np.zeros(b, np.int32)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p) :] = p
        start[i] = p_len - len(p)

    run_model = model
    if materialize:
        run_model = materialize_quantized(model)
        # One decode step scans the stacked layers: on CPU, SmolLM2-135M decodes 5.7x faster
        # scanned than unrolled (9.4 vs 1.6 tokens/s, batch 1; docs/evaluation.md).
        run_model.scan_layers = True
    if kernel is not None:
        run_model = use_kernel(run_model if materialize else nnx.clone(model), kernel)
    graphdef, state = nnx.split(run_model)
    cache = init_cache(run_model, b, t_len, start=start)
    key = jax.random.PRNGKey(seed)
    eos = set(int(e) for e in eos_ids)
    eos_dev = jnp.asarray(sorted(eos) or [-1], jnp.int32)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    all_logits = []

    def take(tokens: np.ndarray) -> None:  # one step's tokens (B,): append, check stops
        for i in np.flatnonzero(~done):
            out[i].append(int(tokens[i]))
            if int(tokens[i]) in eos or (should_stop is not None and should_stop(int(i), out[i])):
                done[i] = True

    key, sub = jax.random.split(key)
    token, logits, cache = _prefill(graphdef, state, jnp.asarray(ids), cache, sub, sampling)
    take(np.asarray(token))
    if return_logits:
        all_logits.append(np.asarray(logits))
    left = max_new_tokens - 1
    # Without stop callbacks the rest is one compiled loop; stop strings are checked on the
    # host every STOP_CHECK_EVERY tokens (a row may decode a few tokens past its stop string;
    # they are dropped here).
    steps = _round_up(left, CACHE_BUCKET) if should_stop is None else STOP_CHECK_EVERY
    while left > 0 and not done.all():
        n = min(left, steps)
        ran, token, cache, key, _, tokens, logits_buf = _decode_loop(
            graphdef, state, token, cache, key, jnp.asarray(n, jnp.int32), jnp.asarray(done),
            eos_dev, sampling, steps, return_logits,
        )  # fmt: skip
        ran = int(ran)
        tokens = np.asarray(tokens)
        chunk_logits = np.asarray(logits_buf) if return_logits else None  # one transfer
        for j in range(ran):
            if done.all():
                break
            if return_logits:
                all_logits.append(chunk_logits[:, j])
            take(tokens[:, j])
        left -= ran
    if return_logits:
        return out, np.stack(all_logits, axis=1)
    return out


def _eos_ids(tokenizer: Any, model: Llama) -> list[int]:
    ids = set()
    for e in (getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return sorted(ids)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(
    model: Llama,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    add_bos: bool | None = None,
    stop_at_eos: bool = True,
    kernel: str | None = None,
) -> list[str]:
    """Continuations of text ``prompts`` (the prompt is not included).

    ``stop``: strings that end a row; the returned text is cut before the first one.
    ``add_bos``: prepend the tokenizer's BOS token (default: when the tokenizer defines one and
    its encoding does not already add it). ``kernel``: as for :func:`generate_tokens`.
    """
    sampling = SamplingConfig(temperature, top_k, top_p)
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = []
    for p in prompts:
        ids = list(tokenizer(p, add_special_tokens=False)["input_ids"])
        if (add_bos or (add_bos is None and bos is not None)) and bos is not None:
            ids = [bos] + ids
        if not ids:  # an empty prompt starts from BOS (or EOS), as lm-eval scores empty contexts
            start = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
            if start is None:
                raise ValueError(
                    "empty prompt and the tokenizer has no BOS/EOS token to start from"
                )
            ids = [start]
        encoded.append(ids)
    stop = [s for s in stop if s]

    def should_stop(_row: int, new: list[int]) -> bool:
        return _cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)[1]

    pad = getattr(tokenizer, "pad_token_id", None)
    new_tokens = generate_tokens(
        model, encoded, max_new_tokens, sampling=sampling, seed=seed,
        eos_ids=_eos_ids(tokenizer, model) if stop_at_eos else (),
        pad_id=0 if pad is None else int(pad), should_stop=should_stop if stop else None,
        kernel=kernel,
    )  # fmt: skip
    texts = []
    for toks in new_tokens:
        text = tokenizer.decode(toks, skip_special_tokens=True)
        texts.append(_cut_at_stop(text, stop)[0])
    return texts


def load_for_generation(
    path: str, *, bits: Any = None, method: str | None = None, dequantize: bool = False
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` to generate with: :func:`paretoq_jax.run.load.load_model`, except
    that a packed export computes from its packed codes (an int8 embedding stays int8) unless
    ``dequantize``, which loads it as a float model holding exactly its weights (as evaluation
    does: bit-identical logits, slower decoding)."""
    return load_model(
        path, bits=bits, method=method, packed_mode="dequantize" if dequantize else "packed"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m paretoq_jax.generate",
        description="Generate text with a KV cache (greedy by default).",
    )
    p.add_argument("--model", required=True, help="run dir, HF folder, .gguf file or hub id")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--bits", default=None, help="quantize a float checkpoint (RTN) at load")
    p.add_argument("--method", default=None, help="quantizer method with --bits")
    p.add_argument(
        "--dequantize", action="store_true",
        help="packed export: load it as float weights instead of computing from its codes",
    )  # fmt: skip
    p.add_argument(
        "--kernel", choices=("auto", "native", "xla"), default=None,
        help="packed export: native CPU kernel (auto: when it builds) or XLA; default "
        "$PARETOQ_KERNEL or auto",
    )  # fmt: skip
    args = p.parse_args(argv)
    model, tokenizer = load_for_generation(
        args.model, bits=args.bits, method=args.method, dequantize=args.dequantize
    )
    texts = generate(
        model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop, kernel=args.kernel,
    )  # fmt: skip
    for prompt, text in zip(args.prompt, texts, strict=True):
        sys.stdout.write(f"{prompt}{text}\n")
        if len(args.prompt) > 1:
            sys.stdout.write("-" * 40 + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
