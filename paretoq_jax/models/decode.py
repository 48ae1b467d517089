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

Every layer computation reuses the model's own submodules (norms, q/k/v/o projections, MLP,
``apply_rope``); only the attention core is written here, because it reads the cache. The
decoder layers are stacked, and run one slice at a time (``lax.scan`` or unrolled, following
``model.scan_layers``) as in ``Llama._decoder``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax.models.layers import DecoderLayer, QuantLinear, apply_rope, rope_cos_sin
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


def _cached_attention(
    layer: DecoderLayer,
    x: Array,
    cos: Array,
    sin: Array,
    k_cache: Array,
    v_cache: Array,
    write_at: Array,
    mask: Array,
) -> tuple[Array, Array, Array]:
    """Attention of ``x (B, S, D)`` over the cache after writing this chunk's K/V at slot
    ``write_at``. Returns the attention output and the updated ``(B, T, kv, dh)`` caches."""
    attn = layer.self_attn
    b, s, _ = x.shape
    kv, g, dh = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
    q = apply_rope(attn.q_proj(x).reshape(b, s, kv * g, dh), cos, sin)
    k = apply_rope(attn.k_proj(x).reshape(b, s, kv, dh), cos, sin)
    v = attn.v_proj(x).reshape(b, s, kv, dh)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, write_at, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, write_at, 0, 0))
    q = q.reshape(b, s, kv, g, dh)
    keys, values = k_cache.astype(attn.dtype), v_cache.astype(attn.dtype)
    # The same attention core as layers.Attention, over the T cache slots instead of S tokens.
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(dh), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(attn.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, values).reshape(b, s, kv * g * dh)
    return attn.o_proj(out), k_cache, v_cache


def _layer(layer: DecoderLayer, h, cos, sin, k_cache, v_cache, write_at, mask):
    """One pre-norm decoder block (as ``DecoderLayer.__call__``) with cached attention."""
    a, k_cache, v_cache = _cached_attention(
        layer, layer.input_layernorm(h), cos, sin, k_cache, v_cache, write_at, mask
    )
    h = h + a
    return h + layer.mlp(layer.post_attention_layernorm(h)), k_cache, v_cache


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
    cos, sin = rope_cos_sin(positions, np.asarray(model.inv_freq, np.float32))
    mask = _mask(model, cache, s)
    h = jnp.take(model.embed_tokens[...], input_ids, axis=0).astype(model.dtype)

    graphdef, state = nnx.split(model.layers)

    def step(carry, xs):
        h, k_all, v_all = carry
        layer_state, i = xs
        layer = nnx.merge(graphdef, layer_state)
        h, k_i, v_i = _layer(layer, h, cos, sin, k_all[i], v_all[i], length, mask)
        k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_i, i, 0)
        v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_i, i, 0)
        return (h, k_all, v_all), None

    n_layers = model.config.num_hidden_layers
    carry = (h, cache["k"], cache["v"])
    if model.scan_layers:
        carry = jax.lax.scan(step, carry, (state, jnp.arange(n_layers)))[0]
    else:
        for i in range(n_layers):
            carry = step(carry, (jax.tree.map(lambda a, i=i: a[i], state), i))[0]
    h, k_all, v_all = carry
    if last_only:
        h = h[:, -1:]
    logits = model.lm_logits(model.norm(h))
    new_cache = {"k": k_all, "v": v_all, "start": cache["start"], "length": length + s}
    return logits, new_cache


def materialize_quantized(model: Llama) -> Llama:
    """A copy of ``model`` whose quantized linears hold their effective (fake-quantized) kernel
    with quantization switched off, so decoding does not re-quantize every weight at every
    token. Its forward equals the original's: ``Q(kernel)`` is what the original multiplies by.
    """
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, QuantLinear) and module.spec is not None:
            module.kernel[...] = jax.lax.stop_gradient(module.weight())
            module.spec = None
            module.scale = None
    return model
