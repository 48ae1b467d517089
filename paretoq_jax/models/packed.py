"""Inference straight from packed integer codes: a drop-in for a quantized :class:`QuantLinear`.

:class:`PackedLinear` holds a kernel's codes packed at their real bit density
(:func:`paretoq_jax.quant.pack`, layout ``docs/packed-format.md``) and the per-output-channel
*effective* scale ``a``; its forward is :func:`paretoq_jax.quant.packed_matmul`, which unpacks
one tile of codes at a time inside the jitted computation, so the whole float weight
``W = a * (k + z) / n`` (quantizers.md, codes table) never exists in memory.

:func:`to_packed_model` swaps every quantized ``QuantLinear`` of a model for a ``PackedLinear``
(NNX module surgery); stacked decoder layers keep their leading layer axis, so the decoder's
scan and the KV-cache decoder (:mod:`paretoq_jax.models.decode`) run it unchanged.

Each ``PackedLinear`` / ``Int8Embedding`` has a ``kernel`` (``"auto"``, ``"native"``,
``"xla"``; ``None`` = ``$PARETOQ_KERNEL`` or ``"auto"``) that picks how its product runs: the
native CPU kernel of :mod:`paretoq_jax.kernels` (``jax.ffi``) or XLA. :func:`use_kernel` sets
it on a whole model; :func:`_product` is the one place the choice is made.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from paretoq_jax import kernels, quant
from paretoq_jax.models.layers import QuantLinear, ReadInPlace, layer_index
from paretoq_jax.models.linears import quant_linears

__all__ = [
    "Int8Embedding",
    "PackedCodes",
    "PackedLinear",
    "int8_embeddings",
    "linear_codes",
    "packed_linears",
    "to_packed_model",
    "use_kernel",
]

Array = jax.Array

EMBED_TYPES = ("float", "int8")  # how a packed model stores its token embedding / tied head

_codes_and_scale = jax.jit(quant.export_codes, static_argnums=2)


def _layout(fmt: quant.PackFormat) -> str:
    """The native kernel's name of a packed layout: field widths (``"2,1"``) or ``"base3"``."""
    return "base3" if fmt.base3 else ",".join(map(str, fmt.fields))


