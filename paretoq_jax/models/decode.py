"""KV-cache decoding for :class:`~paretoq_jax.models.llama.Llama`: prefill a prompt, then one
token per step, attending to cached keys and values instead of recomputing the prefix.

The cache is a dict of arrays (a pytree, so it passes through ``jax.jit``)::

    k, v   (L, B, T, kv_heads, head_dim)   keys (after RoPE) and values of every layer
    start  (B,) int32                      first real slot of each row (prompts are left-padded)
    length () int32                        slots written so far (the next write index)

Prompts of different lengths are left-padded to a common length, so every row writes the same
slot at each step. A row's token in slot ``j`` sits at position ``j - start[b]`` (RoPE uses
that position); query slot ``i`` attends to key slots ``start[b] <= j <= i`` (and
``i - j < sliding_window`` for Mistral). Padded rows therefore compute exactly what the same
prompt computes alone with ``model(ids)``.

The model itself runs the tokens: its attention and decoder layers take an optional KV cache
(:class:`~paretoq_jax.models.layers.Attention`), so training, evaluation and decoding share one
code path. This module keeps only the bookkeeping: the cache's layout, the slots, positions and
mask of a chunk, and the cache's growth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax.models.linears import quant_linears
from paretoq_jax.models.llama import Llama

Array = jax.Array
Cache = dict[str, Array]

__all__ = ["init_cache", "forward_cached", "materialize_quantized", "Cache"]


def init_cache(
    model: Llama, batch: int, max_len: int, *, start: Array | np.ndarray | None = None, dtype=None
) -> Cache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated).

    ``start``: per-row number of left-padding slots (default 0); ``dtype`` defaults to the
    model's compute dtype.
    """
    c = model.config
    if max_len > c.max_position_embeddings:
        raise ValueError(
            f"max_len={max_len} exceeds the model's max_position_embeddings="
            f"{c.max_position_embeddings}; shorten the prompt or max_new_tokens"
        )
    dtype = model.dtype if dtype is None else dtype
    shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    if start.shape != (batch,):
        raise ValueError(f"start must have shape ({batch},), got {start.shape}")
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "start": start,
        "length": jnp.zeros((), jnp.int32),
    }


def _mask(model: Llama, cache: Cache, s: int) -> Array:
    """``(B, 1, 1, S, T)``: query slot ``length + i`` sees key slots ``start <= j <= it``."""
    t = cache["k"].shape[2]
    q = cache["length"] + jnp.arange(s)[:, None]  # (S, 1)
    k = jnp.arange(t)[None, :]  # (1, T)
    mask = (k <= q)[None] & (k[None] >= cache["start"][:, None, None])  # (B, S, T)
    if model.config.sliding_window is not None:
        mask &= (q - k < model.config.sliding_window)[None]
    return mask[:, None, None]


def forward_cached(
    model: Llama, input_ids: Array, cache: Cache, *, last_only: bool = False
) -> tuple[Array, Cache]:
    """Run ``input_ids (B, S)`` (the next ``S`` slots of every row) through the model, reading
    and extending ``cache``. Returns float32 logits ``(B, S, V)`` (``(B, 1, V)`` with
    ``last_only``) and the new cache. Prefill is a call with the whole left-padded prompt;
    a decode step is a call with ``S = 1``. Traceable: call it under ``jax.jit``/``nnx.jit``.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    b, s = input_ids.shape
    if cache["k"].shape[1] != b:
        raise ValueError(f"cache holds {cache['k'].shape[1]} rows, input_ids has {b}")
    length = cache["length"]
    slots = length + jnp.arange(s)[None, :]  # (1, S)
    positions = jnp.maximum(slots - cache["start"][:, None], 0)  # (B, S); pads clamp to 0
    logits, (k, v) = model(
        input_ids, cache=(cache["k"], cache["v"], length), positions=positions,
        mask=_mask(model, cache, s), last_only=last_only,
    )  # fmt: skip
    return logits, {"k": k, "v": v, "start": cache["start"], "length": length + s}


def materialize_quantized(model: Llama) -> Llama:
    """A copy of ``model`` whose quantized linears hold their effective (fake-quantized) kernel
    with quantization switched off, so decoding does not re-quantize every weight at every
    token. Its forward equals the original's: ``Q(kernel)`` is what the original multiplies by.
    """
    model = nnx.clone(model)
    for module in quant_linears(model).values():
        module.kernel[...] = jax.lax.stop_gradient(module.weight())
        module.spec = None
        module.scale = None
    return model
