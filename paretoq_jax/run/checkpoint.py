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
a save that still fails for want of space is reported the same way).

Damage: ``meta`` also holds a checksum of the state (:func:`state_checksum`, two 32-bit sums
per part, computed on device before the save), verified on every restore, since Orbax restores
some corrupted data files without complaint. :meth:`Checkpointer.restore_latest` tries the
checkpoints newest first and resumes from the newest one that reads back intact; the damaged
newer ones are never deleted (the trainer moves them to ``checkpoints-damaged/``). A resumed run
whose config changes what the saved state means is refused (:func:`check_resume_config`).
See ``docs/checkpoints.md`` and ``docs/training.md``.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from paretoq_jax.config import from_dict, migrate, to_dict
from paretoq_jax.errors import ParetoQError

from .config import RunConfig

__all__ = [
    "Checkpointer",
    "CheckpointSaveError",
    "CheckpointRestoreError",
    "CheckpointCorruptError",
    "ResumeConfigError",
    "SAFE_TO_CHANGE",
    "check_resume_config",
    "state_checksum",
]


class CheckpointSaveError(ParetoQError, RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""

    exit_code = 4


class CheckpointRestoreError(ParetoQError, RuntimeError):
    """No checkpoint of a run could be read back; all of them are left where they are."""


class CheckpointCorruptError(CheckpointRestoreError):
    """A checkpoint read back with a state that does not match the checksum saved with it."""


class ResumeConfigError(ParetoQError, ValueError):
    """Resuming would reinterpret the saved state under a changed config (named keys)."""


def state_bytes(tree: Any) -> int:
    """Bytes this process writes for ``tree``: its arrays' global size over the process count."""
    total = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))
    return total // max(jax.process_count(), 1)


def _in_chain(e: BaseException | None, match: Callable[[BaseException], bool]) -> bool:
    """Whether ``e`` or an exception in its cause/context chain satisfies ``match``."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # cycles are possible
        if match(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _out_of_space(e: BaseException | None) -> bool:
    def full(x: BaseException) -> bool:
        return getattr(x, "errno", None) == errno.ENOSPC or "No space left on device" in str(x)

    return _in_chain(e, full)


def _timed_out(e: BaseException | None) -> bool:
    return _in_chain(e, lambda x: isinstance(x, TimeoutError))


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words, same shape (8-byte types: a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum w, sum w * (2 i + 1))`` modulo 2^32 over the words ``w`` at flat index ``i``.

    Multiplying by an odd number is a bijection modulo 2^32, so a change to any single word
    always changes the second sum. Elementwise then reduced: no resharding of sharded arrays.
    """
    w = _words(x)
    flat = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        flat = flat + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride)
        stride *= w.shape[d]
    return jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (flat * 2 + 1), dtype=jnp.uint32)


@jax.jit
def _part_sums(tree: Any) -> tuple[jax.Array, jax.Array]:
    a = b = jnp.zeros((), jnp.uint32)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        s1, s2 = _leaf_sums(leaf)
        odd = jnp.uint32(2 * i + 1)
        a, b = a + s1 * odd, b + s2 * odd
    return a, b


def state_checksum(state: dict) -> dict[str, str]:
    """``{part: 16 hex digits}`` for each top-level entry of the train state: two 32-bit sums
    of its arrays' bits (position-weighted), computed on device; identical for any sharding."""
    out = {}
    for key, part in state.items():
        a, b = jax.device_get(_part_sums(part))
        out[key] = f"{int(a):08x}{int(b):08x}"
    return out


