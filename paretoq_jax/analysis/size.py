"""A model's size in bits: quantized weights at their bit-width, everything else at 16 bits.

ParetoQ (Sec. 1, Fig. 1) compares bit-widths at equal *model size*. Here the size of a model is

    sum over quantized kernels of  n_weights * bits_per_weight(spec)
  + 16 * (every float parameter + one scale per output channel of each quantized kernel)

The per-channel scale is counted for every quantized kernel, learned or not: a deployed
``absmean``/``minmax`` layer needs its scale too. Ternary (1.58-bit) weights cost
``log2(3) = 1.585`` bits in the information-theoretic count (``ternary="ideal"``), 2 bits as
stored by the dense 2-bit layout (``"2bit"``) and 1.6 bits with 5 trits a byte (``"base3"``);
see ``docs/packed-format.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from flax import nnx

from paretoq_jax.models.linears import quant_linears
from paretoq_jax.quant import QuantSpec

__all__ = ["ModelSize", "bits_per_weight", "model_size_bits", "model_size"]

TERNARY_BITS = {"ideal": math.log2(3), "2bit": 2.0, "base3": 8 / 5}


def bits_per_weight(
    spec: QuantSpec | None, *, ternary: str = "ideal", float_bits: int = 16
) -> float:
    """Bits one weight costs under ``spec`` (``None``: a float weight at ``float_bits``)."""
    if ternary not in TERNARY_BITS:
        raise ValueError(f"ternary={ternary!r}: choose one of {sorted(TERNARY_BITS)}")
    if spec is None:
        return float(float_bits)
    if spec.bits == 1.58:
        return TERNARY_BITS[ternary]
    return float(spec.storage_bits)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Parameter counts and sizes in bits of one model."""

    quantized_weights: int
    scales: int
    float_params: int
    bits: float  # ternary at log2(3)
    bits_stored: float  # ternary at 2 bits (the dense 2-bit layout)

    @property
    def total_params(self) -> int:
        """All parameters of the model (scales excluded)."""
        return self.quantized_weights + self.float_params

    @property
    def megabytes(self) -> float:
        return self.bits / 8 / 1e6


def model_size_bits(
    quantized: Iterable[tuple[int, int, QuantSpec]], float_params: int, *, float_bits: int = 16
) -> ModelSize:
    """Size of a model with the quantized kernels ``(n_weights, n_out_channels, spec)`` and
    ``float_params`` parameters kept in floating point."""
    n_q = n_scales = 0
    ideal = stored = 0.0
    for n, channels, spec in quantized:
        if n < 0 or channels < 0:
            raise ValueError(f"negative parameter count ({n}, {channels})")
        n_q += n
        n_scales += channels
        ideal += n * bits_per_weight(spec, ternary="ideal")
        stored += n * bits_per_weight(spec, ternary="2bit")
    if float_params < 0:
        raise ValueError(f"negative float parameter count {float_params}")
    float_part = float_bits * (float_params + n_scales)
    return ModelSize(n_q, n_scales, float_params, ideal + float_part, stored + float_part)


def model_size(model, *, float_bits: int = 16) -> ModelSize:
    """:func:`model_size_bits` of a Flax NNX model built from ``paretoq_jax.models``.

    Every ``QuantLinear`` with a spec contributes its kernel (all stacked layers) as quantized
    weights and ``kernel.size / in_features`` scales; every other parameter (embeddings, norms,
    float projections, biases) is a float parameter. Learned scale parameters are not counted
    twice: they are the scales.
    """
    quantized, counted = [], set()
    for m in quant_linears(model).values():
        k = m.kernel[...]
        quantized.append((int(k.size), int(k.size // k.shape[-2]), m.spec))
        counted.add(id(m.kernel))
        if m.scale is not None:
            counted.add(id(m.scale))
    float_params = sum(
        int(v[...].size) for _, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param) and id(v) not in counted
    )  # fmt: skip
    return model_size_bits(quantized, float_params, float_bits=float_bits)
