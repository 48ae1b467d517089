"""One validation perplexity for the trainer, sweeps and eval, with one overflow behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax.config import load_config
from paretoq_jax.eval.perplexity import perplexity, perplexity_from_loss, validation_perplexity
from paretoq_jax.models import Llama, LlamaConfig
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]


def test_perplexity_from_loss_overflows_to_inf_never_caps():
    assert perplexity_from_loss(2.0) == math.exp(2.0)
    assert perplexity_from_loss(709.0) == math.exp(709.0)  # still a float: not capped at 700
    assert perplexity_from_loss(710.0) == math.inf
    assert perplexity_from_loss(1e6) == math.inf
    assert math.isnan(perplexity_from_loss(float("nan")))


def test_validation_perplexity_needs_blocks():
    with pytest.raises(ValueError, match="no validation blocks"):
        validation_perplexity(None, np.zeros((0, 8), np.int32))


def test_trainer_sweep_and_eval_report_the_same_validation_perplexity(tmp_path):
    """A model whose loss overflows exp(): the trainer's val_ppl, a sweep cell's and eval's are
    all inf (the trainer used to cap the loss at 700 and report e^700), with the same loss."""
    from transformers import AutoTokenizer

    from paretoq_jax.data import build_splits
    from paretoq_jax.io import save_pretrained
    from paretoq_jax.run.restore import load_run
    from paretoq_jax.sweep.evaluate import validation_loss

    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    base = Llama(config, rngs=nnx.Rngs(3), scan_layers=False)
    base.norm.weight[...] = jnp.full_like(base.norm.weight[...], 3e4)  # logits ~1e3 nats wide
    tok = AutoTokenizer.from_pretrained(str(ROOT / "configs/models/tiny-llama"))
    save_pretrained(base, tmp_path / "loud", tokenizer=tok)
    cfg = load_config(RunConfig, ROOT / "configs/tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"model.path={tmp_path / 'loud'}", "model.init=pretrained", "train.steps=1",
        "train.optimizer.lr=1e-9", "train.logging.eval_every=1",
        "train.logging.quant_stats_every=0", "data.val_blocks=4",
    ])  # fmt: skip
    train(cfg, progress=False)
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert row["val_loss"] > 710 and float(row["val_ppl"]) == math.inf  # JSON: "inf"

    model, tokenizer, cfg, _ = load_run(tmp_path / "run")
    _, val = build_splits(cfg.data, tokenizer)
    sweep = validation_loss(model, val, cfg.train.batch_size)
    ev = perplexity(model, val, batch_size=cfg.train.batch_size)
    assert sweep["val_ppl"] == ev["perplexity"] == math.inf
    assert sweep["val_loss"] == ev["loss"] == pytest.approx(row["val_loss"], rel=1e-6)
    assert sweep["val_tokens"] == ev["tokens"] == 4 * 63