def _reason(e: BaseException) -> str:
    """A one-line reason (TensorStore errors carry a full spec dump after the first line)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    first = first.split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {first[:300]}"


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
        meta = {**meta, "checksum": state_checksum(state)}
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
        """`wait`, turning an out-of-space failure or a timeout of a pending (async) save into
        `CheckpointSaveError`."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            if _out_of_space(e):
                free = shutil.disk_usage(self.directory).free
                raise self._no_space(None, None, free) from e
            if _timed_out(e):  # Orbax waits on a commit for a wall-clock budget (seen: 1,200 s)
                raise CheckpointSaveError(
                    f"a pending checkpoint in {self.directory} did not finish writing in time "
                    f"(Orbax: {e}). This happens when the process was suspended (Ctrl-Z, "
                    "SIGSTOP) or the disk stalled during an asynchronous save. The last complete "
                    f"checkpoint (step {self._manager.latest_step()}) is intact; rerun the same "
                    "command to resume from it (checkpoint.async_save=false saves "
                    "synchronously)."
                ) from e
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
        the target ``sharding`` of every array.

        Raises `CheckpointCorruptError` when the state read back does not match the checksum
        saved with it (checkpoints written before checksums existed are not verified), and
        Orbax's / TensorStore's errors when files are missing or unreadable.
        """
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        state, meta = out["state"], dict(out["meta"])
        saved = meta.get("checksum")
        if saved is not None:
            got = state_checksum(state)
            bad = sorted(k for k in set(saved) | set(got) if saved.get(k) != got.get(k))
            if bad:
                raise CheckpointCorruptError(
                    f"checkpoint {step} in {self.directory}: {', '.join(bad)} read back with a "
                    f"checksum other than the one saved ({got} != {saved}): its data files are "
                    "damaged"
                )
        return state, meta

    def restore_latest(
        self,
        abstract_state: Any,
        *,
        set_aside: bool = False,
        log: Callable[[str], None] | None = print,
    ) -> tuple[int, dict, dict] | None:
        """``(step, state, meta)`` of the newest checkpoint that reads back intact, or None when
        there is none at all.

        Checkpoints that cannot be read (truncated, missing or garbled files, missing metadata,
        a checksum mismatch) are reported through ``log`` and skipped, newest first. With
        ``set_aside`` (the trainer, which will write those steps again) the unreadable ones
        newer than the restored step are moved to ``<directory>-damaged/<step>-<time>/``:
        kept for inspection, never deleted. Raises `CheckpointRestoreError` when checkpoints
        exist but none can be read (all are left in place).
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # Orbax/TensorStore raise many types (some bare Exception)
                failures.append((step, _reason(e)))
                if log is not None:
                    log(
                        f"[checkpoint] step {step} in {self.directory} cannot be read "
                        f"({failures[-1][1]}); trying the one before it"
                    )
                continue
            if failures and set_aside:
                self._set_aside([s for s, _ in failures], log)
            if failures and log is not None:
                log(f"[checkpoint] resuming from step {step}, the newest intact checkpoint")
            return step, state, meta
        if failures:
            listing = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise CheckpointRestoreError(
                f"none of the checkpoints in {self.directory} can be read ({listing}). They are "
                "left in place. If the config changed what the state holds (model, bits, "
                "method, optimizer), resume with the config in RUN_DIR/config.yaml; otherwise "
                "move the checkpoints folder aside to start over, or use a new run_dir."
            )
        return None

    def _set_aside(self, steps: list[int], log: Callable[[str], None] | None) -> None:
        """Move the checkpoints of ``steps`` out of the way of new saves (never deleted)."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            dest = self.directory.with_name(self.directory.name + "-damaged")
            dest.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = dest / f"{step}-{stamp}"
                shutil.move(str(self.directory / str(step)), target)
                if log is not None:
                    log(f"[checkpoint] kept the unreadable step {step} as {target}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("paretoq_checkpoint_set_aside")
        self._manager.reload()

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


# Config keys a resumed run may change: they decide how long and how observably the run goes on,
# or where it runs, not what the saved state means. Listed in docs/checkpoints.md.
SAFE_TO_CHANGE = (
    "run_dir",
    "train.steps",
    "train.logging.log_every",
    "train.logging.eval_every",
    "train.logging.quant_stats_every",
    "train.logging.tensorboard",
    "train.allow_config_change",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "mesh.gather_codes",
    "mesh.keep_codes",
    "model.dtype",
    "model.remat",
    "model.attention",
    "data.cache_dir",
    "data.max_val_blocks",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _saved_config(path: Path) -> dict[str, Any]:
    """The saved config as flat ``{dotted key: value}``, defaults filled in where it parses."""
    raw = migrate(RunConfig, yaml.safe_load(path.read_text()) or {})
    try:
        return _flatten(to_dict(from_dict(RunConfig, raw)))
    except (ValueError, TypeError):  # written by another version: compare what it holds
        return _flatten(raw)


def check_resume_config(cfg: Any, run_dir: str | Path) -> list[str]:
    """Compare ``cfg`` with ``run_dir/config.yaml`` when the run has checkpoints to resume.

    Returns the changed keys as ``"key: old -> new"`` (all of them safe, or allowed by
    ``train.allow_config_change``). Raises `ResumeConfigError` naming every changed key not in
    `SAFE_TO_CHANGE` (bits, method, model, scale init, optimizer, data...): resuming would
    reinterpret the saved state or silently change the recipe. Nothing is written.
    """
    run = Path(run_dir)
    saved, ckpts = run / "config.yaml", run / "checkpoints"
    has_state = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    if not (has_state and saved.is_file()):
        return []
    old, new = _saved_config(saved), _flatten(to_dict(cfg))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    lines = {k: f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed}
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE]
    if unsafe and not cfg.train.allow_config_change:
        raise ResumeConfigError(
            f"{run} holds checkpoints trained with another config: "
            f"{'; '.join(lines[k] for k in unsafe)}. Resuming would reinterpret the saved "
            "state (or change the run's recipe midway). Rerun with the saved values "
            f"({saved}), use a new run_dir, or set train.allow_config_change=true to resume "
            f"anyway. Keys safe to change on resume: {', '.join(SAFE_TO_CHANGE)}."
        )
    return [lines[k] for k in changed]
