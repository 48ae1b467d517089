"""Damaged checkpoints: every kind of damage resumes from the newest intact checkpoint (losing at
most the damaged step, bit-exactly), damaged ones are kept; config changes that would
reinterpret the state are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from paretoq_jax.config import load_config
from paretoq_jax.run.checkpoint import (
    Checkpointer,
    CheckpointRestoreError,
    ResumeConfigError,
    abstract_like,
    check_resume_config,
    state_checksum,
)
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, EVERY = 6, 2


def _overrides(run: Path, cache: Path, *extra: str) -> list[str]:
    return [f"run_dir={run}", f"data.cache_dir={cache}", f"train.steps={STEPS}",
            f"checkpoint.every={EVERY}", "train.logging.quant_stats_every=0",
            "train.logging.eval_every=0",
            "checkpoint.async_save=false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run with checkpoints at steps 2, 4, 6."""
    tmp = tmp_path_factory.mktemp("ref")
    run, cache = tmp / "run", tmp / "cache"
    train(load_config(RunConfig, TINY, _overrides(run, cache)), progress=False)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [2, 4, 6]
    return run, cache


@pytest.fixture(scope="module")
def abstract(reference):
    """The trainer's abstract state (shapes, dtypes, shardings) for this config."""
    from paretoq_jax.run.build import build_mesh, build_model
    from paretoq_jax.train.loop import build_trainer

    run, cache = reference
    cfg = load_config(RunConfig, TINY, _overrides(run, cache))
    mesh = build_mesh(cfg)
    state, step_fn, _ = build_trainer(cfg, mesh, build_model(cfg, mesh))
    return abstract_like(state, step_fn.state_shardings)


def _data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: (-p.stat().st_size, p.name))


def _truncate(d: Path) -> None:
    big = _data_files(d)[0]
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)


def _garbage(d: Path) -> None:  # Orbax alone restores this one with wrong values
    big = _data_files(d)[0]
    b = bytearray(big.read_bytes())
    mid = len(b) // 2
    b[mid : mid + 16] = np.random.default_rng(0).integers(0, 256, 16, np.uint8).tobytes()
    big.write_bytes(bytes(b))


def _flip_all(d: Path) -> None:
    for p in _data_files(d):
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))


DAMAGE = {
    "truncated data file": _truncate,
    "deleted data file": lambda d: _data_files(d)[0].unlink(),
    "garbage bytes in a data file": _garbage,
    "a flipped byte in every data file": _flip_all,
    "missing meta item": lambda d: shutil.rmtree(d / "meta"),
    "garbled meta JSON": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "truncated OCDBT manifest": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"x" * 10),
    "empty state folder": lambda d: [shutil.rmtree(d / "state"), (d / "state").mkdir()],
    "missing checkpoint metadata": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "missing commit marker": lambda d: (d / "commit_success.txt").unlink(),
}


def _restore_raw(step_dir: Path) -> dict:
    return jax.device_get(ocp.StandardCheckpointer().restore(step_dir / "state"))


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_newest_intact(tmp_path, reference, abstract, how):
    run, _ = reference
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpts)
    DAMAGE[how](ckpts / str(STEPS))
    messages: list[str] = []
    ck = Checkpointer(ckpts, async_save=False)
    try:
        step, state, meta = ck.restore_latest(abstract, set_aside=True, log=messages.append)
    finally:
        ck.close()
    assert step in (STEPS, STEPS - EVERY), step  # at most the damaged step is lost
    assert meta["step"] == step and "data" in meta
    # bit-exact: the state is exactly the one saved at that step
    expected = _restore_raw(run / "checkpoints" / str(step))
    got = jax.device_get(state)
    for key in ("params", "step", "rng"):
        jax.tree.map(np.testing.assert_array_equal, got[key], expected[key])
    assert state_checksum(state) == meta["checksum"]
    if step != STEPS:  # reported, and kept (moved aside, never deleted)
        assert any(f"step {STEPS}" in m and "cannot be read" in m for m in messages), messages
        kept = list((tmp_path / "checkpoints-damaged").iterdir())
        assert len(kept) == 1 and kept[0].name.startswith(f"{STEPS}-")
        assert any(kept[0].rglob("*")) and not (ckpts / str(STEPS)).exists()


def test_no_readable_checkpoint_is_an_error_and_nothing_moves(tmp_path, reference, abstract):
    run, _ = reference
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpts)
    for s in (2, 4, 6):
        _truncate(ckpts / str(s))
    ck = Checkpointer(ckpts, async_save=False)
    with pytest.raises(CheckpointRestoreError, match=r"none of the checkpoints.*step 6.*step 2"):
        ck.restore_latest(abstract, set_aside=True, log=None)
    ck.close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6"]


