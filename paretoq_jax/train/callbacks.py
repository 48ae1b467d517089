"""What the training loop does after each step besides stepping: named callbacks.

A callback is called with the :class:`StepEnd` of every step, in the order ``train`` lists them:
the metrics row (``log_row``), validation (``evaluation``), quantization statistics
(``quant_statistics``), writing the row (``write_row``), checkpoints (``checkpointing``), the
heap guard (``heap_guard``), callbacks a caller adds (e.g. a test's fault injection), and last
SIGINT / SIGTERM (``Signals``). It returns True when it did work that is not the step's own
(logging, a heap trim), so that the loop does not charge that time to the next step.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

from flax import nnx

from paretoq_jax.eval.perplexity import validation_perplexity
from paretoq_jax.run.config import RunConfig
from paretoq_jax.runtime import HeapGuard

from .metrics import MetricsWriter, QuantStats

__all__ = [
    "StepEnd",
    "Callback",
    "log_row",
    "evaluation",
    "quant_statistics",
    "write_row",
    "checkpointing",
    "heap_guard",
    "Signals",
]


@dataclasses.dataclass
class StepEnd:
    """The end of one train step, as the callbacks see (and annotate) it."""

    step: int
    state: dict
    loss: float
    grad_norm: float
    step_time: float
    row: dict[str, Any] | None = None  # the metrics row of a logging step (callbacks add to it)
    saved: bool = False  # a checkpoint of this step was written
    stop: bool = False  # leave the loop after this step


Callback = Callable[[StepEnd], "bool | None"]


def log_row(cfg: RunConfig, schedule: Callable[[int], Any], writer: MetricsWriter) -> Callback:
    """Every ``train.logging.log_every`` steps and at the last one: the metrics row
    (``docs/training.md``)."""
    tcfg = cfg.train
    tokens_per_step = tcfg.batch_size * cfg.data.train_len
    t_start = time.perf_counter()

    def log_row(end: StepEnd) -> None:
        if end.step % tcfg.logging.log_every and end.step != tcfg.steps:
            return
        end.row = {
            "step": end.step,
            "loss": end.loss,
            "lr": float(schedule(end.step - 1)),
            "grad_norm": end.grad_norm,
            "tokens_per_sec": tokens_per_step / end.step_time,
            "step_time_s": end.step_time,
            "tokens": end.step * tokens_per_step,
            # training time over all segments of a resumed run
            "elapsed_s": writer.resumed_elapsed_s + time.perf_counter() - t_start,
        }

    return log_row


def evaluation(cfg: RunConfig, model: nnx.Module, val_blocks: Sized, mesh: Any) -> Callback:
    """On logging steps that are ``train.logging.eval_every`` steps apart (and the last): validation
    loss and perplexity over all validation blocks (``eval.perplexity.validation_perplexity``,
    the one measure shared with sweeps and ``eval``)."""
    tcfg = cfg.train
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    every = tcfg.logging.eval_every
    on = bool(every and len(val_blocks))

    def evaluation(end: StepEnd) -> None:
        due = on and (end.step % every == 0 or end.step == tcfg.steps)
        if end.row is None or not due:
            return
        model = nnx.merge(graphdef, end.state["params"], rest)
        row = validation_perplexity(model, val_blocks, batch_size=tcfg.batch_size, mesh=mesh)
        end.row.update(val_loss=row["val_loss"], val_ppl=row["val_ppl"])

    return evaluation


def quant_statistics(model: nnx.Module, every: int, start: int) -> Callback:
    """On logging steps ``every`` steps apart and the first step of this segment: ``quant``,
    the per-projection statistics of ``QuantStats`` (``every <= 0``: never)."""
    stats = QuantStats(model) if every > 0 else None

    def quant_statistics(end: StepEnd) -> None:
        if stats is None or end.row is None:
            return
        if end.step % every == 0 or end.step == start + 1:
            end.row["quant"] = stats(end.state["params"])

    return quant_statistics


def write_row(writer: MetricsWriter) -> Callback:
    """Appends the row (if this step logs one) to ``metrics.jsonl``."""

    def write_row(end: StepEnd) -> bool:
        if end.row is None:
            return False
        writer.write(end.row)
        return True

    return write_row


def checkpointing(cfg: RunConfig, save: Callable[[int], None]) -> Callback:
    """Every ``checkpoint.every`` steps and at the last one: ``save(step)``."""
    every, last = cfg.checkpoint.every, cfg.train.steps

    def checkpointing(end: StepEnd) -> None:
        if end.step % every == 0 or end.step == last:
            save(end.step)
            end.saved = True

    return checkpointing


def heap_guard(start: int) -> Callback:
    """``runtime.HeapGuard`` from the second step of a segment on (the first one compiles)."""
    guard = HeapGuard()

    def heap_guard(end: StepEnd) -> bool:
        return end.step >= start + 2 and guard()

    return heap_guard


class Signals:
    """SIGTERM / SIGINT set a flag (a second Ctrl-C stops at once); the callback then saves the
    step (unless just saved), reports and stops the loop. ``interrupted``: the signal number
    when it stopped the run before its last step, else None."""

    def __init__(
        self, cfg: RunConfig, save: Callable[[int], None], message: Callable[[str], None]
    ) -> None:
        self.cfg, self.save, self.message = cfg, save, message
        self.signum: int | None = None
        self.interrupted: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self, end: StepEnd) -> None:
        if self.signum is None:
            return
        total = self.cfg.train.steps
        if not end.saved:
            self.save(end.step)
        self.interrupted = self.signum if end.step < total else None  # else: done anyway
        self.message(
            f"[train] {signal.Signals(self.signum).name}: stopped and saved step {end.step} of "
            f"{total} in {Path(self.cfg.run_dir) / 'checkpoints'}; rerun the same command to resume"
        )
        end.stop = True
