"""Sharded quantization-aware training: ``python -m paretoq_jax.train --config configs/NAME.yaml``.

Modules: ``step`` (the jitted sharded train step and loss), ``metrics`` (writing metrics.jsonl,
quant statistics), ``loop`` (``train(cfg)``). The run schema, optimizer, train state and
checkpoints belong to ``paretoq_jax.run`` (shared with eval, export and sweeps); ``RunConfig`` and
its sections are re-exported here. See ``docs/training.md``.
"""

from paretoq_jax.run.config import CheckpointConfig, MeshConfig, ModelConfig, RunConfig, TrainConfig

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
