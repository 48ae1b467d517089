"""Unpack packed integer codes to int8 in one pass over HBM: a Pallas TPU kernel.

FSDP code gathering (``parallel/code_gather.py``, docs/fsdp-code-gather.md) all-gathers each
quantized kernel's codes packed at their bit-width and unpacks them on every device. Written
with XLA ops, XLA:TPU compiles the unpack to several passes over the codes (a broadcast of the
packed bytes, then shifts and masks into unsigned values, then the signed codes: on Llama-3.2
3B about 2.7 bytes per weight and pass more than one pass; docs/scale/NOTES.md). This kernel
reads each packed byte once and writes each int8 code once.

The layout is the packed format's (docs/packed-format.md): ``(blocks, planes, R, out)`` uint8 to
``(blocks, slabs, R, out)`` int8, where slab ``t`` row ``i`` is input row ``t * R + i`` of its
block, so the result reshapes (no transpose) to ``(blocks, slabs * R, out)``. ``k = mult * u +
kmin`` for the stored unsigned value ``u``, as ``quant.unpack``. The format comes in as plain
numbers (``fields``, ``base3``, ``kmin``, ``mult``) so that this module needs nothing of
``paretoq_jax.quant``.

Runs compiled on TPU; ``interpret=True`` runs the same kernel through XLA on any backend (how
the tests check it on a CPU).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

__all__ = ["unpack_blocks"]

_LANES = 128  # TPU vector lanes: the out tile is a multiple (or the whole dim)
_INT8_ROWS = 32  # int8 sublane tiling: row tiles are multiples (or the whole dim)


def _tile(n: int, unit: int, largest: int) -> int:
    """The largest multiple of ``unit`` up to ``largest`` dividing ``n``; ``n`` if none does
    (a block spanning the whole dimension is always allowed)."""
    for t in range(largest - largest % unit, 0, -unit):
        if n % t == 0:
            return t
    return n


def _kernel(fields: tuple[int, ...], base3: bool, kmin: int, mult: int, p_ref, o_ref) -> None:
    """One block: ``p_ref (1, planes, Rt, T)`` uint8 -> ``o_ref (1, slabs, Rt, T)`` int8."""
    planes = [p_ref[0, i].astype(jnp.int32) for i in range(p_ref.shape[1])]
    if base3:  # 5 trits a byte, low trit first
        x = planes[0]
        for t in range(5):
            q = (x * 171) >> 9  # x // 3, exact for 0 <= x < 256 (no integer division on TPU)
            o_ref[0, t] = ((x - 3 * q) * mult + kmin).astype(jnp.int8)
            x = q
        return
    u: list = [None] * 8
    plane, bit = 0, 0
    for w in fields:  # a field of width w: w planes, 8 // w slabs each
        per = 8 // w
        for t in range(8):
            f = (planes[plane + t // per] >> (w * (t % per))) & ((1 << w) - 1)
            u[t] = f if bit == 0 else u[t] | (f << bit)
        plane, bit = plane + w, bit + w
    for t in range(8):
        o_ref[0, t] = (u[t] * mult + kmin).astype(jnp.int8)


def unpack_blocks(
    packed: jax.Array,
    *,
    fields: tuple[int, ...],
    base3: bool,
    kmin: int,
    mult: int,
    interpret: bool = False,
) -> jax.Array:
    """``(blocks, planes, R, out)`` uint8 -> ``(blocks, slabs, R, out)`` int8 codes.

    ``fields``, ``base3``, ``kmin``, ``mult``: the packing format (``quant.pack_format``'s
    fields). Tiles: ``out`` by up to 512 lanes, ``R`` by up to 256 rows (at most 1 MiB of codes
    a block); a dimension that no such tile divides is taken whole."""
    if packed.ndim != 4 or packed.dtype != jnp.uint8:
        raise ValueError(f"unpack_blocks takes (blocks, planes, R, out) uint8, got {packed.shape} "
                         f"{packed.dtype}")  # fmt: skip
    slabs = 5 if base3 else 8
    blocks, planes, rows, out = packed.shape
    if planes != (1 if base3 else sum(fields)):
        raise ValueError(f"{planes} byte planes do not match fields {fields} (base3={base3})")
    tr, tn = _tile(rows, _INT8_ROWS, 256), _tile(out, _LANES, 512)
    from jax.experimental import pallas as pl

    # inside shard_map the codes vary over the mesh axes as the packed bytes do
    manual = getattr(jax.typeof(packed), "manual_axis_type", None)
    return pl.pallas_call(
        partial(_kernel, tuple(fields), base3, kmin, mult),
        out_shape=jax.ShapeDtypeStruct(
            (blocks, slabs, rows, out), jnp.int8, manual_axis_type=manual
        ),
        grid=(blocks, rows // tr, out // tn),
        in_specs=[pl.BlockSpec((1, planes, tr, tn), lambda b, i, j: (b, 0, i, j))],
        out_specs=pl.BlockSpec((1, slabs, tr, tn), lambda b, i, j: (b, 0, i, j)),
        interpret=interpret,
        name="unpack_codes",
    )(packed)
