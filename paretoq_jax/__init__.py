"""paretoq_jax: extremely low-bit quantization-aware training (ParetoQ) in JAX / Flax NNX.

Top-level conveniences (imported lazily, so ``import paretoq_jax`` stays cheap):
``load_pretrained``, ``save_pretrained``, ``load_tokenizer``, ``load_model_config``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "paretoq_jax.io",
    "save_pretrained": "paretoq_jax.io",
    "load_tokenizer": "paretoq_jax.io",
    "load_model_config": "paretoq_jax.io",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paretoq_jax' has no attribute {name!r}")
