"""Separate learning rate / schedule for the quantization scales (train.optimizer.scale_lr)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from paretoq_jax.config import load_config
from paretoq_jax.run.build import build_mesh, build_model
from paretoq_jax.run.config import RunConfig
from paretoq_jax.run.optim import make_optimizer, scale_labels
from paretoq_jax.run.restore import load_run
from paretoq_jax.train.loop import train

ROOT = Path(__file__).resolve().parent.parent


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _leaves(tree, name):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [np.asarray(v) for p, v in flat if getattr(p[-1], "key", None) == name]


def _run(tmp_path: Path, *overrides: str):
    cfg = load_config(
        RunConfig,
        ROOT / "configs" / "tiny.yaml",
        [f"run_dir={tmp_path}", "train.steps=3", "train.logging.eval_every=0", *overrides],
    )
    start = _params(build_model(cfg, build_mesh(cfg)))
    train(cfg, progress=False)
    end = _params(load_run(tmp_path)[0])
    return start, end


def test_scale_lr_zero_freezes_scales_only(tmp_path):
    start, end = _run(tmp_path, "train.optimizer.scale_lr=0")
    for a, b in zip(_leaves(start, "scale"), _leaves(end, "scale"), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in
             zip(_leaves(start, "kernel"), _leaves(end, "kernel"), strict=True)]  # fmt: skip
    assert all(moved)


def test_scale_lr_changes_only_the_scales_updates(tmp_path):
    base_start, base_end = _run(tmp_path / "a")
    _, fast_end = _run(
        tmp_path / "b", "train.optimizer.scale_lr=1e-2", "train.optimizer.scale_schedule=constant"
    )
    d_base = sum(np.abs(a - b).sum() for a, b in
                 zip(_leaves(base_start, "scale"), _leaves(base_end, "scale"), strict=True))  # fmt: skip
    d_fast = sum(np.abs(a - b).sum() for a, b in
                 zip(_leaves(base_start, "scale"), _leaves(fast_end, "scale"), strict=True))  # fmt: skip
    assert d_fast > 3 * d_base  # lr 1e-2 constant vs 1e-3 cosine


def test_labels_and_validation():
    labels = scale_labels({"a": {"kernel": 1, "scale": 2}, "embed_tokens": 3})
    assert labels == {"a": {"kernel": "weights", "scale": "scales"}, "embed_tokens": "weights"}
    cfg = load_config(RunConfig, ROOT / "configs" / "tiny.yaml", ["train.optimizer.scale_lr=1e-3"])
    assert make_optimizer(cfg.train) is not None
    with pytest.raises(Exception, match="scale_lr must be >= 0"):
        load_config(RunConfig, ROOT / "configs" / "tiny.yaml", ["train.optimizer.scale_lr=-1"])
