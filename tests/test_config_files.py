"""Every shipped run config loads and validates against the RunConfig schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from paretoq_jax.config import load_config
from paretoq_jax.train import RunConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("**/*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if "sweeps" not in p.parts]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.train.steps > 0 and cfg.data.seq_len > 0


def test_paper_recipes_follow_the_paper():
    for path in RUN_CONFIGS:
        if path.parent.name != "paper":
            continue
        cfg = load_config(RunConfig, path)
        assert cfg.train.optimizer.lr == (2e-5 if cfg.model.bits <= 2 else 1e-5), path
        assert cfg.train.optimizer.schedule == "cosine" and cfg.train.optimizer.warmup_steps == 0
        assert cfg.train.optimizer.weight_decay == 0 and cfg.data.seq_len == 2048
        assert cfg.train.batch_size == 128


def test_smollm2_bit_files_set_their_bits():
    for b in ("1", "1.58", "2", "3", "4"):
        cfg = load_config(RunConfig, CONFIG_DIR / f"smollm2-135m-{b}bit.yaml")
        assert cfg.model.bits == float(b) and cfg.run_dir.endswith(f"{b}bit")
