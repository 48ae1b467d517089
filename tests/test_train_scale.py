"""Scale: identical losses on 1 device and on 8 CPU devices with meshes 8x1x1, 2x2x2, 1x8x1;
with fsdp > 1 each device holds only its share of the parameters and optimizer state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from paretoq_jax.config import load_config
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 20
MESHES = [(8, 1, 1), (2, 2, 2), (1, 8, 1)]

_CHILD = """
import json, sys
from paretoq_jax.config import load_config
from paretoq_jax.train import RunConfig, train
from paretoq_jax.run.metrics import read_metrics
base, meshes = sys.argv[1], json.loads(sys.argv[2])
out = {}
for d, f, t in meshes:
    run = f"{base}/mesh{d}x{f}x{t}"
    cfg = load_config(RunConfig, sys.argv[3], sys.argv[4:] + [
        f"run_dir={run}", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"])
    s = train(cfg, progress=False)
    out[f"{d}x{f}x{t}"] = {"losses": [r["loss"] for r in read_metrics(run + "/metrics.jsonl")],
                           "total": s["state_bytes_total"], "device0": s["state_bytes_device0"]}
print("RESULT" + json.dumps(out))
"""


def _overrides(tmp_path: Path) -> list[str]:
    return [f"data.cache_dir={tmp_path / 'cache'}", f"train.steps={STEPS}",
            "checkpoint.every=1000", "train.logging.quant_stats_every=0"]  # fmt: skip


def test_losses_match_across_meshes_and_fsdp_shards_state(tmp_path):
    ref = train(
        load_config(RunConfig, TINY, [*_overrides(tmp_path), f"run_dir={tmp_path / 'one'}"]),
        progress=False,
    )
    ref_losses = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    assert len(ref_losses) == STEPS

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), json.dumps(MESHES), str(TINY),
         *_overrides(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for mesh, r in result.items():
        np.testing.assert_allclose(r["losses"], ref_losses, atol=1e-5, err_msg=mesh)
        assert r["total"] == ref["state_bytes_total"]
    # Replicated on 8x1x1; with fsdp=8 every matrix is split 8 ways (norms, scales stay whole).
    assert result["8x1x1"]["device0"] == ref["state_bytes_total"]
    assert result["1x8x1"]["device0"] < 0.15 * ref["state_bytes_total"]
    assert result["2x2x2"]["device0"] < 0.30 * ref["state_bytes_total"]
    print({m: r["device0"] for m, r in result.items()}, "of", ref["state_bytes_total"])
