"""ParetoQ's weight quantizers as pure JAX functions with straight-through gradients.

Shapes: ``w`` is a Flax kernel ``(..., in, out)`` and ``scale`` is ``(..., out)``: one learnable
scale per output channel (leading axes, if any, are stacked layers). The math is that of
``docs/quantizers.md``; the table of constants lives in :mod:`paretoq_jax.quant.spec`.

With ``a = max(alpha, 1e-5)``, ``x = W / a``, ``c = 0.99`` and ``N = in * out`` (the element count
of one matrix), ``Qn = -2^(b-1)``, ``Qp = 2^(b-1) - 1``:

=======  ==========  =========================================  ==================  =============
method   bits        forward ``Wq``                             scale ``a``         ``s``
=======  ==========  =========================================  ==================  =============
elastic  1           ``a * sign(x)``: elastic binary (Sec. 3)   learned             1/sqrt(N)
seq      1.58, 2-4   ``a * (round(n*clip(x,-c,c) - z) + z)/n``  learned             1/sqrt(N)
                     SEQ (ParetoQ Eq. 2; 1.58: n=1.5, z=0;
                     2: n=2, z=0.5; see spec._TABLE)
lsq      1.58, 2-4   ``a * clamp(round(x), Qn, Qp)``: LSQ       learned             1/sqrt(N*Qp)
absmean  all         LSQ's grid (1 bit: sign)                   kappa * mean|W|     no gradient
minmax   all         LSQ's grid (1 bit: sign)                   max|W| / Qp         no gradient
=======  ==========  =========================================  ==================  =============

``s`` is the scale gradient's factor (``QuantSpec.scale_grad_qp``). Learned scales start at
``init_scale``: ``mean|W|`` (elastic), ``max|W|`` (seq), ``max|W| / Qp`` (lsq).
``method: null`` picks ParetoQ's choice: elastic (1 bit), seq (1.58, 2), lsq (3, 4); LSQ is
Esser et al. 2020.

Backward (straight-through estimator; ``g = dL/dWq``, sums over the input dimension)::

    dL/dW     = g * [lo <= x <= hi]
    dL/dalpha = s * sum_in g * t,   t = t_lo (x < lo) | t_hi (x > hi) | level(x) - x (inside)

Elastic binary uses ``t = sign(W)`` everywhere. Ternary SEQ's ``t`` outside the range is
``-1 / +1``, not its outermost levels ``-2/3 / +2/3`` (the reference implementation's
saturation quirk, kept for parity).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TypeAlias

import jax
import jax.numpy as jnp

from .spec import SCALE_EPS, QuantSpec, resolve

__all__ = [
    "fake_quant",
    "fake_quant_vjp",
    "train_codes",
    "init_scale",
    "mse_scale",
    "SCALE_INITS",
    "effective_scale",
    "to_codes",
    "from_codes",
    "export_codes",
]

Array = jax.Array
Bits: TypeAlias = float | str | QuantSpec
"""A bit-width as ``parse_bits`` takes it (1, 1.58 or "ternary", 2, 3, 4; 16 / 32: no
quantization), or an already resolved ``QuantSpec`` (then ``method`` is ignored)."""


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """At least float32 (bf16/f16 inputs are computed in f32 and cast back); f64 stays f64."""
    return jnp.promote_types(dtype, jnp.float32)


def _codes(x: Array, spec: QuantSpec) -> Array:
    """Integer code ``k`` (as floats) of ``x = W / a`` on the spec's grid (training convention:
    ``sign(0) = 0`` at 1 bit)."""
    if spec.grid == "sign":  # elastic binary (ParetoQ Sec. 3): k = sign(x)
        return jnp.sign(x)
    if spec.grid == "seq":  # SEQ (ParetoQ Eq. 2): k = round(n * clip(x, -c, c) - z)
        return jnp.round(spec.n * jnp.clip(x, spec.lo, spec.hi) - spec.z)
    return jnp.clip(jnp.round(x), spec.qmin, spec.qmax)  # LSQ: k = clamp(round(x), Qn, Qp)


def _level(k: Array, spec: QuantSpec) -> Array:
    """The level ``(k + z) / n`` of code ``k`` in units of ``a``."""
    if spec.grid == "seq":  # SEQ: (k + z) / n, e.g. 2 bits: +-1/4, +-3/4
        return (k + spec.z) / spec.n
    return k  # elastic binary (+-1) and LSQ (Qn..Qp): the code itself


def _clamped(scale: Array, dtype: jnp.dtype) -> Array:
    return jnp.maximum(scale.astype(dtype), SCALE_EPS)


def _forward(w: Array, scale: Array, spec: QuantSpec) -> Array:
    dt = _compute_dtype(w.dtype)
    a = _clamped(scale, dt)[..., None, :]
    x = w.astype(dt) / a
    return (a * _level(_codes(x, spec), spec)).astype(w.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fake_quant(w: Array, scale: Array, spec: QuantSpec) -> Array:
    return _forward(w, scale, spec)


def _fake_quant_fwd(w: Array, scale: Array, spec: QuantSpec):
    # Residuals are the inputs: recomputing x in the backward is cheaper than storing masks.
    return _forward(w, scale, spec), (w, scale)


def _fake_quant_bwd(spec: QuantSpec, res, g: Array):
    return _ste_grads(*res, g, spec)


def _ste_grads(w: Array, scale: Array, g: Array, spec: QuantSpec) -> tuple[Array, Array]:
    dt = _compute_dtype(w.dtype)
    a = _clamped(scale, dt)[..., None, :]
    x = w.astype(dt) / a
    g = g.astype(dt)
    below, above = x < spec.lo, x > spec.hi
    dw = jnp.where(below | above, 0, g)
    if spec.grid == "sign":  # elastic binary: t = sign(W), clipped or not
        t = jnp.sign(x)
    else:  # SEQ / LSQ: the saturated level outside (ternary: +-1, its quirk), Q(x) - x inside
        t = jnp.where(
            below, spec.t_lo, jnp.where(above, spec.t_hi, _level(_codes(x, spec), spec) - x)
        )
    numel = w.shape[-2] * w.shape[-1]  # N: the element count of one matrix
    s = 1.0 / math.sqrt(numel * spec.scale_grad_qp)  # LSQ: 1/sqrt(N*Qp); SEQ, binary: 1/sqrt(N)
    dscale = s * jnp.sum(g * t, axis=-2)
    return dw.astype(w.dtype), dscale.astype(scale.dtype)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _statistic(w: Array, spec: QuantSpec) -> Array:
    """Per-output-channel statistic of ``|W|`` that initializes (or, for absmean/minmax, is)
    the scale: ``kappa * mean|W| / div`` or ``max|W| / div`` over the input dimension."""
    aw = jnp.abs(w.astype(_compute_dtype(w.dtype)))
    stat = jnp.mean(aw, axis=-2) if spec.init == "mean" else jnp.max(aw, axis=-2)
    return stat * (spec.kappa / spec.init_div)


def _spec(bits: Bits, method: str | None) -> QuantSpec | None:
    return bits if isinstance(bits, QuantSpec) else resolve(bits, method)


def effective_scale(w: Array, scale: Array, bits: Bits, method: str | None = None) -> Array:
    """The scale ``a`` the forward actually uses: ``max(scale, 1e-5)`` for learned methods; the
    statistic of ``w`` (clamped likewise) for ``absmean`` / ``minmax``."""
    spec = _spec(bits, method)
    if spec is None:
        raise ValueError("effective_scale needs a quantized bit-width (1, 1.58, 2, 3 or 4)")
    dt = _compute_dtype(w.dtype)
    if spec.learned:
        return _clamped(scale, dt)
    return _clamped(jax.lax.stop_gradient(_statistic(w, spec)), dt)


def fake_quant(w: Array, scale: Array | None, bits: Bits, method: str | None = None) -> Array:
    """Quantize-dequantize a kernel ``w (..., in, out)`` with per-channel ``scale (..., out)``.

    Returns an array of ``w``'s shape and dtype, differentiable w.r.t. ``w`` and ``scale`` by the
    straight-through rules of the module docstring. ``bits`` 16/32 return ``w`` unchanged. For
    ``absmean`` / ``minmax`` the scale is recomputed from ``w`` (no gradient), ``scale`` may be
    ``None`` and receives a zero gradient.
    """
    spec = _spec(bits, method)
    if spec is None:
        return w
    if w.ndim < 2:
        raise ValueError(f"fake_quant expects a kernel (..., in, out), got shape {w.shape}")
    if spec.learned:
        if scale is None:
            raise ValueError(f"{spec.method} at {spec.bits} bits needs a learned scale, got None")
        if scale.shape != w.shape[:-2] + w.shape[-1:]:
            raise ValueError(
                f"scale shape {scale.shape} does not match kernel {w.shape}: expected "
                f"{w.shape[:-2] + w.shape[-1:]} (one scale per output channel)"
            )
        return _fake_quant(w, scale, spec)
    a = effective_scale(w, scale, spec)
    return _fake_quant(w, a, spec)


def fake_quant_vjp(
    w: Array, scale: Array, g: Array, bits: Bits, method: str | None = None
) -> tuple[Array, Array]:
    """The straight-through backward of :func:`fake_quant`: ``(dL/dW, dL/dscale)`` for the
    cotangent ``g = dL/dWq`` (module docstring). ``scale`` is the scale the forward divided by
    (the learned scale, or the effective scale of absmean / minmax). Used by callers that form
    ``Wq`` another way (e.g. from gathered integer codes) but must keep the same gradients."""
    spec = _spec(bits, method)
    if spec is None:
        raise ValueError("fake_quant_vjp needs a quantized bit-width (1, 1.58, 2, 3 or 4)")
    return _ste_grads(w, scale, g, spec)


def train_codes(w: Array, scale: Array, bits: Bits, method: str | None = None) -> Array:
    """Integer codes ``k`` (int8) of the training forward for the scale ``scale`` (the learned
    scale, or the effective scale of absmean / minmax): ``from_codes(train_codes(w, a), a,
    dtype=w.dtype)`` equals ``fake_quant``'s forward bit for bit. Unlike :func:`to_codes` a weight
    of exactly 0 keeps code 0 at 1 bit (``sign(0) = 0``, as the forward has it), so 1-bit codes
    take three values."""
    spec = _spec(bits, method)
    if spec is None:
        raise ValueError("train_codes needs a quantized bit-width (1, 1.58, 2, 3 or 4)")
    dt = _compute_dtype(w.dtype)
    x = w.astype(dt) / _clamped(scale, dt)[..., None, :]
    return _codes(x, spec).astype(jnp.int8)


def init_scale(w: Array, bits: Bits, method: str | None = None) -> Array:
    """ParetoQ's scale init per output channel, shape ``(..., out)``, in ``w``'s float dtype
    (at least f32): ``mean|W|`` (1 bit), ``max|W|`` (SEQ), ``max|W| / Qp`` (LSQ, minmax),
    ``kappa * mean|W|`` (absmean)."""
    spec = _spec(bits, method)
    if spec is None:
        raise ValueError("init_scale needs a quantized bit-width (1, 1.58, 2, 3 or 4)")
    return _statistic(w, spec)


def mse_scale(
    w: Array, bits: Bits, method: str | None = None, *, grid: int = 50, refine: int = 10
) -> Array:
    """Per-channel scale minimizing the weight error ``sum_in (W - Q(W))^2`` (not in the paper).

    ParetoQ's ``max|W|`` init for SEQ puts almost every weight of a heavy-tailed row on the
    innermost level; the least-squares scale clips the tail instead. Searched over
    ``a = r * a0`` (``a0 = init_scale(w)``, ``r = 1/grid .. 1``), then refined on a grid
    ``refine`` times finer around the best; never worse than ``a0``, which it keeps for 1 bit
    (``mean|W|`` is already the least-squares scale of ``a * sign(W)``). Same shape and dtype
    rules as :func:`init_scale`; only for learned methods.
    """
    spec = _spec(bits, method)
    if spec is None or not spec.learned:
        raise ValueError(
            "mse_scale needs a learned method (elastic, seq, lsq); absmean / minmax compute "
            "their scale from the weights"
        )
    dt = _compute_dtype(w.dtype)
    w = w.astype(dt)
    a0 = _clamped(_statistic(w, spec), dt)

    def err(a: Array) -> Array:
        return jnp.sum(jnp.square(w - _forward(w, a, spec)), axis=-2)

    def search(best: tuple[Array, Array], cands: Array, base: Array, step: Array):
        def body(carry, c):
            e_best, a_best = carry
            a = jnp.maximum(base + c * step, SCALE_EPS)
            e = err(a)
            better = e < e_best
            return (jnp.where(better, e, e_best), jnp.where(better, a, a_best)), None

        return jax.lax.scan(body, best, cands)[0]

    best = (err(a0), a0)
    coarse = jnp.arange(1, grid, dtype=dt) / grid  # r = 1 is a0 itself
    best = search(best, coarse, jnp.zeros_like(a0), a0)
    fine = jnp.arange(-refine, refine + 1, dtype=dt) / (refine * grid)
    best = search(best, fine, best[1], a0)
    return best[1]


SCALE_INITS = {"paretoq": init_scale, "mse": mse_scale}
"""``model.scale_init`` -> the function computing a learned method's initial scale."""


