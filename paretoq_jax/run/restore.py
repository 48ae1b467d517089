"""Rebuild a training run's model from ``RUN_DIR`` and restore its parameters.

One implementation for everyone who reads runs back (evaluation, export, sweeps, the
quickstart): the model is built with the trainer's own ``build_model`` from the run's saved
``config.yaml`` and its parameters are restored from ``RUN_DIR/checkpoints`` into the trainer's
shardings, so a restored model is the trained one bit for bit.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from paretoq_jax.config import load_config

from .build import build_mesh, build_model, load_tokenizer
from .checkpoint import Checkpointer, CheckpointRestoreError
from .config import RunConfig
from .optim import make_optimizer
from .state import abstract_state, state_shardings

__all__ = ["checkpoint_steps", "restore_params", "set_params", "load_run"]


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir/checkpoints`` (ascending)."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.exists():
        return []
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def restore_params(cfg: RunConfig, model: nnx.Module, mesh, step: int | None) -> dict:
    """The ``params`` pure dict of checkpoint ``step`` in ``cfg.run_dir``, restored into the
    trainer's shardings (the optimizer state is restored too and dropped)."""
    return _restore(cfg, model, mesh, step)[1]


def _restore(cfg: RunConfig, model: nnx.Module, mesh, step: int | None) -> tuple[int, dict]:
    """``(step, params)``; ``step=None``: the newest checkpoint that reads back intact (damaged
    newer ones are reported on stderr and left in place)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(cfg.train)
    shardings = state_shardings(mesh, jax.tree.map(lambda x: x.sharding, params), tx, params)
    abstract = abstract_state(params, tx, shardings)
    ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", async_save=False)
    try:
        if step is not None:
            state, _ = ckpt.restore(step, abstract)
        else:
            found = ckpt.restore_latest(abstract, log=lambda m: print(m, file=sys.stderr))
            if found is None:
                raise CheckpointRestoreError(f"{ckpt.directory} holds no complete checkpoint")
            step, state, _ = found
    finally:
        ckpt.close()
    return step, state["params"]


def set_params(model: nnx.Module, params: dict) -> nnx.Module:
    """A model like ``model`` holding ``params`` (a pure dict of its ``nnx.Param`` state)."""
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


def load_run(
    run_dir: str | Path, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None
) -> tuple[nnx.Module, Any, RunConfig, int]:
    """``(model, tokenizer, run_config, step)`` of checkpoint ``step`` (default: the newest
    complete one that reads back intact; a damaged newer one is reported on stderr and left in
    place) of a training run. ``mesh`` defaults to one data axis over all devices.

    Raises ``FileNotFoundError`` naming what is missing (no ``config.yaml``: not a run
    directory; no complete checkpoint; no checkpoint at ``step``).
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{run} has no config.yaml: not a training run directory (give the run_dir of "
            "python -m paretoq_jax.train)"
        )
    cfg = load_config(RunConfig, run / "config.yaml", stored=True)
    cfg = dataclasses.replace(
        cfg, run_dir=str(run), mesh=dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1)
    )
    steps = checkpoint_steps(run)
    if not steps:
        raise FileNotFoundError(f"{run / 'checkpoints'} holds no complete checkpoint: train first")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} in {run / 'checkpoints'}: {steps}")
    mesh = build_mesh(cfg) if mesh is None else mesh
    # The shapes come from the model's config alone: no need to read the start weights. Every
    # parameter, learned scales included, is then overwritten by the checkpoint, so the shell's
    # scale init is irrelevant (and ``mse`` needs pretrained weights to fit).
    shell_model = dataclasses.replace(cfg.model, init="random", scale_init="paretoq")
    shell = dataclasses.replace(cfg, model=shell_model)
    model = build_model(shell, mesh)
    step, params = _restore(cfg, model, mesh, step)  # None: the newest intact checkpoint
    model = set_params(model, params)
    return model, load_tokenizer(cfg), cfg, step