def _product(
    module: PackedLinear | Int8Embedding, x: Array, at: Array | int | None = None
) -> Array:
    """The module's float32 product with ``x`` (already in the module's compute dtype): the
    native kernel or XLA, as ``module.kernel`` resolves (:func:`paretoq_jax.kernels.resolve`).
    Both compute the same sum (float rounding aside). ``at``: the layer of stacked codes
    (``(L, P, R, out)``) to use, read in place by the native kernel."""
    rows = math.prod(x.shape[:-1])
    native = kernels.resolve(module.kernel, rows) == "native"
    if isinstance(module, Int8Embedding):  # logits = (h @ codes_t) * scale
        if native:
            codes = module.codes_t[...]
            return kernels.packed_linear(
                x, codes[None], module.scale[...], layout="int8", in_features=codes.shape[0],
                mult=1.0, offset=0.0, n=1.0, eps=0.0,
            )  # fmt: skip
        logits = jnp.dot(x, module.codes_t[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return logits * module.scale[...]
    spec, fmt = module.spec, quant.pack_format(module.spec.bits, module.ternary)
    packed, scale = module.packed[...], module.scale[...]
    if native:
        return kernels.packed_linear(
            x, packed, scale, layout=_layout(fmt), in_features=module.in_features,
            mult=fmt.mult, offset=fmt.kmin + spec.z, n=spec.n, eps=quant.SCALE_EPS, layer=at,
        )  # fmt: skip
    if at is not None:  # a slice XLA fuses into the unpacking
        packed, scale = (
            jax.lax.dynamic_index_in_dim(a, at, keepdims=False) for a in (packed, scale)
        )
    return quant.packed_matmul(
        x, packed, scale, spec.bits, module.in_features,
        method=spec.method, ternary=module.ternary, tile_rows=module.tile_rows,
    )  # fmt: skip


def linear_codes(lin: QuantLinear) -> tuple[Array, Array]:
    """Integer codes (int8, the kernel's shape) and effective scale of a quantized linear.

    Stacked kernels ``(L, in, out)`` are done one layer slice at a time, as the forward runs
    them: for ``absmean`` the scale is a mean over ``in`` whose float rounding depends on the
    shape it is reduced in, and this keeps it bit-identical to the forward's.
    """
    if lin.spec is None:
        raise ValueError("linear_codes needs a quantized linear (spec=None is a float layer)")
    kernel = lin.kernel[...]
    scale = None if lin.scale is None else lin.scale[...]
    if kernel.ndim == 2:
        return _codes_and_scale(kernel, scale, lin.spec)
    parts = [
        _codes_and_scale(kernel[i], None if scale is None else scale[i], lin.spec)
        for i in range(kernel.shape[0])
    ]
    return jnp.stack([c for c, _ in parts]), jnp.stack([a for _, a in parts])


class PackedCodes(ReadInPlace):
    """uint8 packed codes (not a trainable parameter); stacked over layers, the decoder
    passes them whole and each layer's product reads its own entry in place."""


class PackedScale(ReadInPlace):
    """The effective per-output-channel scale of packed codes (not trainable)."""


class PackedLinear(nnx.Module):
    """``y = x @ W + bias`` with ``W`` stored as packed integer codes and an effective scale.

    Attributes:
      packed: uint8 ``(P, R, out)`` (``(L, P, R, out)`` when stacked over ``L`` layers): the
        codes of the Flax kernel ``(in, out)`` packed along ``in``.
      scale: float32 effective scale ``(out,)`` (``(L, out)``), as for ``quant.from_codes``.
      bias: optional ``(out,)`` (``(L, out)``) parameter.
      spec: the :class:`~paretoq_jax.quant.QuantSpec` the codes came from.
      ternary: the 1.58-bit layout (``"2bit"`` or ``"base3"``).
      kernel: ``"auto"``, ``"native"`` or ``"xla"`` (``None``: ``$PARETOQ_KERNEL``, else
        auto); see :mod:`paretoq_jax.kernels`.
    """

    def __init__(
        self,
        packed: Array,
        scale: Array,
        *,
        spec: quant.QuantSpec,
        in_features: int,
        ternary: str = "2bit",
        bias: Array | None = None,
        dtype=jnp.float32,
        tile_rows: int | None = None,
        kernel: str | None = None,
    ):
        out_features = int(packed.shape[-1])
        stack = tuple(packed.shape[:-3])
        expected = (*stack, *quant.packed_shape((in_features, out_features), spec.bits,
                                                ternary=ternary))  # fmt: skip
        if tuple(packed.shape) != expected:
            raise ValueError(
                f"packed codes have shape {tuple(packed.shape)}, expected {expected} for a kernel "
                f"({in_features}, {out_features}) at bits={spec.bits} (ternary={ternary!r})"
            )
        if tuple(scale.shape) != (*stack, out_features):
            raise ValueError(
                f"scale has shape {tuple(scale.shape)}, expected {(*stack, out_features)} "
                "(one effective scale per output channel)"
            )
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.ternary, self.dtype, self.tile_rows = spec, ternary, dtype, tile_rows
        self.kernel = kernel
        self.packed = PackedCodes(jnp.asarray(packed, jnp.uint8))
        self.scale = PackedScale(jnp.asarray(scale, jnp.float32))
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))

    def weight(self) -> Array:
        """The dense float weight (for checks and export only; the forward never forms it)."""
        shape = (*self.packed.shape[:-3], self.in_features, self.out_features)
        codes = quant.unpack(self.packed[...], self.spec.bits, shape, ternary=self.ternary)
        return quant.from_codes(codes, self.scale[...], self.spec)

    def __call__(
        self, x: Array, out_dtype=None, *, out_heads: int | None = None, in_heads: bool = False
    ) -> Array:
        """``x @ W + bias``; ``out_heads`` / ``in_heads`` as for ``QuantLinear`` (here on the
        activations: the forward never forms the kernel it could reshape)."""
        if in_heads:
            x = x.reshape(*x.shape[:-2], -1)
        at = None
        if self.packed.ndim != 3:
            at = layer_index()
            if at is None or self.packed.ndim != 4:
                raise ValueError(
                    f"PackedLinear called with stacked codes {self.packed.shape} outside a "
                    "decoder layer: call it on one layer's slice, or inside "
                    "models.layers.running_layer(index)"
                )
        y = _product(self, x.astype(self.dtype), at).astype(self.dtype)
        if out_dtype is not None:
            y = y.astype(out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y if out_heads is None else y.reshape(*y.shape[:-1], out_heads, -1)


class Int8Embedding(nnx.Module):
    """A token embedding ``(V, D)`` stored as int8 codes with one float32 scale per row.

    ``E[v] ~ scale[v] * codes[v]`` with ``scale[v] = max|E[v]| / 127`` and ``codes = round(E /
    scale)`` (symmetric absmax, as llama.cpp's ``Q8_0`` but one block per row). It replaces a
    model's ``embed_tokens`` parameter: ``emb(ids)`` looks rows up, ``emb.attend(h)`` gives the
    tied LM head's logits ``h @ E.T``. Decoding reads the tied ``V x D`` matrix once per step
    as the LM head, so this cuts those bytes 4x from float32 (SmolLM2-135M: 113 MB -> 28 MB).
    Relative error per entry is at most ``0.5 / 127`` of its row's largest magnitude.
    """

    def __init__(self, codes: Array, scale: Array, *, dtype=jnp.float32, kernel: str | None = None):
        if codes.ndim != 2 or tuple(scale.shape) != (codes.shape[0],):
            raise ValueError(
                f"int8 embedding needs codes (V, D) and one scale per row (V,), got "
                f"{tuple(codes.shape)} and {tuple(scale.shape)}"
            )
        self.dtype, self.kernel = dtype, kernel
        # Held transposed, (D, V): the LM head's ``h @ codes_t`` then reads the int8 table
        # in the layout XLA's CPU dot converts fastest (measured 2x over (V, D)).
        self.codes_t = PackedCodes(jnp.asarray(codes, jnp.int8).T)
        self.scale = PackedScale(jnp.asarray(scale, jnp.float32))

    @classmethod
    def quantize(cls, table: Array, *, dtype=jnp.float32) -> Int8Embedding:
        """Per-row absmax int8 codes of a float embedding table ``(V, D)``."""
        table = jnp.asarray(table, jnp.float32)
        scale = jnp.max(jnp.abs(table), axis=-1) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero row: codes 0, any scale
        codes = jnp.clip(jnp.round(table / scale[:, None]), -127, 127).astype(jnp.int8)
        return cls(codes, scale, dtype=dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes_t.shape[::-1])

    def codes(self) -> Array:
        """The int8 codes ``(V, D)``."""
        return self.codes_t[...].T

    def weight(self) -> Array:
        """The float32 table ``scale[:, None] * codes`` this embedding stands for."""
        return self.codes().astype(jnp.float32) * self.scale[...][:, None]

    def __call__(self, ids: Array) -> Array:
        rows = jnp.moveaxis(jnp.take(self.codes_t[...], ids, axis=1), 0, -1)
        rows = rows.astype(jnp.float32) * jnp.take(self.scale[...], ids)[..., None]
        return rows.astype(self.dtype)

    def attend(self, hidden: Array) -> Array:
        """Float32 logits ``hidden @ weight().T``: the int8 codes feed the product (the scale
        is applied to its ``V`` outputs), so the float table is never formed."""
        return _product(self, hidden.astype(self.dtype))


def int8_embeddings(model: nnx.Module) -> nnx.Module:
    """``model`` (changed in place) with its ``embed_tokens`` table as :class:`Int8Embedding`
    (also the LM head when tied). Returns the model."""
    table = model.embed_tokens
    if isinstance(table, Int8Embedding):
        return model
    model.embed_tokens = Int8Embedding.quantize(table[...], dtype=model.dtype)
    return model


def use_kernel(model: nnx.Module, kernel: str | None) -> nnx.Module:
    """``model`` (changed in place) with every :class:`PackedLinear` and :class:`Int8Embedding`
    computing by ``kernel`` (``"auto"``, ``"native"``, ``"xla"`` or ``None``). Returns it."""
    if kernel is not None and kernel not in kernels.KERNELS:
        raise ValueError(f"kernel={kernel!r}: choose one of {kernels.KERNELS}")
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (PackedLinear, Int8Embedding)):
            m.kernel = kernel
    return model


