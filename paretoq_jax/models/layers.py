"""Building blocks of a Llama-family decoder in Flax NNX: QuantLinear, RMSNorm, RoPE, GQA
attention and the SwiGLU MLP.

Every parameter carries logical axis names in its ``out_sharding`` metadata ('layers', 'embed',
'vocab', 'heads', 'kv_heads', 'mlp', 'norm'); :mod:`paretoq_jax.sharding` maps them to mesh axes.
A module built with ``stack=(L,)`` holds its parameters stacked over ``L`` decoder layers
(``(L, in, out)``); the decoder runs it one layer slice at a time (scanned or unrolled).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.models.attention import Cudnn, Splash, causal_mask, dot_attention
from paretoq_jax.models.config import LlamaConfig

Array = jax.Array
# One layer's KV cache as the attention takes it: keys (after RoPE) and values
# ``(B, T, kv_heads, head_dim)`` and the slot where the current chunk is written.
LayerCache = tuple[Array, Array, Array]

# What a rematerialized decoder layer (``Llama(remat=True)``) keeps from its forward for the
# backward besides its input: the values named ``REMAT_KEEP`` (``jax.ad_checkpoint.
# checkpoint_name``), nothing else. Code gathering names each quantized linear's gathered packed
# codes and scales so (``CodeGather.keep``): the backward then unpacks them again instead of
# quantizing, packing and all-gathering the kernel a second time.
REMAT_KEEP = "gathered_codes"
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(REMAT_KEEP)


class ReadInPlace(nnx.Variable):
    """Base of stacked ``(L, ...)`` variables the decoder hands whole to every layer, which
    reads its own entry in place (:func:`layer_index`) instead of getting a slice: packed codes,
    whose slice XLA would copy into a buffer of its own before the native kernel reads it."""


_LAYER: contextvars.ContextVar = contextvars.ContextVar("paretoq_layer", default=None)


@contextlib.contextmanager
def running_layer(index: Array | int) -> Iterator[None]:
    """While tracing decoder layer ``index`` (a scan's traced counter or an int), modules
    holding whole :class:`ReadInPlace` stacks read entry ``index`` of them."""
    token = _LAYER.set(index)
    try:
        yield
    finally:
        _LAYER.reset(token)


def layer_index() -> Array | int | None:
    """The index of the decoder layer being traced (:func:`running_layer`), else ``None``."""
    return _LAYER.get()


def _param(
    rngs: nnx.Rngs | None,
    init: str,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype,
    std: float = 0.02,
) -> nnx.Param:
    """A parameter with logical axis names; ``init`` is 'normal', 'zeros' or 'ones'."""
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), dtype)
    else:
        value = jnp.ones(tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class QuantLinear(nnx.Module):
    """``y = x @ Q(kernel) + bias`` with ``Q = paretoq_jax.quant.fake_quant`` when quantized.

    ``kernel`` is a Flax kernel ``(in, out)`` (``(L, in, out)`` when stacked); a learned method adds
    a per-output-channel ``scale`` ``(out,)`` initialized with ``init_scale(kernel)``.
    ``weight()`` is the only place the effective weight is formed, so a packed-integer linear can
    replace it without touching the callers. ``gather`` (set by
    :func:`paretoq_jax.parallel.code_gather.configure`, ``None`` by default) makes it gather the
    sharded kernel's packed integer codes instead of floats under FSDP; same value and gradients.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        spec: quant.QuantSpec | None = None,
        use_bias: bool = False,
        names: tuple[str, str] = ("embed", "mlp"),
        stack: tuple[int, ...] = (),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        self.dtype = dtype
        lead = ("layers",) * len(stack)
        self.kernel = _param(
            rngs, "normal", (*stack, in_features, out_features), (*lead, *names), param_dtype, std
        )
        scale = None
        if spec is not None and spec.learned:
            value = quant.init_scale(self.kernel[...], spec).astype(param_dtype)
            scale = nnx.Param(value, out_sharding=(*lead, names[1]), eager_sharding=False)
        self.scale = scale
        bias = None
        if use_bias:
            bias = _param(rngs, "zeros", (*stack, out_features), (*lead, names[1]), param_dtype)
        self.bias = bias
        self.gather = None  # a code_gather.CodeGather: FSDP gathers packed codes, not floats

    def weight(self) -> Array:
        """The kernel the forward multiplies by: fake-quantized when a spec is set."""
        w = self.kernel[...]
        if self.spec is None:
            return w
        scale = None if self.scale is None else self.scale[...]
        if self.gather is not None:
            return self.gather(w, scale, self.spec)
        return quant.fake_quant(w, scale, self.spec)

    def __call__(
        self, x: Array, out_dtype=None, *, out_heads: int | None = None, in_heads: bool = False
    ) -> Array:
        """``x @ weight()``. ``out_heads``: the output features split as ``(heads, head_dim)``;
        ``in_heads``: ``x`` ends in ``(heads, head_dim)``, both contracted. The same product,
        written on the kernel reshaped rather than on the activations, so that XLA can lay the
        activations out as attention wants them without copying them (on TPU, reshaping a
        ``(b, s, heads * head_dim)`` product into heads had cost a copy of q, k and v)."""
        w = self.weight().astype(self.dtype)
        x = x.astype(self.dtype)
        if out_heads is not None:
            w = w.reshape(w.shape[0], out_heads, -1)  # (in, heads, head_dim)
            y = jnp.einsum("...d,dhk->...hk", x, w, preferred_element_type=out_dtype)
        elif in_heads:
            w = w.reshape(*x.shape[-2:], w.shape[-1])
            y = jnp.einsum("...hk,hkd->...d", x, w, preferred_element_type=out_dtype)
        else:
            y = jnp.dot(x, w, preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].reshape(y.shape[-2:] if out_heads else -1).astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (as HF Llama does)."""

    def __init__(
        self, dim: int, eps: float, *, stack: tuple[int, ...] = (), dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):  # fmt: skip
        self.eps, self.dtype = eps, dtype
        names = ("layers",) * len(stack) + ("norm",)
        self.weight = _param(None, "ones", (*stack, dim), names, param_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * x32).astype(self.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``theta^(-2i/d)`` with HF's ``linear`` and ``llama3`` scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    rs = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif config.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """``cos, sin`` of shape ``(..., seq, head_dim)`` (HF's half-split layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotary embedding on ``x (B, S, heads, Dh)``: ``x * cos + rotate_half(x) * sin``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    """Grouped-query causal self-attention (heads share K/V in groups; no K/V repetition)."""

    def __init__(
        self,
        config: LlamaConfig,
        specs: dict[str, quant.QuantSpec | None],
        *,
        stack: tuple[int, ...] = (),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim,
        )  # fmt: skip
        self.dtype = dtype
        self.sliding_window = c.sliding_window
        # set by models.attention.configure: a fused kernel for the causal uncached path
        self.fused: Splash | Cudnn | None = None
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, std=c.initializer_range)
        kw["rngs"] = rngs
        self.q_proj = QuantLinear(
            c.hidden_size, q_dim, spec=specs["q_proj"], use_bias=c.attention_bias,
            names=("embed", "heads"), **kw,
        )  # fmt: skip
        self.k_proj = QuantLinear(
            c.hidden_size, kv_dim, spec=specs["k_proj"], use_bias=c.attention_bias,
            names=("embed", "kv_heads"), **kw,
        )  # fmt: skip
        self.v_proj = QuantLinear(
            c.hidden_size, kv_dim, spec=specs["v_proj"], use_bias=c.attention_bias,
            names=("embed", "kv_heads"), **kw,
        )  # fmt: skip
        self.o_proj = QuantLinear(
            q_dim, c.hidden_size, spec=specs["o_proj"], use_bias=c.attention_out_bias,
            names=("heads", "embed"), **kw,
        )  # fmt: skip

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array | None, cache: LayerCache | None = None
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        """Attention of ``x (B, S, D)``; ``mask`` broadcasts to ``(B, kv, g, S, keys)``, None:
        the model's causal (sliding-window) mask, which ``fused`` may compute without forming it.

        Without ``cache`` the keys are the ``S`` tokens themselves. With ``cache = (k, v, at)``
        (this layer's keys after RoPE and values ``(B, T, kv_heads, head_dim)``, and the slot
        ``at`` where this chunk goes) the chunk's keys/values are written at ``at`` and the
        queries attend over the ``T`` cache slots; returns ``(out, (k, v))`` with the updated
        cache. Training, evaluation and KV-cache decoding run this one code path.
        """
        b, s, _ = x.shape
        kv, g, dh = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x, out_heads=kv * g), cos, sin)
        k = apply_rope(self.k_proj(x, out_heads=kv), cos, sin)
        v = self.v_proj(x, out_heads=kv)
        if cache is not None:
            k_cache, v_cache, at = cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, at, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, at, 0, 0))
            k, v = k_cache.astype(self.dtype), v_cache.astype(self.dtype)
        q = q.reshape(b, s, kv, g, dh)
        if mask is None and cache is None and self.fused is not None and self.fused.takes(s):
            out = self.fused(q, k, v)
        else:
            if mask is None:
                mask = causal_mask(s, self.sliding_window)
            out = dot_attention(q, k, v, mask, self.dtype)
        out = self.o_proj(out.reshape(b, s, kv * g, dh), in_heads=True)
        return out if cache is None else (out, (k_cache, v_cache))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(
        self,
        config: LlamaConfig,
        specs: dict[str, quant.QuantSpec | None],
        *,
        stack: tuple[int, ...] = (),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        c = config
        kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, std=c.initializer_range)
        kw.update(rngs=rngs, use_bias=c.mlp_bias)
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = QuantLinear(d, f, spec=specs["gate_proj"], names=("embed", "mlp"), **kw)
        self.up_proj = QuantLinear(d, f, spec=specs["up_proj"], names=("embed", "mlp"), **kw)
        self.down_proj = QuantLinear(f, d, spec=specs["down_proj"], names=("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(
        self,
        config: LlamaConfig,
        specs: dict[str, quant.QuantSpec | None],
        *,
        stack: tuple[int, ...] = (),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, **kw)
        self.self_attn = Attention(config, specs, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, **kw)
        self.mlp = MLP(config, specs, rngs=rngs, **kw)

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, cache: LayerCache | None = None
    ) -> Array | tuple[Array, tuple[Array, Array]]:
        """The block's output; with a KV ``cache`` (see :class:`Attention`) also the updated
        ``(k, v)`` of this layer."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        a, new_cache = (a, None) if cache is None else a
        x = x + a
        out = x + self.mlp(self.post_attention_layernorm(x))
        return out if cache is None else (out, new_cache)
