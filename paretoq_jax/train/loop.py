"""The training loop: build mesh, model, optimizer and data; resume; step; log; checkpoint.

``train(cfg)`` runs (or resumes) the run described by a ``RunConfig`` and returns a summary.
See ``docs/training.md`` for the files it writes and the fault-handling guarantees.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from paretoq_jax.config import save_config, to_dict
from paretoq_jax.data import BatchIterator, Prefetcher, PreparedBlocks, build_splits
from paretoq_jax.errors import ParetoQError
from paretoq_jax.eval.perplexity import validation_perplexity
from paretoq_jax.outputs import check_run_dir
from paretoq_jax.parallel import code_gather
from paretoq_jax.run.build import build_mesh, build_model, load_tokenizer, param_shardings
from paretoq_jax.run.checkpoint import Checkpointer, check_resume_config
from paretoq_jax.run.config import RunConfig
from paretoq_jax.run.optim import make_optimizer, make_schedule
from paretoq_jax.run.state import abstract_state, init_state, state_shardings
from paretoq_jax.runtime import HeapGuard, release_free_memory

from .metrics import MetricsWriter, QuantStats
from .step import TrainStep, make_train_step

__all__ = [
    "train",
    "NonFiniteLossError",
    "make_step_for",
    "build_trainer",
]


# Fault-injection hook for the kill/resume tests (set by the test, never by a config): called
# with the step number after every step, e.g. to slow a tiny run so that a signal lands
# between two checkpoints.
_after_step_hook: Callable[[int], None] | None = None


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


class _Stop:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
            raise ValueError("train.distill / train.distill_layers need the teacher model")
        t_graphdef, _, t_rest = nnx.split(teacher, nnx.Param, ...)
        teacher_args = dict(
            teacher_graphdef=t_graphdef,
            teacher_rest=t_rest,
            teacher_shardings=param_shardings(teacher, mesh),
        )
    step_fn = make_train_step(
        graphdef, rest, tx, mesh, shardings, grad_accum=tcfg.grad_accum,
        distill=tcfg.distill, layer_weight=tcfg.distill_layers, **teacher_args,
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


def train(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns ``{"step", "loss", "run_dir", "resumed_from",
    "interrupted", ...}``. ``interrupted`` is the signal number when SIGINT / SIGTERM stopped
    the run early (after saving its step), else None.

    Raises ``NonFiniteLossError`` when the loss or gradient norm becomes non-finite (nothing is
    saved for that step; earlier checkpoints stay intact).
    """
    run_dir = Path(cfg.run_dir)
    is_main = jax.process_index() == 0
    if is_main:
        check_run_dir(run_dir)  # never trains into a folder of other files or inside a run
    changed = check_resume_config(cfg, run_dir)  # refuses a state-changing resume: no write
    if is_main:
        if changed:
            print(f"[train] resuming {run_dir} with config changes: {'; '.join(changed)}")
        run_dir.mkdir(parents=True, exist_ok=True)
        once = dataclasses.replace(cfg.train, allow_config_change=False)  # never sticky
        save_config(dataclasses.replace(cfg, train=once), run_dir / "config.yaml")

    mesh = build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    train_blocks, val_blocks = build_splits(cfg.data, tokenizer)
    tcfg = cfg.train
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if tcfg.batch_size % (n_batch_shards * tcfg.grad_accum):
        raise ValueError(
            f"train.batch_size={tcfg.batch_size} must be divisible by mesh.data x mesh.fsdp x "
            f"train.grad_accum = {n_batch_shards} x {tcfg.grad_accum}"
        )

    model = build_model(cfg, mesh)
    code_gather.configure(model, mesh, cfg.mesh.gather_codes)  # `on` fails if nothing gathers
    state, step_fn, teacher_params = build_trainer(cfg, mesh, model)
    shardings = step_fn.state_shardings
    schedule = make_schedule(tcfg)

    total, on_dev = tree_bytes({"params": state["params"], "opt": state["opt_state"]})
    memory = {"state_bytes_total": total, "state_bytes_device0": on_dev}
    if is_main:
        print(f"[train] params + optimizer state: {total / 2**20:.1f} MiB in all, "
              f"{on_dev / 2**20:.1f} MiB on device 0 (mesh {dict(mesh.shape)})")  # fmt: skip
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

    it = BatchIterator(
        train_blocks,
        tcfg.batch_size,
        seed=tcfg.seed,
        shuffle=cfg.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        state=data_state,
    )
    if isinstance(train_blocks, PreparedBlocks):  # chunk reads run ahead on a thread
        it = Prefetcher(it)
    quant_stats = QuantStats(model) if tcfg.quant_stats_every > 0 else None
    writer = MetricsWriter(
        run_dir, total_steps=tcfg.steps, start_step=start, enabled=is_main,
        progress=progress, tensorboard=tcfg.tensorboard,
    )  # fmt: skip
    if start:
        writer.message(f"[train] resumed from step {start} in {run_dir / 'checkpoints'}")

    def evaluate(params) -> dict[str, float]:
        """Validation loss and perplexity over all validation blocks (the one measure shared
        with sweeps and ``eval``: ``eval.perplexity.validation_perplexity``)."""
        if not eval_on:
            return {}
        row = validation_perplexity(
            nnx.merge(graphdef, params, rest), val_blocks, batch_size=tcfg.batch_size, mesh=mesh
        )
        return {"val_loss": row["val_loss"], "val_ppl": row["val_ppl"]}

    eval_on = bool(tcfg.eval_every and len(val_blocks))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def save(step: int) -> None:
        meta = {"step": step, "data": it.state.to_dict(), "config": to_dict(cfg)}
        ckpt.save(step, state, meta)

    tokens_per_step = tcfg.batch_size * cfg.data.train_len
    loss = float("nan")
    step = start
    heap_guard = HeapGuard()
    interrupted: int | None = None
    t_start = time.perf_counter()
    try:
        with _Stop() as stop:
            t_last = time.perf_counter()
            while step < tcfg.steps:
                batch = {"tokens": _global_batch(it.next(), step_fn.batch_sharding)}
                extra = (teacher_params,) if tcfg.uses_teacher else ()
                state, metrics = step_fn(state, batch, *extra)
                metrics = jax.device_get(metrics)
                step += 1
                now = time.perf_counter()
                step_time, t_last = now - t_last, now
                loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    last = ckpt.latest_step()
                    raise NonFiniteLossError(
                        f"non-finite loss={loss} / grad_norm={grad_norm} at step {step}; nothing "
                        f"was saved for it. The last good checkpoint is step {last} in "
                        f"{run_dir / 'checkpoints'}. Lower train.lr, raise train.warmup_steps or "
                        "set train.grad_clip, then rerun (it resumes from that checkpoint)."
                    )
                writer.advance(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / step_time:.0f}")
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    row = {
                        "step": step,
                        "loss": loss,
                        "lr": float(schedule(step - 1)),
                        "grad_norm": grad_norm,
                        "tokens_per_sec": tokens_per_step / step_time,
                        "step_time_s": step_time,
                        "tokens": step * tokens_per_step,
                        # training time over all segments of a resumed run
                        "elapsed_s": writer.resumed_elapsed_s + now - t_start,
                    }
                    if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                        row.update(evaluate(state["params"]))
                    if quant_stats is not None and (
                        step % tcfg.quant_stats_every == 0 or step == start + 1
                    ):
                        row["quant"] = quant_stats(state["params"])
                    writer.write(row)
                    t_last = time.perf_counter()  # do not charge logging to the next step
                if step % cfg.checkpoint.every == 0 or step == tcfg.steps:
                    save(step)
                if step >= start + 2 and heap_guard():  # (the first step compiles)
                    t_last = time.perf_counter()  # do not charge the trim to the next step
                if _after_step_hook is not None:
                    _after_step_hook(step)
                if stop.signum is not None:
                    if step % cfg.checkpoint.every and step != tcfg.steps:
                        save(step)
                    interrupted = stop.signum if step < tcfg.steps else None  # else: done
                    name = signal.Signals(stop.signum).name
                    writer.message(
                        f"[train] {name}: stopped and saved step {step} of {tcfg.steps} in "
                        f"{run_dir / 'checkpoints'}; rerun the same command to resume"
                    )
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
        "interrupted": interrupted,
        **memory,
    }
