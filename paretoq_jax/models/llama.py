"""The Llama-family decoder: embeddings, ``L`` stacked decoder layers, final norm, LM head.

Decoder-layer parameters are stored stacked over layers (``(L, ...)``, logical axis 'layers') in a
single :class:`DecoderLayer`; the forward runs it one layer slice at a time, either with
``jax.lax.scan`` (``scan_layers=True``: compile time independent of depth) or unrolled in Python
(faster steps on CPU, compile time linear in depth). Both share one parameter layout, so
checkpoints and shardings do not depend on the choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax.models.config import LlamaConfig
from paretoq_jax.models.layers import (
    REMAT_POLICY,
    DecoderLayer,
    LayerCache,
    QuantLinear,
    ReadInPlace,
    RMSNorm,
    _param,
    rope_cos_sin,
    rope_inv_freq,
    running_layer,
)
from paretoq_jax.models.linears import PROJECTIONS
from paretoq_jax.models.rules import QuantRules
from paretoq_jax.sharding import constrain

Array = jax.Array

# Logical axes of the activations (``paretoq_jax.sharding.constrain``): the residual stream is
# split over the batch only (replicated over ``tensor``), the logits also over the vocabulary.
HIDDEN = ("batch", "length", None)
LOGITS = ("batch", "length", "vocab")


def layer_specs(config: LlamaConfig, rules: QuantRules) -> dict:
    """Per-projection `QuantSpec` shared by all layers (paths ``layers.{i}.self_attn.q_proj``...).

    Layers are stacked, so every layer must resolve to the same spec for a given projection.
    """
    specs = {}
    for name, sub in PROJECTIONS.items():
        found = {rules.spec_for(f"layers.{i}.{sub}") for i in range(config.num_hidden_layers)}
        if len(found) > 1:
            raise ValueError(
                f"quantization rules give layers.*.{sub} different settings across layers "
                f"({found}); stacked layers need one (bits, method) per projection"
            )
        specs[name] = found.pop()
    return specs


class Llama(nnx.Module):
    """A Llama-family causal LM. ``model(ids)`` with int ``(B, S)`` returns f32 ``(B, S, V)``."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        quant: QuantRules | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
        remat: bool = False,
        scan_layers: bool = True,
    ):
        rules = quant if quant is not None else QuantRules()
        self.config, self.rules = config, rules
        self.dtype, self.remat, self.scan_layers = dtype, remat, scan_layers
        self.embed_tokens = _param(
            rngs, "normal", (config.vocab_size, config.hidden_size), ("vocab", "embed"),
            param_dtype, config.initializer_range,
        )  # fmt: skip
        self.layers = DecoderLayer(
            config, layer_specs(config, rules), stack=(config.num_hidden_layers,), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                            param_dtype=param_dtype)  # fmt: skip
        lm_head = None
        if not config.tie_word_embeddings:
            lm_head = QuantLinear(
                config.hidden_size, config.vocab_size, spec=rules.spec_for("lm_head"),
                names=("embed", "vocab"), dtype=dtype, param_dtype=param_dtype,
                std=config.initializer_range, rngs=rngs,
            )  # fmt: skip
        self.lm_head = lm_head
        # RoPE frequencies: a static constant (a hashable tuple), not a parameter.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(config))

    def _decoder(
        self, h: Array, cos: Array, sin: Array, mask: Array | None, keep_all: bool = False,
        cache: LayerCache | None = None,
    ):  # fmt: skip
        """The decoder layers on ``h``: the last output, or with ``keep_all`` every layer's
        input plus the last output stacked ``(L + 1, ...)``. With ``cache = (k, v, at)``
        (every layer's cache stacked ``(L, B, T, kv_heads, head_dim)``, see
        :class:`~paretoq_jax.models.layers.Attention`) returns ``(last, (k, v))`` updated.
        Stacked variables are sliced per layer, except :class:`ReadInPlace` ones (packed
        codes), passed whole for the layer to read its own entry."""
        graphdef, whole, state = nnx.split(self.layers, ReadInPlace, ...)
        cached = cache is not None

        def step(carry, xs):
            layer_state, i = xs
            with running_layer(i):
                return layer_step(nnx.merge(graphdef, whole, layer_state), carry, i)

        def layer_step(layer, carry, i):
            if not cached:
                out = constrain(layer(carry, cos, sin, mask), HIDDEN)
                return out, (out if keep_all else None)
            h, k_all, v_all = carry
            out, (k_i, v_i) = layer(h, cos, sin, mask, (k_all[i], v_all[i], cache[2]))
            k_all = jax.lax.dynamic_update_index_in_dim(k_all, k_i, i, 0)
            v_all = jax.lax.dynamic_update_index_in_dim(v_all, v_i, i, 0)
            return (constrain(out, HIDDEN), k_all, v_all), None

        if self.remat:
            step = jax.checkpoint(step, policy=REMAT_POLICY)
        n = self.config.num_hidden_layers
        carry = (h, cache[0], cache[1]) if cached else h
        if self.scan_layers:
            carry, outs = jax.lax.scan(step, carry, (state, jnp.arange(n)))
        else:
            outs = []
            for i in range(n):
                carry, out = step(carry, (jax.tree.map(lambda a, i=i: a[i], state), i))
                outs.append(out)
            outs = jnp.stack(outs) if keep_all else None
        if cached:
            return carry[0], carry[1:]
        return jnp.concatenate([h[None], outs]) if keep_all else carry

    def _embed(
        self, input_ids: Array, positions: Array | None = None, mask: Array | None = None
    ) -> tuple[Array, tuple[Array, Array, Array | None]]:
        """Token embeddings ``(B, S, D)`` and the ``(cos, sin, mask)`` every layer takes.
        ``positions`` (``(B, S)``, default ``0..S-1``) set RoPE; ``mask`` None is the causal
        (sliding-window) mask, which each attention layer forms or fuses away
        (:mod:`paretoq_jax.models.attention`)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        seq = input_ids.shape[1]
        if isinstance(self.embed_tokens, nnx.Variable):
            h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        else:  # a module standing for the table (packed.Int8Embedding)
            h = self.embed_tokens(input_ids).astype(self.dtype)
        h = constrain(h, HIDDEN)
        positions = jnp.arange(seq)[None, :] if positions is None else positions
        cos, sin = rope_cos_sin(positions, np.asarray(self.inv_freq, np.float32))
        return h, (cos, sin, mask)

    def __call__(
        self,
        input_ids: Array,
        *,
        return_hidden: bool = False,
        cache: LayerCache | None = None,
        positions: Array | None = None,
        mask: Array | None = None,
        last_only: bool = False,
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        """Logits ``(B, S, V)`` in float32, or the final normed hidden ``(B, S, D)``.

        KV-cache decoding (:mod:`paretoq_jax.models.decode` keeps the bookkeeping) passes the
        stacked ``cache = (k, v, at)``, the tokens' ``positions (B, S)`` and a ``mask``
        ``(B, 1, 1, S, T)`` over the cache slots, and gets ``(logits, (k, v))``;
        ``last_only`` keeps only the last position's output.
        """
        h, ctx = self._embed(input_ids, positions, mask)
        h = self._decoder(h, *ctx, cache=cache)
        h, new_cache = (h, None) if cache is None else h
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        out = h if return_hidden else self.lm_logits(h)
        return out if cache is None else (out, new_cache)

    def residual_stream(self, input_ids: Array) -> Array:
        """The residual stream entering every decoder layer and leaving the last (before the
        final norm): ``(L + 1, B, S, D)``. ``lm_logits(norm(out[-1]))`` are the logits."""
        h, ctx = self._embed(input_ids)
        return self._decoder(h, *ctx, keep_all=True)

    def layers_on(self, input_ids: Array, inputs: Array) -> Array:
        """Decoder layer ``l`` applied to ``inputs[l]`` for every ``l`` at once (one vmapped
        call over the stacked layers): ``(L, B, S, D)`` -> ``(L, B, S, D)``. With the teacher's
        ``residual_stream`` as ``inputs`` this is the per-layer reconstruction of block-wise
        distillation; ``input_ids`` only fix the positions and mask."""
        _, ctx = self._embed(input_ids)
        graphdef, state = nnx.split(self.layers)

        def one(layer_state, h):
            return nnx.merge(graphdef, layer_state)(h, *ctx)

        if self.remat:
            one = jax.checkpoint(one, policy=REMAT_POLICY)
        return jax.vmap(one)(state, inputs)

    def lm_logits(self, hidden: Array) -> Array:
        """Float32 logits of hidden states ``(..., D)`` (tied: ``hidden @ embed_tokens.T``)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden, out_dtype=jnp.float32)
        elif not isinstance(self.embed_tokens, nnx.Variable):
            logits = self.embed_tokens.attend(hidden)
        else:
            emb = self.embed_tokens[...].astype(self.dtype)
            logits = jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), emb,
                                preferred_element_type=jnp.float32)  # fmt: skip
        return constrain(logits, LOGITS) if logits.ndim == 3 else logits
