"""Dense packing of ParetoQ's signed integer codes into bytes (layout: docs/packed-format.md).

Codes are the integers ``k`` of the spec's codes table (``W = a * step * (k + z)``):
1 bit: -1/+1; 1.58 bit: -1..1; 2 bit: -2..1; 3 bit: -4..3; 4 bit: -8..7. Each code is first
mapped to an unsigned value ``u`` (``u = (k + 1) / 2`` at 1 bit, ``u = k - kmin`` otherwise) and
then stored at its real density:

* ``b``-bit codes (and ternary ``"2bit"``): exactly ``b`` bits a code, in ``b`` byte planes.
  The packed axis (a Flax kernel's input axis) of length ``n`` is cut into 8 slabs of
  ``R = ceil(n / 8)`` rows; slab ``t`` holds rows ``t*R .. t*R + R - 1``. A byte at row ``r``
  holds one bit field of the codes at rows ``r, r + R, r + 2R, ...`` so unpacking any contiguous
  range of byte rows is a few shifts and masks and yields 8 contiguous row ranges: no gathers.
* ternary ``"base3"``: 5 trits a byte (1.6 bits a code), 5 slabs of ``R = ceil(n / 5)`` rows,
  ``byte = sum_t u_t * 3**t``.

Both numpy and jax arrays are accepted; the result has the input's array type. ``unpack`` is
jittable (``shape`` is static).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .spec import FLOAT_BITS, parse_bits

__all__ = [
    "LAYOUT_VERSION",
    "PackFormat",
    "pack",
    "pack_format",
    "packed_shape",
    "planes_to_slabs",
    "slab_values",
    "unpack",
]

# Version of the byte layout in docs/packed-format.md; exporters record it in their metadata.
LAYOUT_VERSION = 1

TERNARY_LAYOUTS = ("2bit", "base3")


@dataclass(frozen=True)
class PackFormat:
    """How one bit-width's codes are stored.

    ``k = mult * u + kmin`` maps the stored unsigned value ``u`` back to the signed code.
    ``fields`` are the widths of the bit fields ``u`` is split into (low bits first); a field of
    width ``w`` fills ``w`` byte planes with ``8 // w`` slabs each. ``base3`` replaces all of this
    by one plane of 5 trits a byte.
    """

    name: str
    kmin: int
    kmax: int
    mult: int
    fields: tuple[int, ...]
    base3: bool = False

    @property
    def n_slabs(self) -> int:
        """Slabs the packed axis is cut into: codes sharing one byte."""
        return 5 if self.base3 else 8

    @property
    def n_planes(self) -> int:
        """Byte planes: bytes per ``n_slabs`` codes."""
        return 1 if self.base3 else sum(self.fields)

    @property
    def bits_per_code(self) -> float:
        """Storage density, padding aside."""
        return 8 * self.n_planes / self.n_slabs


_FORMATS = {
    "1": PackFormat("1", kmin=-1, kmax=1, mult=2, fields=(1,)),
    "1.58/2bit": PackFormat("1.58/2bit", kmin=-1, kmax=1, mult=1, fields=(2,)),
    "1.58/base3": PackFormat("1.58/base3", kmin=-1, kmax=1, mult=1, fields=(), base3=True),
    "2": PackFormat("2", kmin=-2, kmax=1, mult=1, fields=(2,)),
    "3": PackFormat("3", kmin=-4, kmax=3, mult=1, fields=(2, 1)),
    "4": PackFormat("4", kmin=-8, kmax=7, mult=1, fields=(4,)),
}


def _bits_name(bits: Any) -> str:
    """Canonical name of a packable bit-width; ``ValueError`` for anything else."""
    b = parse_bits(bits)  # raises ValueError listing the valid values
    if b in FLOAT_BITS:
        raise ValueError(
            f"bits={bits!r} means no quantization: there are no integer codes to pack "
            "(store such weights as floats)"
        )
    return str(b)


def pack_format(bits: Any, ternary: str = "2bit") -> PackFormat:
    """The :class:`PackFormat` for ``bits``; ``ternary`` picks ``"2bit"`` or ``"base3"`` at 1.58."""
    if ternary not in TERNARY_LAYOUTS:
        raise ValueError(f"ternary={ternary!r}: choose one of {TERNARY_LAYOUTS}")
    name = _bits_name(bits)
    if name == "1.58":
        name = f"1.58/{ternary}"
    return _FORMATS[name]


def _packed_axis(ndim: int, axis: int | None) -> int:
    if ndim == 0:
        raise ValueError("cannot pack a 0-d array: give codes with at least one axis")
    if axis is None:
        axis = -2 if ndim >= 2 else 0
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for codes with {ndim} dimensions")
    return axis % ndim


def packed_shape(
    shape: tuple[int, ...], bits: Any, *, ternary: str = "2bit", axis: int | None = None
) -> tuple[int, ...]:
    """Shape of ``pack(codes, bits)`` for codes of ``shape``.

    The packed axis (default: ``-2``, a kernel's input axis; ``0`` for 1-d codes) of length ``n``
    becomes two axes ``(n_planes, R)`` with ``R = ceil(n / n_slabs)``; the others are kept.
    """
    fmt = pack_format(bits, ternary)
    shape = tuple(int(s) for s in shape)
    ax = _packed_axis(len(shape), axis)
    rows = -(-shape[ax] // fmt.n_slabs)
    return (*shape[:ax], fmt.n_planes, rows, *shape[ax + 1 :])


def _xp(x: Any):
    return np if isinstance(x, np.ndarray | np.generic) else jnp


def _check_codes(codes: Any, fmt: PackFormat) -> None:
    """Range-check concrete codes (skipped under tracing, where values are unknown)."""
    if isinstance(codes, jax.core.Tracer) or codes.size == 0:
        return
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.isfinite(c)) or not np.all(c == np.round(c)):
            raise ValueError("codes must be integers (use to_codes(w, scale, bits) to make them)")
    lo, hi = c.min(), c.max()
    if lo < fmt.kmin or hi > fmt.kmax or (fmt.mult == 2 and np.any(c == 0)):
        allowed = "-1 or +1" if fmt.mult == 2 else f"{fmt.kmin}..{fmt.kmax}"
        raise ValueError(
            f"codes for bits={fmt.name} must be {allowed}, got values in [{lo}, {hi}]"
            f"{' including 0' if fmt.mult == 2 else ''}: make them with to_codes for this bits"
        )


def slab_values(planes: Any, fmt: PackFormat) -> list[Any]:
    """Unsigned values ``u`` of each slab, one array per slab, from byte planes.

    ``planes`` has shape ``(n_planes, T, ...)`` (any contiguous range of byte rows); element
    ``t`` of the result is uint8 ``(T, ...)`` whose row ``i`` is the code at row ``t * R + i``.
    """
    xp = _xp(planes)
    planes = planes.astype(xp.uint8)
    if fmt.base3:
        return [(planes[0] // 3**t) % 3 for t in range(5)]
    slabs = [None] * 8
    plane, bit = 0, 0
    for w in fmt.fields:
        per_byte = 8 // w
        mask = (1 << w) - 1
        for t in range(8):
            field = (planes[plane + t // per_byte] >> (w * (t % per_byte))) & mask
            slabs[t] = field if bit == 0 else slabs[t] | (field << bit)
        plane, bit = plane + w, bit + w
    return slabs


def _trail(x: Any, ndim: int, axis: int = 1) -> Any:
    """``x`` (1-d) shaped to broadcast along ``axis`` of an array of ``ndim`` dims."""
    return x.reshape(*(1,) * axis, -1, *(1,) * (ndim - axis - 1))


def planes_to_slabs(planes: Any, fmt: PackFormat, axis: int = 0) -> Any:
    """:func:`slab_values` stacked: uint8 ``(n_slabs, T, ...)`` from ``(n_planes, T, ...)``.

    ``axis``: where the planes axis is (the rows follow it); the slabs replace it there, every
    other axis stays put. So the codes come out in the layout they are stored in: no transpose
    before or after (on TPU an unpack written on moved axes compiled to several passes over the
    codes). One broadcast per bit field (each of its ``w`` planes repeated for the ``8 // w``
    slabs it holds, shifted and masked), not slab by slab: XLA fuses it into one elementwise
    pass (a stack of 8 slabs compiled to 8 updates of the whole buffer on TPU)."""
    xp = _xp(planes)
    ax = axis % planes.ndim
    planes = xp.expand_dims(planes.astype(xp.uint8), ax + 1)  # (..., n_planes, 1, T, ...)
    nd, lead, rest = planes.ndim, planes.shape[:ax], planes.shape[ax + 2 :]
    if fmt.base3:
        div = _trail(xp.asarray([3**t for t in range(5)], xp.uint8), nd, ax + 1)
        return ((planes // div) % 3).reshape(*lead, 5, *rest)
    u, plane, bit = None, 0, 0
    for w in fmt.fields:
        shift = _trail(xp.asarray(range(0, 8, w), xp.uint8), nd, ax + 1)  # w * j per slab
        field = (planes[(slice(None),) * ax + (slice(plane, plane + w),)] >> shift) & (
            (1 << w) - 1
        )  # (..., w, 8 // w, T, ...)
        field = field.reshape(*lead, 8, *rest) << bit  # slab t = g * (8 // w) + j
        u = field if u is None else u | field
        plane, bit = plane + w, bit + w
    return u.astype(xp.uint8)


def slabs_to_planes(u: Any, fmt: PackFormat) -> Any:
    """Inverse of :func:`planes_to_slabs`: uint8 ``(n_slabs, R, ...)`` -> ``(n_planes, R, ...)``.

    The fields that share a byte occupy disjoint bits, so their sum is their bitwise or."""
    xp = _xp(u)
    u = u.astype(xp.uint8)
    if fmt.base3:
        mul = xp.asarray([3**t for t in range(5)], xp.int32).reshape(5, *(1,) * (u.ndim - 1))
        return (u.astype(xp.int32) * mul).sum(axis=0)[None].astype(xp.uint8)
    planes, bit = [], 0
    for w in fmt.fields:
        field = ((u >> bit) & ((1 << w) - 1)).reshape(w, 8 // w, *u.shape[1:])
        shift = _trail(xp.asarray(range(0, 8, w), xp.uint8), field.ndim)
        planes.append((field << shift).sum(axis=1, dtype=xp.uint8))  # (w, R, ...)
        bit += w
    return xp.concatenate(planes).astype(xp.uint8)


def pack(codes: Any, bits: Any, *, ternary: str = "2bit", axis: int | None = None) -> Any:
    """Pack signed integer codes into uint8 at their real bit density.

    Args:
      codes: integer codes of the spec's codes table, any shape; e.g. ``(in, out)`` or stacked
        ``(L, in, out)``. numpy or jax array (any int or float dtype holding integers).
      bits: 1, 1.58 / "ternary", 2, 3 or 4.
      ternary: at 1.58 bits, ``"2bit"`` (2 bits a code) or ``"base3"`` (5 trits a byte).
      axis: the axis packed along; default ``-2`` (a kernel's input axis), ``0`` for 1-d codes.

    Returns:
      uint8 array of :func:`packed_shape` (numpy in, numpy out; jax in, jax out).
    """
    fmt = pack_format(bits, ternary)
    xp = _xp(codes)
    if not isinstance(codes, np.ndarray | jax.Array):
        codes, xp = np.asarray(codes), np
    _check_codes(codes, fmt)
    ax = _packed_axis(codes.ndim, axis)
    n = codes.shape[ax]
    out_shape = packed_shape(codes.shape, bits, ternary=ternary, axis=ax)
    rows = out_shape[ax + 1]
    c = xp.moveaxis(codes, ax, 0).astype(xp.int32)
    u = ((c - fmt.kmin) // fmt.mult).astype(xp.uint8)
    pad = fmt.n_slabs * rows - n
    if pad:
        u = xp.concatenate([u, xp.zeros((pad, *u.shape[1:]), xp.uint8)])
    u = u.reshape(fmt.n_slabs, rows, *u.shape[1:])
    planes = slabs_to_planes(u, fmt)
    return xp.moveaxis(planes, (0, 1), (ax, ax + 1))


def unpack(
    packed: Any,
    bits: Any,
    shape: tuple[int, ...],
    *,
    ternary: str = "2bit",
    axis: int | None = None,
) -> Any:
    """Inverse of :func:`pack`: int8 codes of ``shape`` (static; jittable for jax input)."""
    fmt = pack_format(bits, ternary)
    shape = tuple(int(s) for s in shape)
    ax = _packed_axis(len(shape), axis)
    expected = packed_shape(shape, bits, ternary=ternary, axis=ax)
    if tuple(packed.shape) != expected:
        raise ValueError(
            f"packed array has shape {tuple(packed.shape)}, but codes of shape {shape} at "
            f"bits={fmt.name} pack to {expected}: pass the original codes' shape and bits"
        )
    xp = _xp(packed)
    u = planes_to_slabs(packed, fmt, axis=ax)  # (..., n_slabs, R, ...): rows in stored order
    u = u.reshape(*shape[:ax], fmt.n_slabs * expected[ax + 1], *shape[ax + 1 :])
    if u.shape[ax] != shape[ax]:
        u = u[(slice(None),) * ax + (slice(0, shape[ax]),)]
    return (u.astype(xp.int8) * fmt.mult + fmt.kmin).astype(xp.int8)
