"""The model's linear projections: the seven decoder projection names and the one walk that finds
a model's ``QuantLinear`` modules (export, checkpoints, statistics, sizes, code gathering)."""

from __future__ import annotations

from flax import nnx

from .layers import QuantLinear

__all__ = ["PROJECTIONS", "quant_linears", "named"]

# The seven projections of a decoder layer ParetoQ quantizes: attribute name -> module path
# inside a layer (the HF name without ``model.layers.{i}.``).
PROJECTIONS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def quant_linears(model: nnx.Module, *, quantized: bool = True) -> dict[tuple, QuantLinear]:
    """``{key path: QuantLinear}`` of ``model`` (concrete or abstract), in module order, e.g.
    ``("layers", "self_attn", "q_proj")`` (stacked layers) or ``("layers", 3, ...)``.
    ``quantized``: only those with a ``QuantSpec`` (False: float ones too)."""
    return {
        tuple(path): m
        for path, m in nnx.iter_modules(model)
        if isinstance(m, QuantLinear) and (m.spec is not None or not quantized)
    }


def named(modules: dict[tuple, QuantLinear]) -> dict[str, QuantLinear]:
    """The same dict keyed by module path strings: ``("layers", 3, "mlp", "up_proj")`` ->
    ``"layers.3.mlp.up_proj"``."""
    return {".".join(map(str, path)): m for path, m in modules.items()}
