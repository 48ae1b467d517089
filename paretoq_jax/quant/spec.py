"""One table of constants for every bit-width and quantization method (ParetoQ, Sec. 3).

Every quantizer here maps ``x = W / a`` (``a`` the per-output-channel scale, clamped at ``1e-5``)
onto a grid of levels ``(k + z) / n`` in units of ``a``, with an integer code ``k``:

=========  ===============================================  ======================  ==========
grid       code ``k``                                       range of ``k``          level
=========  ===============================================  ======================  ==========
``sign``   ``sign(x)`` (elastic binary; 0 stays 0 in QAT)   -1, +1                  ``k``
``seq``    ``round(n * clip(x, -c, c) - z)``                ``Qn .. Qp``            ``(k+z)/n``
``int``    ``clamp(round(x), Qn, Qp)``                      ``Qn .. Qp``            ``k``
=========  ===============================================  ======================  ==========

SEQ (stretched elastic quant, ParetoQ Eq. 2) uses ``n = 2^(b-1)``, ``z = 1/2`` (levels symmetric
about zero, no zero level) and ``n = 3/2``, ``z = 0`` for ternary; ``c = 0.99`` (clipping at 0.99,
not 1, is what makes the grid have exactly ``2^b`` resp. 3 levels). LSQ (Esser et al. 2020) uses
the signed integer grid ``Qn = -2^(b-1)``, ``Qp = 2^(b-1) - 1`` (ternary: -1..1).

Methods (``method=``):

- ``elastic``: elastic binary, ``Wq = a * sign(W)``, learned ``a`` (ParetoQ's choice at 1 bit).
- ``seq``: stretched elastic quant with learned ``a`` (ParetoQ's choice at 1.58 and 2 bits).
- ``lsq``: learned step size quantization (ParetoQ's choice at 3 and 4 bits).
- ``absmean``: BitNet b1.58-style scale recomputed from the weights at every step,
  ``a = kappa_b * mean_j |W_j|`` per output channel, on the integer grid, not learned.
  ``kappa = 1`` at 1 and 1.58 bits (BitNet b1.58's ``gamma``); at 2, 3, 4 bits ``kappa`` makes
  ``a`` the MSE-optimal uniform step for Gaussian weights (Max, 1960): step/sigma = 0.9957,
  0.5860, 0.3352 over mean|W|/sigma = sqrt(2/pi).
- ``minmax``: round-to-nearest with a statistics-based scale recomputed from the weights,
  ``a = max_j |W_j| / Qp`` on the integer grid (``a = mean_j |W_j|`` at 1 bit, where the max
  is meaningless), not learned: the post-training baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "QuantSpec",
    "resolve",
    "parse_bits",
    "VALID_BITS",
    "METHODS",
    "DEFAULT_METHOD",
    "CLIP",
    "SCALE_EPS",
]

CLIP = 0.99  # SEQ's clip value c (quantizers.md)
SCALE_EPS = 1e-5  # a = max(alpha, 1e-5) everywhere
VALID_BITS = (1, 1.58, 2, 3, 4)  # quantized; 16 and 32 mean "no quantization"
FLOAT_BITS = (16, 32)
METHODS = ("elastic", "seq", "lsq", "absmean", "minmax")

# ParetoQ's choice per bit-width (paper Sec. 3.3: SEQ at <= 2 bits, LSQ at 3-4 bits).
DEFAULT_METHOD = {1: "elastic", 1.58: "seq", 2: "seq", 3: "lsq", 4: "lsq"}

# Per bit-width constants: (seq n, seq shift z, seq |t| outside the clip range,
#                           int Qn, int Qp, absmean kappa).
# The ternary SEQ |t| outside is 1 rather than the level 2/3: a quirk of the reference that the
# golden vectors keep (quantizers.md). Elsewhere |t| outside is the outermost level (n - 1/2)/n.
_TABLE: dict[float, tuple[float, float, float, int, int, float]] = {
    1: (math.nan, math.nan, math.nan, -1, 1, 1.0),
    1.58: (1.5, 0.0, 1.0, -1, 1, 1.0),
    2: (2.0, 0.5, 0.75, -2, 1, 0.9957 / math.sqrt(2 / math.pi)),
    3: (4.0, 0.5, 0.875, -4, 3, 0.5860 / math.sqrt(2 / math.pi)),
    4: (8.0, 0.5, 0.9375, -8, 7, 0.3352 / math.sqrt(2 / math.pi)),
}

_ALLOWED = {
    "elastic": (1,),
    "seq": (1.58, 2, 3, 4),
    "lsq": (1.58, 2, 3, 4),
    "absmean": VALID_BITS,
    "minmax": VALID_BITS,
}
_ALIASES = {"binary": "elastic", "elastic_binary": "elastic", "sq": "seq", "rtn": "minmax"}


@dataclass(frozen=True)
class QuantSpec:
    """Everything a quantizer needs, resolved from ``(bits, method)``; hashable (jit-static).

    Attributes:
      bits: 1, 1.58, 2, 3 or 4.
      method: one of ``METHODS``.
      grid: ``"sign"``, ``"seq"`` or ``"int"``.
      n, z: the level of code ``k`` is ``(k + z) / n`` in units of ``a``.
      lo, hi: the range of ``x = W / a`` inside which the weight gradient passes (STE).
      t_lo, t_hi: the scale-gradient term ``t`` below ``lo`` / above ``hi``.
      qmin, qmax: the range of the integer code ``k``.
      scale_grad_qp: the scale gradient's factor is ``s = 1 / sqrt(N * scale_grad_qp)``:
        ``Qp`` for LSQ (Esser et al. 2020), 1 for SEQ and elastic binary (``1 / sqrt(N)``).
      scale_rule: ``"learned"``, ``"absmean"`` or ``"minmax"``.
      init: ``"mean"`` or ``"max"``: the per-channel statistic of ``|W|`` that inits the scale.
      init_div: the scale init is that statistic divided by ``init_div`` (times ``kappa``).
      kappa: the absmean multiplier.
    """

    bits: float
    method: str
    grid: str
    n: float
    z: float
    lo: float
    hi: float
    t_lo: float
    t_hi: float
    qmin: int
    qmax: int
    scale_grad_qp: float
    scale_rule: str
    init: str
    init_div: float
    kappa: float

    @property
    def learned(self) -> bool:
        return self.scale_rule == "learned"

    @property
    def step(self) -> float:
        """Spacing between adjacent levels, in units of ``a``."""
        return 1.0 / self.n

    @property
    def storage_bits(self) -> int:
        """Bits per integer code when packed densely (ternary: 2; base-3 packing does better)."""
        if self.grid == "sign":
            return 1
        return math.ceil(math.log2(self.qmax - self.qmin + 1))


def parse_bits(bits: float | int | str) -> float:
    """Canonical bit-width: ``1``, ``1.58``, ``2``, ``3``, ``4``, ``16`` or ``32``.

    Accepts numbers, numeric strings and ``"ternary"``; raises ``ValueError`` listing the valid
    values otherwise.
    """
    value: float | None = None
    if isinstance(bits, str):
        s = bits.strip().lower()
        if s in ("ternary", "1.58", "1.5", "1.6"):
            value = 1.58
        else:
            try:
                value = float(s)
            except ValueError:
                value = None
    elif isinstance(bits, (int, float)) and not isinstance(bits, bool):
        value = 1.58 if abs(float(bits) - 1.58) < 0.05 else float(bits)
    for valid in (*VALID_BITS, *FLOAT_BITS):
        if value is not None and value == valid:
            return valid
    raise ValueError(
        f"unsupported bits={bits!r}: valid values are 1, 1.58 (or 'ternary'), 2, 3, 4 "
        "(quantized) and 16, 32 (no quantization)"
    )


def resolve(bits: float | int | str, method: str | None = None) -> QuantSpec | None:
    """The ``QuantSpec`` for ``(bits, method)``; ``None`` for 16/32 bits (no quantization).

    ``method=None`` picks ParetoQ's choice. Raises ``ValueError`` for a bit-width or method that
    does not exist, or a combination that is not defined (e.g. ``lsq`` at 1 bit).
    """
    b = parse_bits(bits)
    if b in FLOAT_BITS:
        return None
    name = DEFAULT_METHOD[b] if method is None else _ALIASES.get(method.lower(), method.lower())
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}: valid methods are {METHODS}")
    if b not in _ALLOWED[name]:
        ok = ", ".join(str(x) for x in _ALLOWED[name])
        raise ValueError(f"method {name!r} is not defined at {b} bits (it supports bits {ok})")
    seq_n, seq_z, seq_t, qn, qp, kappa = _TABLE[b]
    common = dict(bits=b, method=name, kappa=kappa if name == "absmean" else 1.0)
    if name == "elastic":
        return QuantSpec(
            **common, grid="sign", n=1.0, z=0.0, lo=-1.0, hi=1.0, t_lo=-1.0, t_hi=1.0,
            qmin=-1, qmax=1, scale_grad_qp=1.0, scale_rule="learned", init="mean", init_div=1.0,
        )  # fmt: skip
    if name == "seq":
        return QuantSpec(
            **common, grid="seq", n=seq_n, z=seq_z, lo=-CLIP, hi=CLIP, t_lo=-seq_t, t_hi=seq_t,
            qmin=qn, qmax=qp, scale_grad_qp=1.0, scale_rule="learned", init="max", init_div=1.0,
        )  # fmt: skip
    # Integer grid: lsq (learned), absmean and minmax (statistics, recomputed every step).
    if b == 1:  # only absmean/minmax reach here: a 1-bit integer grid is the sign grid.
        return QuantSpec(
            **common, grid="sign", n=1.0, z=0.0, lo=-1.0, hi=1.0, t_lo=-1.0, t_hi=1.0,
            qmin=-1, qmax=1, scale_grad_qp=1.0, scale_rule=name, init="mean", init_div=1.0,
        )  # fmt: skip
    return QuantSpec(
        **common, grid="int", n=1.0, z=0.0, lo=float(qn), hi=float(qp), t_lo=float(qn),
        t_hi=float(qp), qmin=qn, qmax=qp, scale_grad_qp=float(qp),
        scale_rule="learned" if name == "lsq" else name,
        init="mean" if name == "absmean" else "max",
        init_div=1.0 if name == "absmean" else float(qp),
    )  # fmt: skip
