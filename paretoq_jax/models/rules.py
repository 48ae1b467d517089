"""Which linear layers are quantized, at which bits and with which method.

A `QuantRules` is an ordered list of `(regex, bits, method)`; a module path such as
``layers.3.self_attn.q_proj`` takes the first rule whose regex matches it in full
(`re.fullmatch`), and stays in floating point when none does. ParetoQ's setting (Sec. 3 of the
paper, "Experimental settings") quantizes every q, k, v, o, gate, up and down projection of every
decoder layer and keeps the embeddings, `lm_head` and all norms in full precision.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from paretoq_jax import quant

DECODER_PROJECTIONS = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

Rule = tuple[str, float | int | str, str | None]


@dataclasses.dataclass(frozen=True)
class QuantRules:
    """Ordered `(regex over module path, bits, method)` rules; first full match wins."""

    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        checked = []
        for rule in self.rules:
            if len(rule) != 3:
                raise ValueError(f"a quantization rule is (regex, bits, method), got {rule!r}")
            pattern, bits, method = rule
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regex {pattern!r} in quantization rules: {e}") from None
            quant.resolve(bits, method)  # raises ValueError naming bad bits / method
            checked.append((pattern, bits, method))
        object.__setattr__(self, "rules", tuple(checked))

    @classmethod
    def paretoq(cls, bits: float | int | str, method: str | None = None) -> QuantRules:
        """ParetoQ's default: every decoder projection at `bits`; everything else float."""
        return cls(((DECODER_PROJECTIONS, bits, method),))

    @classmethod
    def from_list(cls, rules: Iterable[Iterable]) -> QuantRules:
        """From JSON/YAML-style lists `[[regex, bits, method], ...]`."""
        return cls(tuple(tuple(r) for r in rules))

    def to_list(self) -> list[list]:
        return [list(r) for r in self.rules]

    def spec_for(self, path: str) -> quant.QuantSpec | None:
        """The `QuantSpec` for a module path (``None``: keep it in floating point)."""
        for pattern, bits, method in self.rules:
            if re.fullmatch(pattern, path):
                return quant.resolve(bits, method)
        return None


def resolve_rules(
    bits: float | int | str = 16, method: str | None = None, rules: QuantRules | None = None
) -> QuantRules:
    """`rules` when given, else ParetoQ's rule at `bits` (no rule at all for 16/32 bits)."""
    if rules is not None:
        return rules
    if quant.resolve(bits, method) is None:
        return QuantRules()
    return QuantRules.paretoq(bits, method)
