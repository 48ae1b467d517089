"""The training loop: build mesh, model, optimizer and data; resume; step; log; checkpoint.

``train(cfg)`` runs (or resumes) the run described by a ``RunConfig`` and returns a summary.
See ``docs/training.md`` for the files it writes and the fault-handling guarantees.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from paretoq_jax.config import save_config, to_dict
from paretoq_jax.data import BatchIterator, Prefetcher, PreparedBlocks, build_splits
from paretoq_jax.errors import ParetoQError
from paretoq_jax.outputs import check_run_dir
from paretoq_jax.parallel import code_gather
from paretoq_jax.run.build import build_mesh, build_model, load_tokenizer, param_shardings
from paretoq_jax.run.checkpoint import Checkpointer, check_resume_config
from paretoq_jax.run.config import RunConfig
from paretoq_jax.run.optim import make_optimizer, make_schedule
from paretoq_jax.run.state import abstract_state, init_state, state_shardings
from paretoq_jax.runtime import release_free_memory

from . import callbacks as cb
from .callbacks import Callback
from .metrics import MetricsWriter
from .step import TrainStep, make_train_step

__all__ = [
    "train",
    "NonFiniteLossError",
    "make_step_for",
    "build_trainer",
]


class NonFiniteLossError(ParetoQError, RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving."""

    exit_code = 3


def tree_bytes(tree: Any) -> tuple[int, int]:
    """(total bytes of the arrays in ``tree``, bytes held on this process's first device)."""
    dev = jax.local_devices()[0]
    total = on_dev = 0
    for x in jax.tree.leaves(tree):
        total += x.size * x.dtype.itemsize
        on_dev += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev)
    return total, on_dev


def _global_batch(local: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """This process's rows -> one global array sharded over the batch axes."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local, np.int32))


def make_step_for(
    cfg: RunConfig,
    mesh: jax.sharding.Mesh,
    model: nnx.Module,
    teacher: nnx.Module | None = None,
) -> tuple[TrainStep, optax.GradientTransformation]:
    """``(jitted train step, optimizer)`` for ``model`` and the distillation ``teacher`` (needed
    when ``train.uses_teacher``). Either may be concrete or abstract (``nnx.eval_shape``): the
    parameter shardings are the arrays' own, else those of their logical axis names."""
    tcfg = cfg.train
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tcfg)
    params = nnx.to_pure_dict(params)
    shardings = state_shardings(mesh, param_shardings(model, mesh), tx, params)
    teacher_args: dict[str, Any] = {}
    if tcfg.uses_teacher:
        if teacher is None:
            raise ValueError("train.distill.logits / train.distill.layers need the teacher model")
        t_graphdef, _, t_rest = nnx.split(teacher, nnx.Param, ...)
        teacher_args = dict(
            teacher_graphdef=t_graphdef,
            teacher_rest=t_rest,
            teacher_shardings=param_shardings(teacher, mesh),
        )
    step_fn = make_train_step(
        graphdef, rest, tx, mesh, shardings, grad_accum=tcfg.grad_accum,
        distill=tcfg.distill.logits, layer_weight=tcfg.distill.layers, **teacher_args,
    )  # fmt: skip
    return step_fn, tx


def build_trainer(
    cfg: RunConfig, mesh: jax.sharding.Mesh, model: nnx.Module
) -> tuple[dict, TrainStep, Any]:
    """``(initial train state, jitted step, teacher params or None)`` for ``model``."""
    tcfg = cfg.train
    teacher = build_model(cfg, mesh, teacher=True) if tcfg.uses_teacher else None
    step_fn, tx = make_step_for(cfg, mesh, model, teacher)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = init_state(params, tx, step_fn.state_shardings, tcfg.seed)
    teacher_params = None
    if teacher is not None:
        teacher_params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
    return state, step_fn, teacher_params


