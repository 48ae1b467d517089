"""Running sweep cells: claim, train (in-process, through ``paretoq_jax.train.train``), evaluate,
write the done marker; and collecting the results table.

Layout of a sweep directory::

    SWEEP_DIR/sweep.yaml            the sweep file as run
    SWEEP_DIR/cells.json            every cell: index, name, overrides (the deterministic order)
    SWEEP_DIR/cells/NAME/           the cell's run directory (config.yaml, metrics.jsonl,
                                    checkpoints/ from the trainer)
    SWEEP_DIR/cells/NAME/.lock      flock held while a process works on the cell
    SWEEP_DIR/cells/NAME/result.json  the done marker and the cell's result row (atomic rename):
                                    final metrics, the config as run and the metrics curve
                                    (``paretoq_jax.run.records``)
    SWEEP_DIR/results.json / results.csv  all finished cells' rows
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from paretoq_jax.analysis import model_size
from paretoq_jax.config import from_dict, load_yaml, set_dotted, to_dict
from paretoq_jax.data import build_splits
from paretoq_jax.errors import ParetoQError
from paretoq_jax.outputs import atomic_write_text
from paretoq_jax.quant import resolve
from paretoq_jax.run.build import build_mesh, load_tokenizer
from paretoq_jax.run.config import RunConfig
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.run.records import curve_from_file, software
from paretoq_jax.train import NonFiniteLossError, train

from . import evaluate as ev
from .spec import Cell, SweepConfig

__all__ = [
    "CellInterrupted",
    "cell_config",
    "claim",
    "collect_results",
    "is_done",
    "run_cell",
    "write_json_atomic",
    "write_results",
    "write_table",
]

RESULT = "result.json"
LOCK = ".lock"
# Columns of results.csv first in this order; any other keys follow alphabetically.
CSV_FIRST = [
    "index", "name", "kind", "status", "bits", "method", "steps", "lr", "size_bits",
    "size_bits_stored", "size_mb", "val_ppl", "val_loss", "accuracy", "tokens_seen",
    "relative_l1", "codes_changed", "train_wall_s", "wall_s",
]  # fmt: skip


class CellInterrupted(ParetoQError, RuntimeError):
    """Training stopped before its last step (signal ``signum``, after saving); the cell
    resumes on the next run. ``exit_code`` is 128 + ``signum`` (SIGINT 130, SIGTERM 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` (``outputs.atomic_write_text``: never half-written)."""
    atomic_write_text(
        path, json.dumps(data, indent=1, default=_json_default, allow_nan=True) + "\n"
    )


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def is_done(cell_dir: Path) -> bool:
    return (cell_dir / RESULT).is_file()


@contextlib.contextmanager
def claim(cell_dir: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``cell_dir/.lock``; yields False if another process holds it.

    The kernel releases the lock when its holder dies, so a killed run never leaves a stale claim.
    (On network file systems flock needs working lock support, e.g. NFSv4.)
    """
    cell_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cell_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.time():.0f}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def cell_config(spec: SweepConfig, cell: Cell, run_dir: Path):
    """``(RunConfig, steps)`` of a cell: the base config, the shared then the cell's overrides,
    ``run_dir``. A cell with ``train.steps=0`` is validated with ``steps=1`` (the trainer needs at
    least one step) and ``steps`` is returned as 0: it is evaluated, not trained."""
    data = copy.deepcopy(load_yaml(spec.train_config))
    for key, value in {**spec.overrides, **cell.overrides}.items():
        set_dotted(data, key, value, replace=True)
    set_dotted(data, "run_dir", str(run_dir))
    steps = int(data.get("train", {}).get("steps", 1))
    if steps == 0:
        set_dotted(data, "train.steps", 1, replace=True)
        set_dotted(data, "train.optimizer.warmup_steps", 0, replace=True)
    return from_dict(RunConfig, data), steps


def _last_metrics(run_dir: Path) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return rows[-1] if rows else {}


def run_cell(spec: SweepConfig, cell: Cell, index: int, cell_dir: Path, *, progress: bool) -> dict:
    """Train (unless ``train.steps=0``) and evaluate one cell; returns its result row."""
    t0 = time.perf_counter()
    cfg, steps = cell_config(spec, cell, cell_dir)
    row: dict[str, Any] = {
        "index": index,
        "name": cell.name,
        "kind": cell.kind,
        "status": "ok",
        "overrides": dict(cell.overrides),
        "bits": cfg.model.bits,
        "method": _method_name(cfg),
        "model_path": str(cell.overrides.get("model.path", cfg.model.path)),
        "steps": steps,
        "lr": cfg.train.optimizer.lr if steps else None,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.train_len,
        "distill": cfg.train.distill.logits if steps else None,
        "host": socket.gethostname(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    train_wall = None
    if steps:
        t_train = time.perf_counter()
        try:
            summary = train(cfg, progress=progress)
        except NonFiniteLossError as e:
            row.update(status="diverged", error=str(e))
            summary = None
        train_wall = time.perf_counter() - t_train
        if summary is not None and summary["step"] < steps:
            signum = summary.get("interrupted") or signal.SIGTERM
            raise CellInterrupted(
                f"{cell.name}: stopped by {signal.Signals(signum).name} at step "
                f"{summary['step']} of {steps} (saved)",
                signum,
            )
        cell_dir.mkdir(parents=True, exist_ok=True)
    else:
        cell_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        saved = to_dict(cfg)
        saved["train"]["steps"] = 0  # evaluated as initialized (validated with steps=1)
        (cell_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    # the committed-results record: the config as run and the metrics curve (run.records)
    row["config"] = to_dict(cfg) if steps else saved
    row["curve"] = curve_from_file(cell_dir / "metrics.jsonl") if steps else []
    row["software"] = software()

    mesh = build_mesh(cfg)
    model = ev.build_start_model(cfg, mesh)
    size = model_size(model)
    row.update(
        size_bits=size.bits,
        size_bits_stored=size.bits_stored,
        size_mb=size.megabytes,
        quantized_weights=size.quantized_weights,
        float_params=size.float_params,
    )
    last = _last_metrics(cell_dir) if steps else {}
    row["tokens_seen"] = int(last.get("tokens", 0)) if steps else 0
    row["final_train_loss"] = last.get("loss")
    row["train_wall_s"] = train_wall
    row["train_elapsed_s"] = last.get("elapsed_s")

    if row["status"] == "ok":
        _, params, _ = nnx.split(model, nnx.Param, ...)
        start_params = nnx.to_pure_dict(params)
        start = ev.quantized_arrays(model, start_params)
        final_params = start_params
        transition = []
        if steps:
            ck_steps = ev.checkpoint_steps(cfg)
            if not ck_steps or ck_steps[-1] != steps:
                raise RuntimeError(f"{cell.name}: no checkpoint at step {steps} in {cell_dir}")
            every = spec.eval.transition_every_checkpoint
            for s in ck_steps if every else ck_steps[-1:]:
                p = ev.restore_params(cfg, model, mesh, s)
                if start:
                    m = ev.movement(start, ev.quantized_arrays(model, p))
                    transition.append(
                        {"step": s, "relative_l1": m.relative_l1, "codes_changed": m.codes_changed}
                    )
                    if s == steps:
                        row["per_kernel"] = m.per_kernel
                if s == steps:
                    final_params = p
        row["transition"] = transition
        row["relative_l1"] = (
            transition[-1]["relative_l1"] if transition else (0.0 if start else None)
        )
        row["codes_changed"] = (
            transition[-1]["codes_changed"] if transition else (0.0 if start else None)
        )
        final = ev.set_params(model, final_params)
        # Same stacked parameters and math; compiles one layer instead of all of them.
        final.scan_layers = True
        tokenizer = load_tokenizer(cfg)
        if spec.eval.max_val_blocks is not None:
            cfg.data.max_val_blocks = spec.eval.max_val_blocks
        _, val = build_splits(cfg.data, tokenizer)
        bs = spec.eval.batch_size or cfg.train.batch_size
        row.update(ev.validation_loss(final, val, bs))
        if spec.eval.tasks:
            row["accuracy"] = _zero_shot(final, tokenizer, spec.eval.tasks)
    else:
        row.update(
            val_ppl=float("nan"), val_loss=float("nan"), relative_l1=None, codes_changed=None
        )
    row["wall_s"] = time.perf_counter() - t0
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return row


def _method_name(cfg) -> str | None:
    spec = resolve(cfg.model.bits, cfg.model.method)
    return None if spec is None else spec.method


def _zero_shot(model, tokenizer, tasks: Any) -> Any:
    """Zero-shot multiple-choice accuracy through ``paretoq_jax.eval`` (owned by the eval module)."""
    try:
        from paretoq_jax.eval import zero_shot  # type: ignore[attr-defined]
    except ImportError as e:
        raise RuntimeError(
            "eval.tasks is set but paretoq_jax.eval.zero_shot is not available; remove eval.tasks "
            f"from the sweep file or update the package ({e})"
        ) from None
    paths = tasks if isinstance(tasks, list) else [tasks]
    out = {}
    for p in paths:
        res = zero_shot(model, tokenizer, p)
        out[Path(p).stem] = res["accuracy"] if isinstance(res, Mapping) else float(res)
    if len(out) > 1:
        out["mean"] = sum(out.values()) / len(out)
    return out


def run_cells(
    spec: SweepConfig, cells: list[tuple[int, Cell]], sweep_dir: Path, *, progress: bool = False
) -> dict[str, list[str]]:
    """Run the given ``(index, cell)`` pairs in order, skipping finished and claimed ones.

    Returns ``{"done": [...], "skipped": [...], "busy": [...], "failed": [...]}``. A failing
    cell is logged to ``cells/NAME/error.txt`` and the sweep goes on; an interrupted one
    (SIGINT/SIGTERM during training) stops the sweep and adds ``"interrupted": [cell name,
    signal number]``.
    """
    report: dict[str, list[str]] = {"done": [], "skipped": [], "busy": [], "failed": []}
    for index, cell in cells:
        cell_dir = sweep_dir / "cells" / cell.name
        if is_done(cell_dir):
            report["skipped"].append(cell.name)
            continue
        with claim(cell_dir) as mine:
            if not mine:
                print(f"[sweep] {cell.name}: being run by another process, skipped")
                report["busy"].append(cell.name)
                continue
            if is_done(cell_dir):  # finished by another process while we waited
                report["skipped"].append(cell.name)
                continue
            print(f"[sweep] cell {index} {cell.name} ({cell.kind})", flush=True)
            try:
                row = run_cell(spec, cell, index, cell_dir, progress=progress)
            except CellInterrupted as e:
                print(f"[sweep] {e}; rerun the same command to resume", file=sys.stderr)
                report["failed"].append(cell.name)
                report["interrupted"] = [cell.name, str(e.signum)]
                break
            except Exception:
                err = traceback.format_exc()
                (cell_dir / "error.txt").write_text(err)
                print(f"[sweep] {cell.name} FAILED:\n{err}", file=sys.stderr)
                report["failed"].append(cell.name)
                continue
            (cell_dir / "error.txt").unlink(missing_ok=True)
            write_json_atomic(cell_dir / RESULT, row)
            write_results(sweep_dir)
            prune_checkpoints(cell_dir / "checkpoints", spec.keep_checkpoints)
            ppl = row.get("val_ppl")
            print(f"[sweep] {cell.name}: val ppl {ppl:.4g}, {row['wall_s']:.1f} s", flush=True)
            report["done"].append(cell.name)
    return report


def prune_checkpoints(ckpt_dir: Path, keep: str) -> None:
    """After a cell's result is saved: keep ``"all"`` its checkpoints, the ``"last"`` step only,
    or ``"none"``. A 135M-parameter cell holds ~1.4 GB per step (weights + Adam state), so a
    sweep of twenty cells keeping three steps each fills ~85 GB; the result row does not need
    them (its transition numbers are computed before this)."""
    if keep == "all" or not ckpt_dir.is_dir():
        return
    if keep == "none":
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return
    steps = [int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    last = max(steps, default=None)
    for p in list(ckpt_dir.iterdir()):  # older steps and any unfinished (*-tmp) save
        if p.is_dir() and (not p.name.isdigit() or int(p.name) != last):
            shutil.rmtree(p, ignore_errors=True)


def collect_results(sweep_dir: Path) -> list[dict]:
    """The result rows of all finished cells, in cell order."""
    sweep_dir = Path(sweep_dir)
    rows = [json.loads(p.read_text()) for p in (sweep_dir / "cells").glob(f"*/{RESULT}")]
    order = sweep_dir / "cells.json"
    if order.is_file():  # the current expansion's order (a grid may have been edited since)
        index = {c["name"]: c["index"] for c in json.loads(order.read_text())}
        for r in rows:
            r["index"] = index.get(r["name"], r.get("index"))
    rows.sort(key=lambda r: (r.get("index") if r.get("index") is not None else 1 << 30, r["name"]))
    return rows


def _csv_value(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_results(sweep_dir: Path) -> list[dict]:
    """Rewrite ``results.json`` and ``results.csv`` from all finished cells (atomically)."""
    sweep_dir = Path(sweep_dir)
    rows = collect_results(sweep_dir)
    write_json_atomic(sweep_dir / "results.json", rows)
    write_table(sweep_dir, rows)
    return rows


def write_table(folder: Path, rows: list[dict]) -> None:
    """``folder/results.csv``: the rows' scalar columns (:data:`CSV_FIRST` first), atomically."""
    skip = {"per_kernel", "transition", "config", "curve", "software"}  # long: in results.json only
    override_cols = sorted({k for r in rows for k in r.get("overrides", {})})
    keys = {k for r in rows for k in r if k not in skip and k != "overrides"}
    cols = [c for c in CSV_FIRST if c in keys] + sorted(keys - set(CSV_FIRST))
    cols += [f"override:{k}" for k in override_cols]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        o = r.get("overrides", {})
        w.writerow(
            [
                _csv_value(o.get(c[9:])) if c.startswith("override:") else _csv_value(r.get(c))
                for c in cols
            ]
        )
    atomic_write_text(Path(folder) / "results.csv", buf.getvalue())
