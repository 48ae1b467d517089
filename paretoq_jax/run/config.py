"""The schema of a training run (``configs/*.yaml``); see ``docs/training.md``.

Loaded with ``paretoq_jax.config.load_config(RunConfig, path, overrides)``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from paretoq_jax.data import DataConfig
from paretoq_jax.models.attention import AttentionMode, block_size
from paretoq_jax.quant import parse_bits, resolve

__all__ = [
    "RunConfig",
    "ModelConfig",
    "TrainConfig",
    "OptimizerConfig",
    "DistillConfig",
    "LoggingConfig",
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
    ``teacher``: float teacher for ``train.distill`` (logits or layers; null: the float weights
    at ``path``).
    ``scale_init``: initial learned scales: ``paretoq`` (the paper's statistic) or ``mse``
    (least-squares fit to the pretrained weights, ``quant.mse_scale``).
    ``attention``: ``auto`` runs causal attention as the fused splash kernel on TPU meshes, as
    cuDNN's fused kernel on NVIDIA GPU meshes (bf16 compute) and as XLA einsums elsewhere;
    ``splash`` / ``cudnn`` / ``xla`` force one (splash on CPU: Pallas interpret mode, for
    checking numerics). See ``paretoq_jax.models.attention``.
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
    attention: AttentionMode = "auto"

    def __post_init__(self) -> None:
        self.bits = parse_bits(self.bits)
        resolve(self.bits, self.method)  # raises a ValueError naming a bad method
        if self.scale_init != "paretoq" and self.init == "random":
            raise ValueError(
                f"model.scale_init={self.scale_init!r} fits scales to pretrained weights; "
                "with model.init=random use scale_init=paretoq"
            )


Schedule = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (``train.optimizer``; ``run.optim``).

    ``schedule``: decay after ``warmup_steps`` of linear warmup, down to ``lr * min_lr_ratio`` at
    the last step. ``grad_clip``: global-norm clipping (0: off). ``scale_lr`` /
    ``scale_schedule``: the quantization scales' own learning rate / schedule (null: the same as
    the weights'; ``scale_lr: 0`` freezes the scales).
    """

    lr: float
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    scale_lr: float | None = None
    scale_schedule: Schedule | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"train.optimizer.lr must be > 0, got {self.lr}")
        if self.scale_lr is not None and self.scale_lr < 0:
            raise ValueError(
                f"train.optimizer.scale_lr must be >= 0 (0 freezes the scales), got {self.scale_lr}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"train.optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass
class DistillConfig:
    """Distillation from the frozen float teacher (``model.teacher``; ``train.step``).

    ``logits``: the loss is ``KL(teacher || student)`` on the logits instead of next-token
    cross-entropy. ``layers``: weight of the block-wise loss (``train.step.
    layer_reconstruction``: every quantized layer, fed the teacher's input, reproduces the
    teacher layer's output); 0 = off.
    """

    logits: bool = False
    layers: float = 0.0

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ValueError(f"train.distill.layers must be >= 0, got {self.layers}")


@dataclasses.dataclass
class LoggingConfig:
    """What a run reports and how often (``train.logging``; ``train.callbacks``).

    ``log_every``: a metrics row (``metrics.jsonl``) every so many steps and at the last one;
    ``eval_every``: validation perplexity on those logging steps (0: off);
    ``quant_stats_every``: per-projection quantization statistics; ``tensorboard``: also write
    TensorBoard events.
    """

    log_every: int = 1
    eval_every: int = 0
    quant_stats_every: int = 50
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"train.logging.log_every must be >= 1, got {self.log_every}")


# Keys moved into the sections: old ``train.KEY`` -> ``train.SECTION.KEY``.
_OPTIMIZER_KEYS = [f.name for f in dataclasses.fields(OptimizerConfig)]
_LOGGING_KEYS = [f.name for f in dataclasses.fields(LoggingConfig)]


@dataclasses.dataclass
class TrainConfig:
    """The step shape (``steps`` of ``batch_size`` sequences, global over all devices and hosts,
    in ``grad_accum`` micro-batches; ``seed``) and the ``optimizer``, ``distill`` and
    ``logging`` sections."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        **{k: f"optimizer.{k}" for k in _OPTIMIZER_KEYS},
        "distill": "distill.logits",
        "distill_layers": "distill.layers",
        **{k: f"logging.{k}" for k in _LOGGING_KEYS},
    }

    steps: int
    batch_size: int
    optimizer: OptimizerConfig
    grad_accum: int = 1
    seed: int = 0
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    # Resume even when keys that change what the checkpointed state means (bits, method, model,
    # optimizer, data...) differ from RUN_DIR/config.yaml (run.checkpoint.check_resume_config).
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum={self.grad_accum}"
            )
        if self.optimizer.warmup_steps > self.steps:
            raise ValueError(
                f"train.optimizer.warmup_steps must be in [0, train.steps={self.steps}], "
                f"got {self.optimizer.warmup_steps}"
            )

    @property
    def uses_teacher(self) -> bool:
        """Whether the run needs the frozen float teacher (``distill.logits`` or
        ``distill.layers``)."""
        return self.distill.logits or self.distill.layers > 0


@dataclasses.dataclass
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)``; one axis may be -1 (all remaining devices).

    ``gather_codes``: under FSDP, quantized linears all-gather their packed integer codes and
    scales instead of float kernels (``true``/``on``; exact, docs/fsdp-code-gather.md) or float
    kernels (``false``/``off``); ``auto``: codes on TPU / GPU meshes, float kernels on CPU
    meshes, where it measured slower. ``true`` fails if nothing would gather codes (e.g.
    ``fsdp = 1``). (YAML reads ``on``/``off`` as ``true``/``false``.)
    ``keep_codes``: with gathered codes and ``model.remat``, each layer keeps its gathered
    packed codes and scales for the backward instead of quantizing, packing and gathering its
    kernels again there: one code all-gather per kernel and step instead of two, and fewer HBM
    bytes (Llama-3.2 3B at 2 bits on v5p: -1.2% a layer), for bits / 8 bytes per weight of
    every layer's gathered kernels on each device (``false`` if that does not fit).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    gather_codes: bool | Literal["auto"] = "auto"
    keep_codes: bool = True

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

    def __post_init__(self) -> None:
        lengths = {self.data.seq_len, self.data.train_len}
        if self.model.attention == "splash" and any(block_size(n) is None for n in lengths):
            raise ValueError(
                f"model.attention=splash needs sequence lengths that are multiples of 128 "
                f"(data.seq_len / train_seq_len: {sorted(lengths)}); change them or use "
                "model.attention=auto (XLA's attention where the kernel cannot run)"
            )
