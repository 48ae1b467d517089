"""Training checkpoints: Orbax ``CheckpointManager`` under ``RUN_DIR/checkpoints/<step>/``.

Each checkpoint has two items:

- ``state``: the train state pytree (float32 params, optimizer state, step, RNG), saved
  sharded; restored straight into the target shardings (each host reads only its shards).
- ``meta``: JSON with the step, the data iterator's position (``IteratorState`` as a dict)
  and the config fingerprint.

Saves are asynchronous (the device-to-host copy happens before ``save`` returns, so the state
may be donated right after); Orbax writes into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoints untouched and resumes from the last
complete one. See ``docs/training.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


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
        """Start saving ``state`` and ``meta`` at ``step`` (returns once arrays are on host)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves (with shardings) shaped like ``tree``'s arrays."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
