"""Training checkpoints: Orbax ``CheckpointManager`` under ``RUN_DIR/checkpoints/<step>/``.

Each checkpoint has two items:

- ``state``: the train state pytree (float32 params, optimizer state, step, RNG), saved
  sharded; restored straight into the target shardings (each host reads only its shards).
- ``meta``: JSON with the step, the data iterator's position (``IteratorState`` as a dict)
  and the config fingerprint.

Saves are asynchronous (the device-to-host copy happens before ``save`` returns, so the state
may be donated right after); Orbax writes into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoints untouched and resumes from the last
complete one. Before each save the free space of the checkpoint folder is checked against the
state's size, so a full disk is a clear `CheckpointSaveError` before anything is written (and
a save that still fails for want of space is reported the same way). See ``docs/training.md``.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from paretoq_jax.errors import ParetoQError

__all__ = ["Checkpointer", "CheckpointSaveError"]


class CheckpointSaveError(ParetoQError, RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""

    exit_code = 4


def state_bytes(tree: Any) -> int:
    """Bytes this process writes for ``tree``: its arrays' global size over the process count."""
    total = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))
    return total // max(jax.process_count(), 1)


def _out_of_space(e: BaseException | None) -> bool:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # the cause/context chain (cycles are possible)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class Checkpointer:
    """Save / restore the train state and loop metadata, keeping the last ``keep``."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and ``meta`` at ``step`` (returns once arrays are on host).

        Raises `CheckpointSaveError` when the folder lacks the space for it (checked first) or
        the write fails for want of space; the last complete checkpoint stays as it was.
        """
        self.wait_checked()  # a failed earlier (async) save surfaces here, named as such
        need = state_bytes(state) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise self._no_space(step, need, free)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:
            if _out_of_space(e):
                raise self._no_space(step, need, shutil.disk_usage(self.directory).free) from e
            raise

    def wait_checked(self) -> None:
        """`wait`, turning an out-of-space failure of a pending save into `CheckpointSaveError`."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if _out_of_space(e):
                free = shutil.disk_usage(self.directory).free
                raise self._no_space(None, None, free) from e
            raise

    def _no_space(self, step: int | None, need: int | None, free: int) -> CheckpointSaveError:
        last = self._manager.latest_step()
        gib = 1 << 30
        what = f"{need / gib:.2f} GiB needed, " if need else ""
        at = f"step {step}" if step is not None else "a pending checkpoint"
        return CheckpointSaveError(
            f"cannot save the checkpoint at {at} in {self.directory}: not enough disk space "
            f"({what}{free / gib:.2f} GiB free). The last complete checkpoint (step {last}) is "
            "intact. Free space (lower checkpoint.keep, delete old runs, or in a sweep use "
            "keep_checkpoints: last) or point run_dir elsewhere, then rerun: training resumes "
            "from that checkpoint."
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[dict, dict]:
        """Restore ``(state, meta)``; ``abstract_state`` holds ``jax.ShapeDtypeStruct`` leaves with
        the target ``sharding`` of every array."""
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete."""
        self.wait_checked()

    def close(self) -> None:
        self.wait_checked()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves (with shardings) shaped like ``tree``'s arrays."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
