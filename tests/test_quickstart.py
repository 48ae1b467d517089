"""The README's main job, end to end on a tiny pretrained checkpoint (same code path as SmolLM2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flax import nnx

from paretoq_jax.config import load_config
from paretoq_jax.io import load_tokenizer, save_pretrained
from paretoq_jax.models import Llama, LlamaConfig
from paretoq_jax.quickstart import default_config_path, plain_qat_reference, run, table
from paretoq_jax.run.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_is_the_smollm2_recipe():
    cfg = load_config(RunConfig, default_config_path(), [])
    assert cfg.model.path == "asset:smollm2-135m" and cfg.model.bits == 2
    assert cfg.data.path == "default" and cfg.data.seq_len == 256
    # the best recipe per token of reports/smollm2-recovery, with plain QAT shown beside it
    assert cfg.model.scale_init == "mse" and cfg.train.distill.logits
    ref = plain_qat_reference(cfg)
    assert ref is not None and ref["tokens"] == 122880 and ref["val_ppl"] > 500
    assert "plain QAT" in table(_fake_results(ref))


def _fake_results(ref):
    return {
        "model": "m.gguf", "bits": 2, "method": "seq", "ppl_float": 26.3, "ppl_rtn": 1.6e7,
        "ppl_qat": 140.0, "train_steps": 200, "recipe": "mse scale init", "plain_qat": ref,
        "params": 1e8, "bytes_bf16": 1, "bytes_packed": 1, "bytes_gguf": 1,
        "train_tokens_per_sec": 1.0, "generate_tokens_per_sec": 1.0, "wall_s": 60,
        "prompt": "p", "sample": "s",
    }  # fmt: skip


def test_quickstart_end_to_end(tmp_path):
    tiny = ROOT / "configs" / "models" / "tiny-llama"
    model = Llama(LlamaConfig.from_json(tiny), rngs=nnx.Rngs(0))
    save_pretrained(model, tmp_path / "hf", tokenizer=load_tokenizer(tiny))
    cfg = load_config(
        RunConfig,
        ROOT / "configs" / "tiny.yaml",
        [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'hf'}", "model.init=pretrained",
         "train.steps=8", "train.logging.eval_every=0", "checkpoint.every=4"],
    )  # fmt: skip
    r = run(cfg, prompt="To be", max_new_tokens=4, eval_batch=8, progress=False)
    for key in ("ppl_float", "ppl_rtn", "ppl_qat"):
        assert math.isfinite(r[key]) and r[key] > 1
    assert r["ppl_qat"] < r["ppl_rtn"]  # 8 steps of QAT already beat the untrained 2-bit model
    assert r["train_steps"] == 8 and r["train_tokens_per_sec"] > 0
    assert Path(r["gguf_file"]).is_file() and r["bytes_packed"] > 0
    saved = json.loads((tmp_path / "run" / "quickstart.json").read_text())
    assert saved["ppl_qat"] == pytest.approx(r["ppl_qat"])


def test_quickstart_rejects_random_init(tmp_path):
    cfg = load_config(RunConfig, ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="model.init=pretrained"):
        run(cfg, prompt="x", max_new_tokens=1, eval_batch=1, progress=False)
