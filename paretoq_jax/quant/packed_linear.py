"""``x @ W`` straight from packed integer codes, never materializing the whole float ``W``.

``W = a * (k + z) / n`` (quantizers.md, codes table) with ``a = max(scale, 1e-5)`` and codes
``k = mult * u + kmin`` stored as unsigned ``u`` in the layout of :mod:`.packing`. By linearity

    x @ W = (a / n) * (mult * (x @ u) + (kmin + z) * sum(x))

so the loop only turns byte tiles into small unsigned integers (exact in bf16) and multiplies;
the per-channel scale and the offset are one rank-1 correction at the end. The loop runs over
tiles of ``T`` byte rows: a tile of all byte planes holds the codes of input rows
``t * R + r0 .. t * R + r0 + T - 1`` for every slab ``t``, i.e. ``n_slabs`` contiguous slices of
``x``. Only one ``(n_slabs, T, out)`` weight tile exists at a time.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from .packing import pack_format, packed_shape, slab_values
from .spec import SCALE_EPS, resolve

__all__ = ["packed_matmul", "default_tile_rows"]

# Weights unpacked per slab and tile for the default tile size (tuned on CPU: 4096 x 14336).
_TILE_ELEMENTS = 1 << 19


def default_tile_rows(out_features: int) -> int:
    """Byte rows per tile so that one slab of a tile holds about ``2**19`` weights."""
    return max(1, _TILE_ELEMENTS // max(1, out_features))


@partial(
    jax.jit,
    static_argnames=("bits", "in_features", "method", "ternary", "tile_rows"),
)
def packed_matmul(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    bits: Any,
    in_features: int,
    *,
    method: str | None = None,
    ternary: str = "2bit",
    tile_rows: int | None = None,
) -> jax.Array:
    """``x @ from_codes(unpack(packed, bits, (in_features, out)), scale, bits, method)``.

    Args:
      x: activations ``(..., in_features)``, float32 or bfloat16; weight tiles are unpacked in
        ``x.dtype`` and products accumulate in float32.
      packed: ``pack(codes, bits, ternary=ternary)`` of a kernel's codes ``(in_features, out)``,
        i.e. uint8 ``(n_planes, R, out)``.
      scale: the per-output-channel (effective) scale ``(out,)``, as for ``from_codes``.
      bits, method: the quantizer the codes came from (sets ``n`` and ``z``; method defaults to
        ParetoQ's choice).
      in_features: the kernel's input size (static; the packed axis may be padded).
      ternary: the 1.58-bit layout used by ``pack``.
      tile_rows: byte rows per tile (default :func:`default_tile_rows`).

    Returns:
      ``(..., out)`` in ``x.dtype``.
    """
    spec = resolve(bits, method)
    if spec is None:
        raise ValueError(f"bits={bits!r} is not quantized: use a dense matmul")
    fmt = pack_format(bits, ternary)
    out = packed.shape[-1]
    expected = packed_shape((in_features, out), bits, ternary=ternary)
    if packed.ndim != 3 or tuple(packed.shape) != expected:
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}, expected {expected} for a kernel "
            f"({in_features}, {out}) at bits={bits}: check in_features, bits and ternary"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the kernel expects {in_features}")
    if scale.shape != (out,):
        raise ValueError(
            f"scale must have shape ({out},) (one per output channel), got {scale.shape}"
        )

    n_slabs, rows = fmt.n_slabs, expected[1]
    lead = x.shape[:-1]
    xf = x.reshape(-1, in_features)
    pad = n_slabs * rows - in_features
    if pad:
        xf = jnp.pad(xf, ((0, 0), (0, pad)))  # padded rows hold code u = 0 times x = 0
    xs = xf.reshape(xf.shape[0], n_slabs, rows)

    def tile_product(x_tile: jax.Array, p_tile: jax.Array) -> jax.Array:
        # One small dot per slab: stacking the slabs first costs XLA a slow concatenate.
        acc = None
        for slab, u in enumerate(slab_values(p_tile, fmt)):  # u: (T, out) uint8
            part = jnp.dot(x_tile[:, slab], u.astype(x.dtype), preferred_element_type=jnp.float32)
            acc = part if acc is None else acc + part
        return acc

    t = min(rows, tile_rows or default_tile_rows(out))
    n_full = rows // t

    def body(i: jax.Array, acc: jax.Array) -> jax.Array:
        x_tile = jax.lax.dynamic_slice_in_dim(xs, i * t, t, axis=2)
        p_tile = jax.lax.dynamic_slice_in_dim(packed, i * t, t, axis=1)
        return acc + tile_product(x_tile, p_tile)

    acc = jnp.zeros((xs.shape[0], out), jnp.float32)
    acc = jax.lax.fori_loop(0, n_full, body, acc)
    if n_full * t < rows:  # remainder tile, static shape
        acc = acc + tile_product(xs[:, :, n_full * t :], packed[:, n_full * t :])

    x_sum = jnp.sum(xf, axis=-1, dtype=jnp.float32)[:, None]
    a = jnp.maximum(scale.astype(jnp.float32), SCALE_EPS)
    y = (a / spec.n) * (fmt.mult * acc + (fmt.kmin + spec.z) * x_sum)
    return y.reshape(*lead, out).astype(x.dtype)
