"""Faults: SIGKILL + resume reproduces an uninterrupted run exactly; SIGTERM saves and exits."""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import paretoq_jax.run.checkpoint as ck
from paretoq_jax.config import load_config
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, EVERY = 12, 4


def _overrides(run: Path, cache: Path) -> list[str]:
    return [
        f"run_dir={run}",
        f"data.cache_dir={cache}",
        f"train.steps={STEPS}",
        f"checkpoint.every={EVERY}",
        "train.logging.quant_stats_every=0",
    ]


# The CLI in a subprocess with fault hooks injected (a callback of ``train`` sleeping after every
# step, a wrapped Checkpointer.save), then ``main(argv)``.
_LAUNCH = """
import functools, os, signal, sys, time
import paretoq_jax.run.checkpoint as ck
import paretoq_jax.train.__main__ as cli
sleep_s, kill_at, kill_delay = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
if sleep_s:
    cli.train = functools.partial(cli.train, callbacks=[lambda end: time.sleep(sleep_s)])
if kill_at:
    save = ck.Checkpointer.save
    def killing_save(self, step, state, meta):
        save(self, step, state, meta)  # returns with the async write in flight
        if step == kill_at:
            time.sleep(kill_delay)
            os.kill(os.getpid(), signal.SIGKILL)
    ck.Checkpointer.save = killing_save
sys.exit(cli.main(sys.argv[4:]))
"""


def _start(
    run: Path, cache: Path, *, sleep_s: float = 0.5, kill_at: int = 0, kill_delay: float = 0.0
) -> subprocess.Popen:
    """The CLI in a subprocess; ``sleep_s`` after every step so a signal lands between
    checkpoints; ``kill_at``: SIGKILL itself ``kill_delay`` s after starting that async save."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    hooks = [str(sleep_s), str(kill_at), str(kill_delay)]
    cmd = [sys.executable, "-c", _LAUNCH, *hooks, "--config", str(TINY), "--no-progress"]
    return subprocess.Popen(
        cmd + _overrides(run, cache), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, step: int, timeout: float = 300):
    t0 = time.time()
    while not (run / "checkpoints" / str(step)).is_dir():  # Orbax renames it in when complete
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {step}:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no checkpoint {step} after {timeout}s")
        time.sleep(0.05)


def _final_params(run: Path) -> dict:
    restored = ocp.StandardCheckpointer().restore(run / "checkpoints" / str(STEPS) / "state")
    return jax.device_get(restored["params"])


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run (and its token cache)."""
    tmp = tmp_path_factory.mktemp("faults")
    ref, cache = tmp / "ref", tmp / "cache"
    train(load_config(RunConfig, TINY, _overrides(ref, cache)), progress=False)
    return ref, cache


def _assert_matches_reference(run: Path, ref: Path) -> None:
    ref_losses, losses = _losses(ref), _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref_losses  # bit-identical on CPU
    jax.tree.map(np.testing.assert_array_equal, _final_params(run), _final_params(ref))


# 0 s: right after the async save started; later delays land further into the write.
@pytest.mark.parametrize(
    "delay",
    [0.0, pytest.param(0.005, marks=pytest.mark.slow), pytest.param(0.05, marks=pytest.mark.slow)],
)
def test_sigkill_during_async_save_resumes_from_previous_checkpoint(tmp_path, reference, delay):
    ref, cache = reference
    run = tmp_path / "killed"
    kill_at = 2 * EVERY
    proc = _start(run, cache, sleep_s=0.0, kill_at=kill_at, kill_delay=delay)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    if kill_at in steps:  # the write won the race: the kill landed after it, still a resume
        assert delay > 0, "the kill did not land during the save"
    else:
        assert steps == [EVERY]
    resumed = train(load_config(RunConfig, TINY, _overrides(run, cache)), progress=False)
    assert resumed["resumed_from"] in (EVERY, kill_at) and resumed["step"] == STEPS
    _assert_matches_reference(run, ref)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference):
    ref, cache = reference
    run = tmp_path / "killed"
    proc = _start(run, cache)
    _wait_for_checkpoint(proc, run, EVERY)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / str(STEPS)).exists(), "killed too late to test anything"

    out = train(load_config(RunConfig, TINY, _overrides(run, cache)), progress=False)
    assert out["resumed_from"] >= EVERY and out["step"] == STEPS
    _assert_matches_reference(run, ref)
    # elapsed_s counts on across the resume (the killed segment slept 0.5 s a step)
    elapsed = [r["elapsed_s"] for r in read_metrics(run / "metrics.jsonl")]
    assert all(b >= a for a, b in zip(elapsed, elapsed[1:], strict=False)), elapsed
    assert elapsed[-1] >= 0.5 * (out["resumed_from"] - 1)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, tmp_path / "cache")
    _wait_for_checkpoint(proc, run, EVERY)
    time.sleep(0.6)  # land between checkpoints
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out  # saved, but not finished: 143
    assert "saved step" in out
    last = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    rows = read_metrics(run / "metrics.jsonl")
    assert last == rows[-1]["step"] and EVERY <= last < STEPS