def train(
    cfg: RunConfig, *, progress: bool = True, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Run (or resume) training; returns ``{"step", "loss", "run_dir", "resumed_from",
    "interrupted", ...}``. ``interrupted`` is the signal number when SIGINT / SIGTERM stopped
    the run early (after saving its step), else None. ``callbacks`` run after every step, after
    the built-in ones and before the signal check (e.g. a test slowing a run down).

    Raises ``NonFiniteLossError`` when the loss or gradient norm becomes non-finite (nothing is
    saved for that step; earlier checkpoints stay intact).
    """
    run_dir = Path(cfg.run_dir)
    is_main = jax.process_index() == 0
    changed = _check_run_dir(cfg, is_main)
    mesh = build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    train_blocks, val_blocks = build_splits(cfg.data, tokenizer)
    tcfg = cfg.train
    _check_batch_split(cfg, mesh)
    model = build_model(cfg, mesh)
    code_gather.configure(  # `on` fails if nothing gathers
        model, mesh, cfg.mesh.gather_codes, keep=cfg.mesh.keep_codes
    )
    state, step_fn, teacher_params = build_trainer(cfg, mesh, model)
    shardings = step_fn.state_shardings
    # written once everything the config names has been built: bad input leaves no run dir
    _write_run_config(cfg, is_main, changed)

    memory = _state_memory(state, mesh, is_main)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)  # fmt: skip
    # The newest checkpoint that reads back intact; unreadable newer ones are kept aside.
    restored = ckpt.restore_latest(
        abstract_state(state["params"], step_fn.tx, shardings),
        set_aside=True,
        log=print if is_main else None,
    )
    start, data_state = 0, None
    if restored is not None:
        start, state, meta = restored
        data_state = meta["data"]

    it = _batch_iterator(cfg, train_blocks, data_state)
    writer = MetricsWriter(
        run_dir, total_steps=tcfg.steps, start_step=start, enabled=is_main,
        progress=progress, tensorboard=tcfg.logging.tensorboard,
    )  # fmt: skip
    if start:
        writer.message(f"[train] resumed from step {start} in {run_dir / 'checkpoints'}")

    def save(step: int) -> None:
        ckpt.save(step, state, {"step": step, "data": it.state.to_dict(), "config": to_dict(cfg)})

    signals = cb.Signals(cfg, save, writer.message)
    after_step = [
        cb.log_row(cfg, make_schedule(tcfg), writer),
        cb.evaluation(cfg, model, val_blocks, mesh),
        cb.quant_statistics(model, tcfg.logging.quant_stats_every, start),
        cb.write_row(writer),
        cb.checkpointing(cfg, save),
        cb.heap_guard(start),
        *callbacks,
        signals,
    ]
    tokens_per_step = tcfg.batch_size * cfg.data.train_len
    extra = (teacher_params,) if tcfg.uses_teacher else ()
    loss, step = float("nan"), start
    try:
        with signals:
            t_last = time.perf_counter()
            while step < tcfg.steps:
                batch = {"tokens": _global_batch(it.next(), step_fn.batch_sharding)}
                state, metrics = step_fn(state, batch, *extra)
                metrics = jax.device_get(metrics)
                step += 1
                now = time.perf_counter()
                end = cb.StepEnd(step, state, float(metrics["loss"]), float(metrics["grad_norm"]),
                                 step_time=now - t_last)  # fmt: skip
                loss = end.loss
                _check_finite(end, ckpt, run_dir)
                writer.advance(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / end.step_time:.0f}")
                t_last = now
                for callback in after_step:
                    if callback(end):  # off-step work: not charged to the next step
                        t_last = time.perf_counter()
                if end.stop:
                    break
    finally:
        if isinstance(it, Prefetcher):
            it.close()
        ckpt.close()
        writer.close()
        release_free_memory()  # the caller (a sweep's evaluation) need not inherit our heap
    return {
        "step": step,
        "loss": loss,
        "run_dir": str(run_dir),
        "resumed_from": start,
        "interrupted": signals.interrupted,
        **memory,
    }


def _check_batch_split(cfg: RunConfig, mesh: jax.sharding.Mesh) -> None:
    tcfg = cfg.train
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tcfg.batch_size % (n_batch_shards * tcfg.grad_accum):
        raise ValueError(
            f"train.batch_size={tcfg.batch_size} must be divisible by mesh.data x mesh.fsdp x "
            f"train.grad_accum = {n_batch_shards} x {tcfg.grad_accum}"
        )


def _state_memory(state: dict, mesh: jax.sharding.Mesh, is_main: bool) -> dict[str, int]:
    """Bytes of parameters + optimizer state in all and on device 0 (printed by process 0)."""
    total, on_dev = tree_bytes({"params": state["params"], "opt": state["opt_state"]})
    if is_main:
        print(f"[train] params + optimizer state: {total / 2**20:.1f} MiB in all, "
              f"{on_dev / 2**20:.1f} MiB on device 0 (mesh {dict(mesh.shape)})")  # fmt: skip
    return {"state_bytes_total": total, "state_bytes_device0": on_dev}


def _batch_iterator(cfg: RunConfig, train_blocks: Any, data_state: dict | None) -> Any:
    """This process's share of the shuffled training batches, from ``data_state`` on (resume);
    prepared (zarr) blocks are read ahead on a thread (close it when done)."""
    it = BatchIterator(
        train_blocks,
        cfg.train.batch_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        state=data_state,
    )
    return Prefetcher(it) if isinstance(train_blocks, PreparedBlocks) else it


def _check_run_dir(cfg: RunConfig, is_main: bool) -> list[str]:
    """Refuse a foreign folder or a state-changing resume, writing nothing; returns the
    config changes a resume makes (safe ones, or allowed)."""
    if is_main:
        check_run_dir(Path(cfg.run_dir))  # never trains into a folder of other files or a run's
    return check_resume_config(cfg, Path(cfg.run_dir))  # refuses a state-changing resume


def _write_run_config(cfg: RunConfig, is_main: bool, changed: list[str]) -> None:
    """Create the run dir and write its ``config.yaml`` (process 0)."""
    if not is_main:
        return
    run_dir = Path(cfg.run_dir)
    if changed:
        print(f"[train] resuming {run_dir} with config changes: {'; '.join(changed)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    once = dataclasses.replace(cfg.train, allow_config_change=False)  # never sticky
    save_config(dataclasses.replace(cfg, train=once), run_dir / "config.yaml")


def _check_finite(end: cb.StepEnd, ckpt: Checkpointer, run_dir: Path) -> None:
    if math.isfinite(end.loss) and math.isfinite(end.grad_norm):
        return
    raise NonFiniteLossError(
        f"non-finite loss={end.loss} / grad_norm={end.grad_norm} at step {end.step}; nothing "
        f"was saved for it. The last good checkpoint is step {ckpt.latest_step()} in "
        f"{run_dir / 'checkpoints'}. Lower train.optimizer.lr, raise "
        "train.optimizer.warmup_steps or set train.optimizer.grad_clip, then rerun (it resumes "
        "from that checkpoint)."
    )
