"""Multi-host: two JAX processes on localhost (launch/local_2proc.sh, jax.distributed) reproduce
the single-process losses."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from paretoq_jax.config import load_config
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [("2", "1"), ("1", "2")], ids=["data2", "fsdp2"])
def test_two_processes_match_one(tmp_path, mesh):
    common = [f"data.cache_dir={tmp_path / 'cache'}", "train.steps=10", "checkpoint.every=5",
              "train.logging.quant_stats_every=0", f"mesh.data={mesh[0]}",
              f"mesh.fsdp={mesh[1]}"]  # fmt: skip
    env = {**os.environ, "PORT": str(_free_port())}
    proc = subprocess.run(
        ["bash", "launch/local_2proc.sh", str(TINY), f"run_dir={tmp_path / 'two'}", *common],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]

    one_cfg = [f"run_dir={tmp_path / 'one'}", *common[:-2], "mesh.data=1", "mesh.fsdp=1"]
    train(load_config(RunConfig, TINY, one_cfg), progress=False)
    one = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    assert len(two) == len(one) == 10
    np.testing.assert_allclose(two, one, atol=1e-5)