def test_metrics_writer_elapsed_goes_on_after_resume(tmp_path):
    from paretoq_jax.train.metrics import MetricsWriter

    rows = [{"step": s, "loss": 1.0, "elapsed_s": 2.0 * s} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = MetricsWriter(tmp_path, total_steps=10, start_step=5, progress=False)
    w.close()
    assert w.resumed_elapsed_s == 10.0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    (tmp_path / "new").mkdir()
    fresh = MetricsWriter(tmp_path / "new", total_steps=10, start_step=0, progress=False)
    fresh.close()
    assert fresh.resumed_elapsed_s == 0.0


def test_full_disk_is_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    """A checkpoint that does not fit: CheckpointSaveError before writing, earlier ones intact."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    cfg = load_config(RunConfig, TINY, _overrides(run, cache)[:3] + [
        "checkpoint.every=2", "train.logging.quant_stats_every=0",
        "checkpoint.async_save=false"])  # fmt: skip
    cfg.train.steps = 6
    real = ck.shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")
    calls = []

    def fake(path):  # room for the first checkpoint only
        calls.append(path)
        u = real(path)
        return usage(u.total, u.used, u.free if len(calls) == 1 else 1000)

    monkeypatch.setattr(ck.shutil, "disk_usage", fake)
    with pytest.raises(ck.CheckpointSaveError, match=r"step 4 .*not enough disk space.*step 2\)"):
        train(cfg, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    monkeypatch.setattr(ck.shutil, "disk_usage", real)
    assert train(cfg, progress=False)["step"] == 6  # a rerun completes (resume: the SIGKILL test)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-1] == 6

    # a write that fails for want of space (the check passed, the disk filled meanwhile)
    c = ck.Checkpointer(tmp_path / "c", keep=2, async_save=False)
    state = {"w": np.ones((4, 4), np.float32)}
    c.save(1, state, {"step": 1})

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(c._manager, "save", enospc)
    with pytest.raises(ck.CheckpointSaveError, match="last complete checkpoint \\(step 1\\)"):
        c.save(2, state, {"step": 2})
    monkeypatch.undo()
    assert c.all_steps() == [1]
    c.close()


def test_async_save_timeout_is_a_clear_error(tmp_path, monkeypatch):
    """An asynchronous save whose commit outlives Orbax's wall-clock budget (seen after a
    sweep was suspended with SIGSTOP for 30 min: a raw TimeoutError traceback) surfaces as
    CheckpointSaveError naming the intact checkpoint and the rerun."""
    c = ck.Checkpointer(tmp_path / "c", keep=2, async_save=False)
    state = {"w": np.ones((4, 4), np.float32)}
    c.save(1, state, {"step": 1})

    def late():
        try:
            raise TimeoutError("ChainedFuture completed 3/4 futures but timed out after 2151 s")
        except TimeoutError as e:
            raise RuntimeError("Save Finalize thread failed") from e

    monkeypatch.setattr(c._manager, "wait_until_finished", late)
    with pytest.raises(ck.CheckpointSaveError, match=r"did not finish writing in time.*step 1\)"):
        c.save(2, state, {"step": 2})
    monkeypatch.undo()
    assert c.all_steps() == [1]
    c.close()
