"""The optimizer: optax AdamW over weights and quantization scales, LR schedules, clipping.

ParetoQ trains every parameter (float weights, embeddings, norms and the learned per-channel
scales ``alpha``) with one AdamW (paper Sec. 4: lr 2e-5 at 1-2 bits, 1e-5 at 3-4 bits, cosine
decay, no warmup, weight decay 0). Gradient accumulation is done in the train step (an exact
mean over the global batch), not here.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from .config import TrainConfig

__all__ = ["make_schedule", "make_optimizer", "decay_mask", "scale_labels"]

# Weight decay applies to the weight matrices (projection kernels, the token embedding, an
# untied lm_head's kernel), as Hugging Face's Trainer does for the ParetoQ reference: never to
# norms, biases or quantization scales. Matched by leaf name: stacked (scanned) norms are 2-D too.
_DECAYED = ("kernel", "embed_tokens")


def make_schedule(
    cfg: TrainConfig, lr: float | None = None, kind: str | None = None
) -> optax.Schedule:
    """Learning rate per optimizer update: optional linear warmup, then cosine/linear/constant.

    The decay runs from ``lr`` (default ``cfg.optimizer.lr``) down to ``lr * min_lr_ratio`` at
    step ``cfg.steps`` (HF's cosine schedule when ``min_lr_ratio=0``); ``kind`` overrides
    ``cfg.optimizer.schedule``.
    """
    opt = cfg.optimizer
    lr = opt.lr if lr is None else lr
    kind = opt.schedule if kind is None else kind
    warmup = opt.warmup_steps
    decay_steps = max(cfg.steps - warmup, 1)
    end = lr * opt.min_lr_ratio
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt.min_lr_ratio)
    elif kind == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    else:
        main = optax.constant_schedule(lr)
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: kernels and the token embedding
    (``embed_tokens``); False for norms, biases and quantization scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) in _DECAYED for k in path[-1:]), params
    )


def scale_labels(params: Any) -> Any:
    """``"scales"`` for the quantization scales (leaves named ``scale``), else ``"weights"``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "scales" if getattr(path[-1], "key", None) == "scale" else "weights",
        params,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (``grad_clip > 0``) followed by AdamW on ``make_schedule(cfg)``.

    With ``train.optimizer.scale_lr`` or ``scale_schedule`` set, the quantization scales get
    their own AdamW with that learning rate / schedule (``optax.multi_transform``); the clipping
    still uses the global norm over all gradients.
    """
    opt = cfg.optimizer

    def adamw(schedule: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(
            schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
            mask=decay_mask,
        )  # fmt: skip

    if opt.scale_lr is None and opt.scale_schedule is None:
        adamw = adamw(make_schedule(cfg))
    else:
        scales = make_schedule(cfg, opt.scale_lr, opt.scale_schedule)
        adamw = optax.multi_transform(
            {"weights": adamw(make_schedule(cfg)), "scales": adamw(scales)}, scale_labels
        )
    if opt.grad_clip and opt.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)
    return adamw
