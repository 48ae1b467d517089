"""The from-scratch scaling study: the mixed corpus, its tokenizer, the tables and verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paretoq_jax.data import mixture
from paretoq_jax.data.config import DataError
from paretoq_jax.report.scaling import budget_block, cell_facts, frontier_block, scaling_sizes


def test_chunk_text_cuts_at_lines_and_keeps_text():
    text = "a" * 5 + "\n" + "b" * 5 + "\n" + "c" * 12 + "\nd\n"
    chunks = mixture.chunk_text(text, 8)
    assert all(len(c) <= 8 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")
    with pytest.raises(DataError):
        mixture.chunk_text("x", 0)


def _fake_docs(monkeypatch):
    docs = [
        ("wikipedia", d, c, f"t{d}", f"alpha beta {d} {c} " * 20)
        for d in range(40)
        for c in range(3)
    ]
    monkeypatch.setattr(mixture, "_chunks", lambda *a: iter(docs))
    seen = {}
    real = mixture.train_bpe

    def spy(texts, vocab_size, out_dir):
        seen["texts"] = list(texts)
        real(texts, vocab_size, out_dir)

    monkeypatch.setattr(mixture, "train_bpe", spy)
    return seen


def test_mixture_splits_trains_tokenizer_on_train_only_and_never_overwrites(tmp_path, monkeypatch):
    seen = _fake_docs(monkeypatch)
    out = tmp_path / "mix"
    m = mixture.build_mixture(out, sources=["wikipedia"], val_fraction=0.2, vocab_size=300)
    train = [json.loads(x)["text"] for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x)["text"] for x in (out / "val.jsonl").read_text().splitlines()]
    assert len(train) + len(val) == 120 and 10 <= len(val) <= 40
    assert not set(train) & set(val)
    assert seen["texts"] == train  # the tokenizer never saw a validation chunk
    assert m["chunks"] == {"train": len(train), "val": len(val)}
    from paretoq_jax.io import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    assert tok.eos_token_id == 0 and tok.bos_token_id == 1 and len(tok) == 300
    assert tok.decode(tok("alpha beta 7", add_special_tokens=False)["input_ids"]) == "alpha beta 7"
    before = (out / "train.jsonl").read_bytes()
    assert mixture.build_mixture(out, sources=["wikipedia"], val_fraction=0.2, vocab_size=300) == m
    with pytest.raises(DataError, match="other inputs"):
        mixture.build_mixture(out, sources=["wikipedia"], val_fraction=0.3, vocab_size=300)
    assert (out / "train.jsonl").read_bytes() == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(DataError, match="not an unfinished mixture"):
        mixture.build_mixture(tmp_path / "full", sources=["wikipedia"])
    assert (tmp_path / "full" / "x").read_text() == "mine"


def _row(size, start, steps, bits, ppl, seed=0, size_bits=1e6):
    path = (
        f"runs/sweeps/scaling-float/hf/scaling-{size}-step{start}"
        if start
        else f"configs/models/scaling-{size}"
    )
    return {
        "kind": "train", "status": "ok", "steps": steps, "bits": bits, "val_ppl": ppl,
        "size_bits": size_bits, "overrides": {"model.path": path}, "batch_size": 16, "seq_len": 128,
        "config": {"model": {"path": path, "bits": bits}, "train": {"seed": seed}},
    }  # fmt: skip


def test_cell_facts_reads_size_start_and_fraction():
    f = cell_facts(_row("s2", 450, 50, 2, 10.0))
    assert (f["size"], f["start"], f["fraction"], f["bits"]) == ("s2", 450, 0.9, 2.0)
    assert f["budget"] == 500 * 16 * 128
    assert cell_facts(_row("s1", 0, 500, 2, 10.0))["fraction"] == 0.0
    assert cell_facts({"overrides": {"model.path": "asset:smollm2-135m"}}) is None


def test_budget_verdicts_follow_the_numbers():
    rows = [
        _row("s1", 0, 500, 2, 30.0),
        _row("s1", 250, 250, 2, 25.0),
        _row("s1", 450, 50, 2, 20.0),
    ]
    rows += [_row("s1", 450, 50, 2, 21.0, seed=1)]
    rows += [_row("s1", 0, 500, 4, 15.0), _row("s1", 450, 50, 4, 18.0)]
    text = budget_block(rows)
    assert "| s1, 1,024,000 tokens, 2-bit | holds |" in text
    assert "| s1, 1,024,000 tokens, 4-bit | does not hold |" in text
    assert "20.5 ±0.5" in text and "4.9%" in text  # two seeds: mean, half spread, noise


def _s1_s2_rows() -> list[dict]:
    """4-bit and 2-bit cells of two sizes from step 450 (the frontier tests' common part)."""
    return [
        _row("s1", 450, 50, 4.0, 40.0, size_bits=2e6),
        _row("s2", 450, 50, 4.0, 20.0, size_bits=6e6),
        _row("s1", 450, 50, 2.0, 50.0, size_bits=1e6),
        _row("s2", 450, 50, 2.0, 25.0, size_bits=3e6),
    ]


def test_frontier_verdict_interpolates_in_size():
    rows = [
        *_s1_s2_rows(),
        _row("s3", 450, 50, 2.0, 15.0, size_bits=9e6),
    ]
    text = frontier_block(rows)
    # 2-bit at 2 Mbit lies between 50 and 25 (log-interpolated ~32.8) -> beats 40; at 6 Mbit ~19.4 < 20
    assert "| 2-bit beats 4-bit at equal size | holds |" in text
    assert "| 3-bit beats 4-bit at equal size | not measured |" in text
    assert "Pareto frontier" in text and "s1 2-bit (1.00 Mbit: 50)" in text


def test_frontier_leaves_out_a_larger_size_whose_float_model_is_worse():
    """A larger model whose float reference ends worse than a smaller one's (undertrained at
    the shared lr) is not a point on the scaling curve: the verdicts do not interpolate
    through it, and the section says so; its cells stay in the table."""
    rows = [
        *_s1_s2_rows(),
        _row("s3", 450, 50, 2.0, 60.0, size_bits=9e6),
        _row("s1", 450, 50, 16.0, 35.0, size_bits=4e6),
        _row("s2", 450, 50, 16.0, 18.0, size_bits=12e6),
        _row("s3", 450, 50, 16.0, 55.0, size_bits=30e6),
    ]
    groups = {("s1", 16.0): [35.0], ("s2", 16.0): [18.0], ("s3", 16.0): [55.0], ("s4", 2.0): [1]}
    kept, dropped = scaling_sizes(groups, ["s1", "s2", "s3", "s4"])
    assert kept == ["s1", "s2", "s4"] and dropped == {"s3": (55.0, "s2", 18.0)}
    text = frontier_block(rows)
    # through s3 the 2-bit curve would rise to ~47 at 6 Mbit (> 20: "partly"); without it the
    # 6 Mbit 4-bit point has no 2-bit cell above it, so only s1's comparison counts
    assert "| 2-bit beats 4-bit at equal size | holds |" in text
    assert (
        "s3 is left out of the verdicts: its float model (55) is worse than the smaller s2's (18)"
        in text
    )
    assert "| s3 | 60 [9.00] | - | 55 [30.00] |" in text  # its cells stay in the table


@pytest.mark.slow
def test_export_float_starts_writes_each_reached_checkpoint_once(tmp_path):
    """A float run's checkpoints become HF folders that load back as the same weights."""
    import jax
    import numpy as np
    from flax import nnx

    from paretoq_jax.config import load_config
    from paretoq_jax.io import load_pretrained
    from paretoq_jax.run.config import RunConfig
    from paretoq_jax.run.restore import load_run
    from paretoq_jax.scaling import export_float_starts
    from paretoq_jax.train import train

    root = Path(__file__).resolve().parent.parent

    cell = tmp_path / "sweep" / "cells" / "a"
    cfg = load_config(
        RunConfig,
        root / "configs" / "tiny.yaml",
        [f"run_dir={cell}", "model.bits=16", "train.steps=2", "checkpoint.every=1",
         "train.logging.eval_every=0", "checkpoint.async_save=false"],
    )  # fmt: skip
    train(cfg, progress=False)
    written = export_float_starts(tmp_path / "sweep", (1, 2, 5))
    assert [p.name for p in written] == ["tiny-llama-step1", "tiny-llama-step2"]
    assert export_float_starts(tmp_path / "sweep", (1, 2)) == []  # kept, not rewritten
    model, _, _, _ = load_run(cell, 1)
    back = load_pretrained(written[0], bits=16)
    a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(back, nnx.Param))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