def to_codes(w: Array, scale: Array | None, bits: Bits, method: str | None = None) -> Array:
    """Integer codes ``k`` (int8, ``w``'s shape) such that ``from_codes`` reproduces the forward.

    At 1 bit a weight of exactly 0 maps to +1 (export convention; the training forward gives 0).
    """
    spec = _spec(bits, method)
    if spec is None:
        raise ValueError("to_codes needs a quantized bit-width (1, 1.58, 2, 3 or 4)")
    a = effective_scale(w, scale, spec)[..., None, :]
    x = w.astype(a.dtype) / a
    k = jnp.where(x >= 0, 1, -1) if spec.grid == "sign" else _codes(x, spec)
    return k.astype(jnp.int8)


def from_codes(
    codes: Array,
    scale: Array,
    bits: Bits,
    method: str | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Array:
    """Dequantize integer codes: ``a * (k + z) / n`` with ``a = max(scale, 1e-5)``.

    ``scale`` is the *effective* scale (see ``effective_scale``); for learned methods that is the
    stored scale itself."""
    spec = _spec(bits, method)
    if spec is None:
        raise ValueError("from_codes needs a quantized bit-width (1, 1.58, 2, 3 or 4)")
    dt = _compute_dtype(jnp.dtype(dtype))
    a = _clamped(scale, dt)[..., None, :]
    return (a * _level(codes.astype(dt), spec)).astype(dtype)


def export_codes(
    w: Array, scale: Array | None, bits: Bits, method: str | None = None
) -> tuple[Array, Array]:
    """``(to_codes, effective_scale)``: the integer codes and the scale an export stores,
    everything needed to rebuild the weight (``from_codes``)."""
    spec = _spec(bits, method)
    return to_codes(w, scale, spec), effective_scale(w, scale, spec)
