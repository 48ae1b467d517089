"""Two identical short training runs give identical losses: one in this process, one through the
CLI in a fresh process (no shared compilation cache or state), bit for bit on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from paretoq_jax.config import load_config
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _overrides(run: Path, cache: Path) -> list[str]:
    return [
        f"run_dir={run}", f"data.cache_dir={cache}", "train.steps=4", "train.logging.eval_every=2",
        "train.logging.quant_stats_every=2", "checkpoint.every=4",
    ]  # fmt: skip


def _curve(run: Path) -> list[tuple]:
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "val_loss")
    return [tuple(r.get(k) for k in keys) for r in read_metrics(run / "metrics.jsonl")]


def test_two_identical_runs_give_identical_losses(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    train(load_config(RunConfig, TINY, _overrides(a, cache)), progress=False)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "paretoq_jax.train", "--config", str(TINY), "--no-progress"]
    proc = subprocess.run(
        cmd + _overrides(b, cache), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ca, cb = _curve(a), _curve(b)
    assert [r[0] for r in ca] == list(range(1, 5))
    assert any(r[-1] is not None for r in ca)  # the validation loss is compared too
    assert ca == cb