def test_train_resumes_bit_exactly_past_a_damaged_checkpoint(tmp_path, reference):
    """The trainer itself: the newest checkpoint truncated, the rerun resumes from the one
    before, keeps the damaged one, and ends with the uninterrupted run's losses and weights."""
    run_ref, cache = reference
    run = tmp_path / "run"
    shutil.copytree(run_ref, run)
    _truncate(run / "checkpoints" / str(STEPS))
    out = train(load_config(RunConfig, TINY, _overrides(run, cache)), progress=False)
    assert out["resumed_from"] == STEPS - EVERY and out["step"] == STEPS
    losses = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(run_ref / "metrics.jsonl")}
    final, ref = (_restore_raw(r / "checkpoints" / str(STEPS)) for r in (run, run_ref))
    jax.tree.map(np.testing.assert_array_equal, final["params"], ref["params"])
    assert len(list((run / "checkpoints-damaged").iterdir())) == 1


def test_resume_with_state_changing_config_is_refused(tmp_path, reference):
    """model.bits/method changed: refused naming the keys, config.yaml not rewritten; safe keys
    (steps, cadence) pass; train.allow_config_change lets it through and is not sticky."""
    run_ref, cache = reference
    run = tmp_path / "run"
    shutil.copytree(run_ref, run)
    before = (run / "config.yaml").read_bytes()
    changed = load_config(RunConfig, TINY, _overrides(run, cache, "model.bits=4",
                                                      "model.method=lsq"))  # fmt: skip
    with pytest.raises(ResumeConfigError, match=r"model\.bits: 2 -> 4; model\.method: 'seq' -> "):
        train(changed, progress=False)
    assert (run / "config.yaml").read_bytes() == before
    over = ("train.steps=9", "train.logging.log_every=3", "checkpoint.keep=5",
            "model.attention=xla", "mesh.gather_codes=false")  # fmt: skip
    safe = load_config(RunConfig, TINY, _overrides(run, cache, *over))
    keys = [c.split(":")[0] for c in check_resume_config(safe, run)]
    assert keys == ["checkpoint.keep", "mesh.gather_codes", "model.attention", "run_dir",
                    "train.logging.log_every", "train.steps"]  # fmt: skip
    lr = load_config(RunConfig, TINY, _overrides(run, cache, "train.optimizer.lr=0.5"))
    with pytest.raises(ResumeConfigError, match="train.optimizer.lr: 0.001 -> 0.5"):
        check_resume_config(lr, run)
    allowed = load_config(RunConfig, TINY, _overrides(run, cache, "train.optimizer.lr=0.5",
                                                      "train.allow_config_change=true"))  # fmt: skip
    assert "train.optimizer.lr: 0.001 -> 0.5" in check_resume_config(allowed, run)
    fresh = tmp_path / "fresh"  # no checkpoints: nothing to reinterpret
    (fresh).mkdir()
    shutil.copy(run / "config.yaml", fresh / "config.yaml")
    assert check_resume_config(changed, fresh) == []


def _flat_train_keys(config_yaml: Path) -> None:
    """Rewrite a saved config.yaml as the version before the train sections wrote it."""
    data = yaml.safe_load(config_yaml.read_text())
    t = data["train"]
    opt, dist, log = t.pop("optimizer"), t.pop("distill"), t.pop("logging")
    t.update(opt, distill=dist["logits"], distill_layers=dist["layers"], **log)
    config_yaml.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_run_saved_with_the_flat_train_keys_resumes_and_loads(tmp_path, reference, capsys):
    """A run directory written before train.optimizer / distill / logging: the same config in
    the new keys resumes it (nothing reported changed); a changed lr is still refused under
    its new name; load_run (eval, export) reads it."""
    from paretoq_jax.run.load import describe_model
    from paretoq_jax.run.restore import load_run

    run_ref, cache = reference
    run = tmp_path / "run"
    shutil.copytree(run_ref, run)
    _flat_train_keys(run / "config.yaml")
    assert "optimizer" not in (run / "config.yaml").read_text()
    same = load_config(RunConfig, TINY, _overrides(run, cache))
    assert [c.split(":")[0] for c in check_resume_config(same, run)] == ["run_dir"]  # copied
    lr = load_config(RunConfig, TINY, _overrides(run, cache, "train.optimizer.lr=0.5"))
    with pytest.raises(ResumeConfigError, match="train.optimizer.lr: 0.001 -> 0.5"):
        check_resume_config(lr, run)
    _, _, cfg, step = load_run(run)
    assert step == STEPS and cfg.train.optimizer.lr == 1e-3
    info = describe_model(run)  # what eval records about it
    assert info["step"] == STEPS and info["bits"] == 2
    assert "train.lr -> train.optimizer.lr" in capsys.readouterr().err


def test_load_run_reads_the_newest_intact_checkpoint(tmp_path, reference, capsys):
    """eval / export / generate (load_run) skip a damaged newest checkpoint, leaving it."""
    from paretoq_jax.run.restore import load_run

    run_ref, _ = reference
    run = tmp_path / "run"
    shutil.copytree(run_ref, run)
    _garbage(run / "checkpoints" / str(STEPS))
    _, _, _, step = load_run(run)
    assert step == STEPS - EVERY
    assert f"step {STEPS}" in capsys.readouterr().err
    assert (run / "checkpoints" / str(STEPS)).is_dir()