def packed_linears(model: nnx.Module) -> dict[str, PackedLinear]:
    """``{module path: PackedLinear}`` of a model (paths like ``layers.self_attn.q_proj``)."""
    return {
        ".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, PackedLinear)
    }


def set_module(root: nnx.Module, path: tuple, module: nnx.Module) -> None:
    parent = root
    for key in path[:-1]:
        parent = getattr(parent, key)
    setattr(parent, path[-1], module)


def to_packed_model(
    model: nnx.Module,
    *,
    ternary: str = "2bit",
    tile_rows: int | None = None,
    embed: str = "float",
) -> nnx.Module:
    """A copy of ``model`` whose quantized linears compute from packed codes.

    ``embed="int8"`` also stores the token embedding (and tied LM head) as
    :class:`Int8Embedding`; ``"float"`` (default) keeps it as it is.

    Codes and effective scales come from :func:`linear_codes` of each kernel, so the
    packed model multiplies by exactly the weights of the fake-quant forward (the products are
    summed in another order: logits agree to float32 rounding, not bit for bit). Float linears
    (``spec=None``) are left alone.
    """
    if embed not in EMBED_TYPES:
        raise ValueError(f"embed={embed!r}: choose one of {EMBED_TYPES}")
    model = nnx.clone(model)
    targets = list(quant_linears(model).items())
    if not targets:
        raise ValueError(
            "the model has no quantized linear layers (its quantization rules are empty or "
            "16/32-bit): there are no codes to pack"
        )
    for path, lin in targets:
        codes, a = linear_codes(lin)
        packed = quant.pack(codes, lin.spec.bits, ternary=ternary)
        new = PackedLinear(
            packed, a, spec=lin.spec, in_features=lin.in_features, ternary=ternary,
            bias=None if lin.bias is None else lin.bias[...], dtype=lin.dtype,
            tile_rows=tile_rows,
        )  # fmt: skip
        set_module(model, path, new)
    return int8_embeddings(model) if embed == "int8" else model
