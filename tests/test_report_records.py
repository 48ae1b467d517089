"""The quickstart's results record: config as run, metrics curve, software (run.records)."""

from __future__ import annotations

import json
from pathlib import Path

from paretoq_jax.config import load_config
from paretoq_jax.quickstart import record
from paretoq_jax.report.readme import quickstart_block
from paretoq_jax.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_record_has_config_curve_and_software(tmp_path):
    cfg = load_config(RunConfig, ROOT / "configs" / "quickstart.yaml", [f"run_dir={tmp_path}"])
    rows = [
        {"step": 1, "loss": 9.0, "tokens": 512, "tokens_per_sec": 80.0, "elapsed_s": 6.0},
        {"step": 2, "loss": 8.5, "tokens": 1024, "tokens_per_sec": 85.0, "elapsed_s": 12.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = json.loads(json.dumps(record(cfg, tmp_path)))  # what quickstart.json holds
    assert r["config"]["train"]["steps"] == cfg.train.steps
    assert r["config"]["model"]["path"] == "asset:smollm2-135m"
    assert [(m["step"], m["loss"]) for m in r["curve"]] == [(1, 9.0), (2, 8.5)]
    assert "tokens_per_sec" not in r["curve"][0]  # timing noise stays out of the curve
    assert {"jax", "jaxlib", "numpy", "gguf", "python", "backend", "cpu_count"} <= set(
        r["software"]
    )
    assert r["finished_at"].endswith("Z")


def _quickstart_record(cfg, tmp_path, **fields):
    """A quickstart.json record of ``cfg`` with made-up results (``fields`` override them)."""
    return record(cfg, tmp_path) | {
        "bits": 2, "method": "seq", "model": "/x/SmolLM2.gguf", "ppl_float": 26.28,
        "ppl_rtn": 1.674e7, "ppl_qat": 812.34, "train_steps": cfg.train.steps,
        "train_wall_s": 1200.0, "wall_s": 1320.0, "train_tokens_per_sec": 85.2,
        "params": 134_515_008, "bytes_bf16": 2 * 134_515_008, "bytes_packed": 144_000_000,
        "bytes_gguf": 168_000_000, "generate_tokens_per_sec": 30.25, **fields,
    }  # fmt: skip


def test_quickstart_block_is_the_record(tmp_path):
    cfg = load_config(RunConfig, ROOT / "configs" / "quickstart.yaml", [f"run_dir={tmp_path}"])
    r = _quickstart_record(cfg, tmp_path)
    text = quickstart_block(r)
    assert "| SmolLM2.gguf, 2-bit SEQ | value |" in text
    t, seq = cfg.train, cfg.data.train_len
    tokens = t.steps * t.batch_size * seq
    assert (
        f"ParetoQ QAT, {t.steps} steps of {t.batch_size}x{seq} tokens ({tokens:,} tokens), lr "
    ) in text
    assert "| **812.3** |" in text
    assert "| 26.28 |" in text and "| 1.67e7 |" in text and "134.5 M" in text
    assert f"85 tokens/s ({1200 / t.steps:.1f} s a step; 20 min of training, 22 min in all)" in text


def test_quickstart_block_shows_the_plain_qat_cell_as_committed_now(tmp_path):
    """The quickstart's record keeps a copy of the plain-QAT cell it was shown beside; a cell
    run again later (2-bit SEQ: 836.5 transcribed, 939.3 run again) must not leave the README
    quoting the old copy."""
    cfg = load_config(RunConfig, ROOT / "configs" / "quickstart.yaml", [f"run_dir={tmp_path}"])
    source = "reports/smollm2-bits/results.json, cell bits=2,method=seq"
    plain = {"val_ppl": 836.5, "tokens": 122880, "lr": 5e-4, "source": source}
    r = _quickstart_record(cfg, tmp_path, ppl_qat=355.4, plain_qat=plain)
    assert "| 836.5 |" in quickstart_block(r)  # no committed cells given: the record's copy
    cell = {"name": "bits=2,method=seq", "status": "ok", "val_ppl": 939.3, "tokens_seen": 122880,
            "lr": 5e-4}  # fmt: skip
    text = quickstart_block(r, {cell["name"]: cell})
    assert "| 939.3 |" in text and "836.5" not in text and source in text
    failed = cell | {"status": "failed"}
    assert "| 836.5 |" in quickstart_block(r, {cell["name"]: failed})
