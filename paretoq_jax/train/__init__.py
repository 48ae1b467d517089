"""Sharded quantization-aware training: ``python -m paretoq_jax.train --config configs/NAME.yaml``.

Modules: ``config`` (the run schema), ``optim`` (AdamW + schedules), ``step`` (the jitted sharded
train step and loss), ``checkpoint`` (Orbax), ``metrics`` (metrics.jsonl, quant statistics),
``loop`` (``train(cfg)``). See ``docs/training.md``.
"""

from .config import CheckpointConfig, MeshConfig, ModelConfig, RunConfig, TrainConfig
from .loop import NonFiniteLossError, train

__all__ = [
    "CheckpointConfig",
    "MeshConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "RunConfig",
    "TrainConfig",
    "train",
]
