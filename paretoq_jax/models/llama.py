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
    DecoderLayer,
    QuantLinear,
    RMSNorm,
    _param,
    rope_cos_sin,
    rope_inv_freq,
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

    def _mask(self, seq: int) -> Array:
        q, k = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
        mask = k <= q
        if self.config.sliding_window is not None:
            mask &= q - k < self.config.sliding_window
        return mask

    def _decoder(self, h: Array, cos: Array, sin: Array, mask: Array, keep_all: bool = False):
        """The decoder layers on ``h``: the last output, or with ``keep_all`` every layer's
        input plus the last output stacked ``(L + 1, ...)``."""
        graphdef, state = nnx.split(self.layers)

        def step(h, layer_state):
            out = nnx.merge(graphdef, layer_state)(h, cos, sin, mask)
            out = constrain(out, HIDDEN)
            return out, (out if keep_all else None)

        if self.remat:
            step = jax.checkpoint(step)
        if self.scan_layers:
            last, outs = jax.lax.scan(step, h, state)
        else:
            outs, last = [], h
            for i in range(self.config.num_hidden_layers):
                last, out = step(last, jax.tree.map(lambda a, i=i: a[i], state))
                outs.append(out)
            outs = jnp.stack(outs) if keep_all else None
        return jnp.concatenate([h[None], outs]) if keep_all else last

    def _embed(self, input_ids: Array) -> tuple[Array, tuple[Array, Array, Array]]:
        """Token embeddings ``(B, S, D)`` and the ``(cos, sin, mask)`` every layer takes."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        seq = input_ids.shape[1]
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        h = constrain(h, HIDDEN)
        cos, sin = rope_cos_sin(jnp.arange(seq)[None, :], np.asarray(self.inv_freq, np.float32))
        return h, (cos, sin, self._mask(seq)[None, None, None])

    def __call__(self, input_ids: Array, *, return_hidden: bool = False) -> Array:
        """Logits ``(B, S, V)`` in float32, or the final normed hidden ``(B, S, D)``."""
        h, ctx = self._embed(input_ids)
        h = self.norm(self._decoder(h, *ctx))
        return h if return_hidden else self.lm_logits(h)

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
            one = jax.checkpoint(one)
        return jax.vmap(one)(state, inputs)

    def lm_logits(self, hidden: Array) -> Array:
        """Float32 logits of hidden states ``(..., D)`` (tied: ``hidden @ embed_tokens.T``)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden, out_dtype=jnp.float32)
        else:
            emb = self.embed_tokens[...].astype(self.dtype)
            logits = jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), emb,
                                preferred_element_type=jnp.float32)  # fmt: skip
        return constrain(logits, LOGITS) if logits.ndim == 3 else logits
