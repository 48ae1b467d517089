"""The schema of a training run (``configs/*.yaml``); see ``docs/training.md``.

Loaded with ``paretoq_jax.config.load_config(RunConfig, path, overrides)``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from paretoq_jax.data import DataConfig
from paretoq_jax.quant import parse_bits, resolve

__all__ = [
    "RunConfig",
    "ModelConfig",
    "TrainConfig",
    "MeshConfig",
    "CheckpointConfig",
    "DataConfig",
]


@dataclasses.dataclass
class ModelConfig:
    """What to train.

    ``path``: an HF folder (config.json + safetensors + tokenizer), a ``.gguf`` file or a hub id;
    with ``init: random``, a folder holding only ``config.json`` and tokenizer files.
    ``bits``: 1, 1.58 (or "ternary"), 2, 3, 4, or 16/32 for float training.
    ``method``: quantizer (elastic, seq, lsq, absmean, minmax); null picks ParetoQ's choice.
    ``dtype``: compute dtype; ``auto`` is bfloat16 on GPU/TPU and float32 on CPU. Master
    weights and optimizer state are always float32.
    ``teacher``: float teacher for ``train.distill`` (null: the float weights at ``path``).
    ``scale_init``: initial learned scales: ``paretoq`` (the paper's statistic) or ``mse``
    (least-squares fit to the pretrained weights, ``quant.mse_scale``).
    """

    path: str
    bits: float | str = 2
    method: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    remat: bool = False
    scan_layers: bool = False
    teacher: str | None = None
    scale_init: Literal["paretoq", "mse"] = "paretoq"

    def __post_init__(self) -> None:
        self.bits = parse_bits(self.bits)
        resolve(self.bits, self.method)  # raises a ValueError naming a bad method
        if self.scale_init != "paretoq" and self.init == "random":
            raise ValueError(
                f"model.scale_init={self.scale_init!r} fits scales to pretrained weights; "
                "with model.init=random use scale_init=paretoq"
            )


@dataclasses.dataclass
class TrainConfig:
    """Optimization. ``batch_size`` is global, in sequences, summed over all devices/hosts."""

    steps: int
    lr: float
    batch_size: int
    grad_accum: int = 1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    distill: bool = False
    # Block-wise distillation: weight of the per-layer reconstruction loss (train.step.
    # layer_reconstruction; every quantized layer fed the float teacher's input). 0 = off.
    distill_layers: float = 0.0
    # Quantization scales' own learning rate / schedule (null: the same as the weights').
    scale_lr: float | None = None
    scale_schedule: Literal["cosine", "linear", "constant"] | None = None
    log_every: int = 1
    eval_every: int = 0
    quant_stats_every: int = 50
    tensorboard: bool = False
    # Resume even when keys that change what the checkpointed state means (bits, method, model,
    # optimizer, data...) differ from RUN_DIR/config.yaml (run.checkpoint.check_resume_config).
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum={self.grad_accum}"
            )
        if self.scale_lr is not None and self.scale_lr < 0:
            raise ValueError(
                f"train.scale_lr must be >= 0 (0 freezes the scales), got {self.scale_lr}"
            )
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"train.warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if self.distill_layers < 0:
            raise ValueError(f"train.distill_layers must be >= 0, got {self.distill_layers}")

    @property
    def uses_teacher(self) -> bool:
        """Whether the run needs the frozen float teacher (``distill`` or ``distill_layers``)."""
        return self.distill or self.distill_layers > 0


@dataclasses.dataclass
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)``; one axis may be -1 (all remaining devices).

    ``gather_codes``: under FSDP, quantized linears all-gather their packed integer codes and
    scales instead of float kernels (``auto``, ``true``/``on``; exact,
    docs/fsdp-code-gather.md) or float kernels (``false``/``off``). ``true`` fails if nothing
    would gather codes (e.g. ``fsdp = 1``). (YAML reads ``on``/``off`` as ``true``/``false``.)
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    gather_codes: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be >= 1 with at most one -1, got {sizes}")
        if self.gather_codes not in ("auto", True, False):
            raise ValueError(
                f"mesh.gather_codes must be auto, true (on) or false (off), "
                f"got {self.gather_codes!r}"
            )


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpoints in ``run_dir/checkpoints``: every ``every`` steps and at the end."""

    every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclasses.dataclass
class RunConfig:
    """One training run; everything it writes goes under ``run_dir``."""

    run_dir: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
