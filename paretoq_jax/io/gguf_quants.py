"""Encode ParetoQ integer codes as llama.cpp GGUF block-quantized tensors, exactly.

A quantized weight is ``W = a * (k + z) / n`` (quantizers.md, codes table; ``a`` the per-output-
channel scale clamped at 1e-5). With ``den = 2`` when ``z = 1/2`` (else 1) every weight is an
*integer level* ``L = den * (k + z)`` times the per-channel unit ``u = a / (n * den)``, and each
GGUF block format below stores exactly such integers with one fp16 scale ``d = u`` per block
(so the only error is the fp16 rounding of ``u``):

============  =====  ======  ===============================  ==============================
qtype          block  bytes   stored integer                   dequantized value
============  =====  ======  ===============================  ==============================
``TQ1_0``      256    54      trit ``q = L + 1`` (base 3)      ``d * (q - 1)``
``TQ2_0``      256    66      2-bit ``q = L + 1``              ``d * (q - 1)``
``Q2_K``       256    84      2-bit ``q = k - kmin``           ``d*sc*q - dmin*m`` (sc, m 4-bit)
``Q4_0``       32     18      4-bit ``q = L + 8``              ``d * (q - 8)``
``Q8_0``       32     34      int8 ``q = L``                   ``d * q``
============  =====  ======  ===============================  ==============================

Q2_K uses every sub-block scale ``sc = den`` and min ``m = -den * (kmin + z)`` with
``d = dmin = u``: at 2-bit SEQ that is ``sc = 2, m = 3, d = dmin = a/4``.

Defaults (ParetoQ's methods): 1 bit -> TQ2_0 (``d = a``), 1.58 -> TQ2_0 (``d = 2a/3``),
2 -> Q2_K (``d = a/4``), 3 and 4 -> Q4_0 (``d = a``). GGUF tensors are row-major ``(out, in)``
(ggml ``ne = [in, out]``) with blocks along ``in``; ``in`` must be a multiple of the block size.
When the default's block (256) does not divide ``in``, ``qtype=None`` falls back to the exact
32-blocks (Q4_0, else Q8_0); when 32 does not divide it either, encode the tensor as ``F16``
(``qtype=GGMLQuantizationType.F16``: the dequantized weight, rounded to fp16).
Layouts follow ``gguf.quants`` (the package's reference dequantizers); see docs/packed-format.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..quant.spec import SCALE_EPS, QuantSpec, parse_bits, resolve

__all__ = ["DEFAULT_QTYPE", "QTYPES", "encode_tensor", "gguf_levels"]

Q = GGMLQuantizationType
QTYPES = (Q.TQ1_0, Q.TQ2_0, Q.Q2_K, Q.Q4_0, Q.Q8_0, Q.F16, Q.F32)
DEFAULT_QTYPE = {1: Q.TQ2_0, 1.58: Q.TQ2_0, 2: Q.Q2_K, 3: Q.Q4_0, 4: Q.Q4_0}
_FALLBACKS = (Q.Q4_0, Q.Q8_0)  # exact 32-blocks, tried in this order

# Range of the integer level L each block format can hold (Q2_K: of k - kmin, checked apart).
_LEVEL_RANGE = {Q.TQ1_0: (-1, 1), Q.TQ2_0: (-1, 1), Q.Q4_0: (-8, 7), Q.Q8_0: (-127, 127)}


def gguf_levels(codes: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, float]:
    """Integer levels ``L = den * (k + z)`` (int32, codes' shape) and the unit divisor ``n*den``.

    The weight is ``a / (n * den) * L``.
    """
    den = 2 if spec.z == 0.5 else 1
    if spec.z not in (0.0, 0.5):
        raise ValueError(f"no integer level grid for z={spec.z}")
    lv = den * codes.astype(np.int32) + int(den * spec.z)
    return lv, spec.n * den


def _fits(qtype: Q, lv_lo: int, lv_hi: int, spec: QuantSpec) -> bool:
    if qtype in (Q.F16, Q.F32):
        return True
    if qtype == Q.Q2_K:
        return spec.qmax - spec.qmin <= 3
    lo, hi = _LEVEL_RANGE[qtype]
    return lo <= lv_lo and lv_hi <= hi


def _fp16_bytes(d: np.ndarray, n_blocks: int) -> np.ndarray:
    """Per-row fp16 ``d`` (out,) as little-endian bytes repeated per block: (out, nb, 2)."""
    b = d.astype("<f2").view(np.uint8).reshape(-1, 1, 2)
    return np.broadcast_to(b, (b.shape[0], n_blocks, 2))


def _pack_2bit_128(q: np.ndarray) -> np.ndarray:
    """2-bit values (..., 256) -> 64 bytes: element ``h*128 + s*32 + j`` is bits ``2s`` of byte
    ``h*32 + j`` (the TQ2_0 / Q2_K ``qs`` layout)."""
    q = q.reshape(*q.shape[:-1], 2, 4, 32).astype(np.uint8)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    return np.bitwise_or.reduce(q << shifts, axis=-2).reshape(*q.shape[:-3], 64)


def _base3_bytes(t: np.ndarray, n_digits: int) -> np.ndarray:
    """Trits (..., n_digits, m) -> m bytes holding ``ceil(v * 256 / 243)`` with
    ``v = sum_i t_i * 3**(4 - i)`` (digit 0 most significant; TQ1_0's fixed-point base 3)."""
    weights = np.array([81, 27, 9, 3, 1][:n_digits], np.int32).reshape(n_digits, 1)
    v = np.sum(t.astype(np.int32) * weights, axis=-2)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _encode_blocks(lv: np.ndarray, k: np.ndarray, d: np.ndarray, spec: QuantSpec, qtype: Q):
    """Rows (out, in) of levels / codes and per-row fp16 scale -> (out, nb, type_size) bytes."""
    block = GGML_QUANT_SIZES[qtype][0]
    out, n_in = lv.shape
    nb = n_in // block
    lv = lv.reshape(out, nb, block)
    dd = _fp16_bytes(d, nb)
    if qtype == Q.Q4_0:  # d | qs[16]: byte j = q[j] | q[j + 16] << 4
        q = (lv + 8).astype(np.uint8)
        return np.concatenate([dd, q[..., :16] | (q[..., 16:] << 4)], axis=-1)
    if qtype == Q.Q8_0:  # d | int8 q[32]
        return np.concatenate([dd, lv.astype(np.int8).view(np.uint8)], axis=-1)
    if qtype == Q.TQ2_0:  # qs[64] | d
        return np.concatenate([_pack_2bit_128(lv + 1), dd], axis=-1)
    if qtype == Q.TQ1_0:  # qs[48] (32 bytes x 5 trits, 16 bytes x 5 trits) | qh[4] (4 trits) | d
        t = (lv + 1).astype(np.uint8)
        qs0 = _base3_bytes(t[..., :160].reshape(out, nb, 5, 32), 5)
        qs1 = _base3_bytes(t[..., 160:240].reshape(out, nb, 5, 16), 5)
        qh = _base3_bytes(t[..., 240:].reshape(out, nb, 4, 4), 4)
        return np.concatenate([qs0, qs1, qh, dd], axis=-1)
    if qtype == Q.Q2_K:  # scales[16] (sc | m << 4) | qs[64] | d | dmin
        den = 2 if spec.z == 0.5 else 1
        sc, m = den, -den * (spec.qmin + spec.z)
        scales = np.full((out, nb, 16), int(sc) | (int(m) << 4), np.uint8)
        q = (k.reshape(out, nb, block) - spec.qmin).astype(np.uint8)
        return np.concatenate([scales, _pack_2bit_128(q), dd, dd], axis=-1)
    raise AssertionError(qtype)


def encode_tensor(
    codes: Any,
    scale: Any,
    bits: Any,
    qtype: GGMLQuantizationType | None = None,
    *,
    method: str | None = None,
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """GGUF tensor data for a quantized kernel, ready for ``GGUFWriter.add_tensor(...,
    raw_dtype=qtype)``.

    Args:
      codes: int codes ``(in, out)`` (Flax kernel layout) from ``to_codes``.
      scale: per-output-channel (effective) scale ``(out,)``, as for ``from_codes``.
      bits, method: the quantizer (method defaults to ParetoQ's choice).
      qtype: one of ``QTYPES``; ``None`` picks ``DEFAULT_QTYPE[bits]`` (or an exact 32-block
        fallback when ``in`` is not a multiple of 256).

    Returns:
      ``(data, qtype)``: uint8 ``(out, in // block * type_size)`` for block formats, or the
      dequantized ``(out, in)`` float16/float32 array for ``F16``/``F32``.
    """
    spec = resolve(bits, method)
    if spec is None:
        raise ValueError(f"bits={bits!r} is not quantized: write the float tensor as F16/F32")
    codes = np.asarray(codes)
    scale = np.asarray(scale, dtype=np.float64)
    if codes.ndim != 2 or scale.shape != (codes.shape[1],):
        raise ValueError(
            f"expected codes (in, out) and scale (out,), got {codes.shape} and {scale.shape}"
        )
    k = codes.astype(np.int32).T  # GGUF rows are output channels
    if k.size and (k.min() < spec.qmin or k.max() > spec.qmax):
        raise ValueError(
            f"codes outside {spec.qmin}..{spec.qmax} for bits={spec.bits}: make them with to_codes"
        )
    if not np.all(np.isfinite(scale)):
        raise ValueError("scale has non-finite entries")
    lv, div = gguf_levels(k, spec)
    lv_lo, lv_hi = (int(lv.min()), int(lv.max())) if lv.size else (0, 0)
    n_in = k.shape[1]

    if qtype is None:
        default = DEFAULT_QTYPE[parse_bits(bits)]
        candidates = [default, *(q for q in _FALLBACKS if q != default)]
        candidates = [q for q in candidates if _fits(q, lv_lo, lv_hi, spec)]
        ok = [q for q in candidates if n_in % GGML_QUANT_SIZES[q][0] == 0]
        if not ok:
            raise ValueError(
                f"in_features={n_in} is not a multiple of any exact block size for bits="
                f"{spec.bits} ({', '.join(q.name for q in candidates)}): store this tensor as "
                "F16 (encode_tensor(..., qtype=GGMLQuantizationType.F16))"
            )
        qtype = ok[0]
    qtype = Q(qtype)
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype.name} is not supported: choose one of "
                         f"{[q.name for q in QTYPES]}")  # fmt: skip
    a = np.maximum(scale, SCALE_EPS)
    if qtype in (Q.F16, Q.F32):
        w = (a[:, None] / spec.n) * (k + spec.z)
        return w.astype(np.float16 if qtype == Q.F16 else np.float32), qtype
    if not _fits(qtype, lv_lo, lv_hi, spec):
        raise ValueError(
            f"{qtype.name} cannot hold bits={spec.bits} method={spec.method} exactly (integer "
            f"levels {lv_lo}..{lv_hi}); use qtype=None for the default"
        )
    block = GGML_QUANT_SIZES[qtype][0]
    if n_in % block:
        raise ValueError(
            f"in_features={n_in} is not a multiple of {qtype.name}'s block size {block}: pick a "
            "qtype with a block that divides it (Q4_0/Q8_0 use 32) or store the tensor as F16"
        )
    unit = a / div
    if np.any(unit > np.finfo(np.float16).max):
        raise ValueError("scale too large for an fp16 block scale (> 65504 * n)")
    data = _encode_blocks(lv, k, unit, spec, qtype)
    return np.ascontiguousarray(data.reshape(k.shape[0], -1)), qtype
