"""Llama-family decoders in Flax NNX with ParetoQ-quantized linear layers."""

from paretoq_jax.models.config import LlamaConfig
from paretoq_jax.models.layers import QuantLinear, RMSNorm
from paretoq_jax.models.llama import Llama
from paretoq_jax.models.rules import QuantRules, resolve_rules

__all__ = ["Llama", "LlamaConfig", "QuantLinear", "QuantRules", "RMSNorm", "resolve_rules"]
