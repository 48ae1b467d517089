"""Training from a prepared dataset: the same losses and validation scores as the in-process
corpus path, exact resume through the prefetch thread, and two jax.distributed processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from paretoq_jax.config import load_config
from paretoq_jax.data.prepare import PrepareOptions, prepare
from paretoq_jax.io import load_tokenizer
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CORPUS = ROOT / "tests" / "fixtures" / "corpus"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The tiny config's corpus and split (64-token blocks, last 16 validation), prepared."""
    out = tmp_path_factory.mktemp("prepared") / "shakespeare"
    tok = load_tokenizer(ROOT / "configs" / "models" / "tiny-llama")
    opts = PrepareOptions(seq_len=64, val_blocks=16, chunk_tokens=4096, shard_chunks=4)
    prepare(str(CORPUS), tok, out, options=opts, progress=False)
    return out


def _run(tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    cfg = load_config(RunConfig, TINY, [f"run_dir={tmp_path / name}",
                      f"data.cache_dir={tmp_path / 'cache'}", "train.logging.quant_stats_every=0",
                      "train.logging.eval_every=2", *overrides])  # fmt: skip
    train(cfg, progress=False)
    return read_metrics(tmp_path / name / "metrics.jsonl")


def test_prepared_training_matches_corpus_path(tmp_path, dataset):
    ref = _run(tmp_path, "corpus", "train.steps=2")
    got = _run(tmp_path, "prepared", "train.steps=2", f"data.path={dataset}")
    for key in ("loss", "val_loss"):
        a, b = [r.get(key) for r in ref], [r.get(key) for r in got]
        assert a == b, key  # identical batches and validation blocks: identical numbers


@pytest.mark.slow
def test_prepared_training_resumes_exactly(tmp_path, dataset):
    """Stopped after 2 steps and continued: steps 3 and 4 see exactly the batches of an
    uninterrupted run (the checkpoint stores the state of the batches consumed, not of those
    the prefetch thread had queued). A constant LR, so that the shorter first segment's
    schedule is the same."""
    args = ["train.optimizer.schedule=constant", f"data.path={dataset}"]
    whole = _run(tmp_path, "whole", "train.steps=4", *args)
    _run(tmp_path, "resumed", "train.steps=2", "checkpoint.every=2", *args)
    resumed = _run(tmp_path, "resumed", "train.steps=4", *args)
    assert [r["loss"] for r in resumed if r["step"] > 2] == [r["loss"] for r in whole[2:]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_from_prepared_data_match_one(tmp_path, dataset):
    common = [f"data.path={dataset}", "train.steps=6", "checkpoint.every=3",
              "train.logging.quant_stats_every=0", "train.logging.eval_every=3"]  # fmt: skip
    env = {**os.environ, "PORT": str(_free_port()), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["bash", "launch/local_2proc.sh", str(TINY), f"run_dir={tmp_path / 'two'}",
         "mesh.data=2", *common],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    one = _run(tmp_path, "one", "mesh.data=1", *common)
    assert len(two) == len(one) == 6
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=1e-5)
    np.testing.assert_allclose(
        [r["val_loss"] for r in two if "val_loss" in r],
        [r["val_loss"] for r in one if "val_loss" in r],
        atol=1e-5,
    )
