"""paretoq_jax.sweep: grid expansion, cell names, shards, claims, skipping, and a tiny sweep."""

import csv
import json
import os
from pathlib import Path

import pytest

from paretoq_jax.sweep import cell_name, expand, load_sweep, parse_shard, select
from paretoq_jax.sweep.runner import cell_config, claim, run_cells, write_json_atomic
from paretoq_jax.sweep.spec import Cell, SweepError, matches

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _sweep(tmp_path: Path, body: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"train_config: {TINY}\n" + body)
    return p


def test_grid_expansion_with_exclude_include_set_when_rtn_float(tmp_path):
    spec = load_sweep(
        _sweep(
            tmp_path,
            """
overrides: {train.steps: 5}
grid:
  model.bits: [1, 2, 4]
  model.method: [elastic, seq]
exclude:
  - {model.method: elastic, model.bits: [2, 4]}
  - {model.method: seq, model.bits: 1}
include:
  - {model.bits: ternary, model.method: seq, train.optimizer.lr: 0.01}
set_when:
  - when: {model.bits: 4}
    set: {train.optimizer.lr: 2.0e-5}
rtn: true
float: true
""",
        )
    )
    cells = expand(spec)
    names = [c.name for c in cells]
    assert names == [
        "bits=1,method=elastic",
        "bits=2,method=seq",
        "bits=4,method=seq,lr=2e-05",
        "bits=1.58,method=seq,lr=0.01",
        "bits=1,method=elastic,steps=0",
        "bits=2,method=seq,steps=0",
        "bits=4,method=seq,steps=0",
        "bits=1.58,method=seq,steps=0",
        "bits=16,steps=0",
    ]
    kinds = [c.kind for c in cells]
    assert kinds == ["train"] * 4 + ["rtn"] * 4 + ["float"]
    # The RTN twin drops the training-only keys (lr) but keeps the quantizer.
    assert cells[6].overrides == {"model.bits": 4, "model.method": "seq", "train.steps": 0}


def test_set_when_sees_shared_overrides_and_ternary_aliases(tmp_path):
    spec = load_sweep(
        _sweep(
            tmp_path,
            """
overrides: {model.method: seq}
grid: {model.bits: ["ternary", 2]}
set_when:
  - when: {model.method: seq, model.bits: 1.58}
    set: {train.steps: 3}
""",
        )
    )
    assert [c.overrides for c in expand(spec)] == [
        {"model.bits": "ternary", "train.steps": 3},
        {"model.bits": 2},
    ]
    assert matches({"model.bits": "ternary"}, {"model.bits": [1.58, 2]})
    assert not matches({"model.bits": 3}, {"model.bits": [1.58, 2]})
    assert not matches({}, {"model.bits": 2})


def test_set_when_keeps_an_include_cells_own_keys(tmp_path):
    """A cell listed in ``include`` says what it wants: set_when fills in the keys it does not
    give (train.steps here) but does not overwrite the ones it does (train.optimizer.lr)."""
    spec = load_sweep(
        _sweep(
            tmp_path,
            """
grid: {model.bits: [2, 4]}
include:
  - {model.bits: 4, train.optimizer.lr: 5.0e-4}
set_when:
  - when: {model.bits: 4}
    set: {train.optimizer.lr: 2.0e-5, train.steps: 3}
""",
        )
    )
    assert [c.overrides for c in expand(spec)] == [
        {"model.bits": 2},
        {"model.bits": 4, "train.optimizer.lr": 2e-5, "train.steps": 3},
        {"model.bits": 4, "train.optimizer.lr": 5e-4, "train.steps": 3},
    ]


def test_cell_names_are_stable_and_safe():
    a = cell_name({"train.optimizer.lr": 5e-4, "model.method": "seq", "model.bits": 2})
    b = cell_name({"model.bits": 2.0, "train.optimizer.lr": 0.0005, "model.method": "seq"})
    assert a == b == "bits=2,method=seq,lr=0.0005"
    assert cell_name({"model.bits": "ternary"}) == cell_name({"model.bits": 1.58}) == "bits=1.58"
    p1 = cell_name({"model.path": "/a/b/model.gguf"})
    p2 = cell_name({"model.path": "/c/b/model.gguf"})
    assert p1 != p2 and "/" not in p1 and p1.startswith("model=model.gguf~")
    assert cell_name({"data.seq_len": 128, "model.bits": 3}) == "bits=3,data.seq_len=128"
    assert cell_name({"train.distill.logits": True}) == "distill=true"
    long = cell_name({f"x.k{i}": "v" * 20 for i in range(20)})
    assert len(long) <= 180 and long == cell_name({f"x.k{i}": "v" * 20 for i in range(20)})


def test_renamed_keys_keep_their_cell_names():
    """Keys moved into train.optimizer / distill / logging keep the names (= run directories)
    their cells had before the move: committed results and half-run sweeps stay addressable."""
    new = {"train.optimizer.warmup_steps": 10, "train.distill.logits": True,
           "train.optimizer.lr": 5e-4, "train.logging.eval_every": 60, "train.steps": 240,
           "train.distill.layers": 1.0, "train.optimizer.scale_lr": 5e-3}  # fmt: skip
    assert cell_name(new) == (
        "steps=240,lr=0.0005,distill=true,train.distill_layers=1,train.eval_every=60,"
        "train.scale_lr=0.005,train.warmup_steps=10"
    )
    # names of committed results (reports/smollm2-recovery) from their new-key overrides
    assert cell_name({"train.optimizer.lr": 5e-4, "train.distill.logits": True}) == (
        "lr=0.0005,distill=true"
    )


def test_sweep_with_an_old_key_names_the_new_one(tmp_path):
    for body, old, new in [
        ("grid: {train.lr: [1.0e-3]}\n", "train.lr", "train.optimizer.lr"),
        ("overrides: {train: {eval_every: 2}}\n", "train.eval_every", "train.logging.eval_every"),
        ("include: [{train.distill: true}]\n", "train.distill", "train.distill.logits"),
        ("set_when: [{when: {model.bits: 2}, set: {train.distill_layers: 1}}]\n",
         "train.distill_layers", "train.distill.layers"),
    ]:  # fmt: skip
        with pytest.raises(SweepError, match=f"'{old}' moved to '{new}'"):
            load_sweep(_sweep(tmp_path, body))


def test_sweep_eval_section_is_typed(tmp_path):
    spec = load_sweep(
        _sweep(tmp_path, "eval: {batch_size: '4', transition_every_checkpoint: no}\n")
    )
    assert spec.eval.batch_size == 4 and spec.eval.transition_every_checkpoint is False
    assert spec.eval.max_val_blocks is None and spec.eval.tasks is None
    with pytest.raises(SweepError, match=r"'eval.batch_sise'.*did you mean 'eval.batch_size'"):
        load_sweep(_sweep(tmp_path, "eval: {batch_sise: 4}\n"))
    with pytest.raises(SweepError, match="'eval.max_val_blocks' must be an integer"):
        load_sweep(_sweep(tmp_path, "eval: {max_val_blocks: many}\n"))
    empty = load_sweep(_sweep(tmp_path, "overrides:\neval:\ngrid: {model.bits: [2]}\n"))
    assert empty.overrides == {} and empty.eval.batch_size is None
    with pytest.raises(SweepError, match="'set_when\\[0\\].set' is required"):
        load_sweep(_sweep(tmp_path, "set_when: [{when: {model.bits: 2}}]\n"))


def test_shards_partition_the_grid_exactly_once():
    cells = [Cell(f"c{i}", {"i": i}) for i in range(23)]
    for n in range(1, 7):
        seen = [c.name for k in range(n) for c in select(cells, shard=(k, n))]
        assert sorted(seen) == sorted(c.name for c in cells)
        assert len(seen) == len(set(seen))
    assert select(cells, cell="5") == [cells[5]]
    assert select(cells, cell="c7") == [cells[7]]
    with pytest.raises(SweepError, match="no such cell"):
        select(cells, cell="nope")
    with pytest.raises(SweepError, match="has 23 cells"):
        select(cells, cell="23")
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(SweepError, match="K/N"):
            parse_shard(bad)


def test_bad_sweep_files_name_the_problem(tmp_path):
    with pytest.raises(SweepError, match="unknown sweep key 'grids'; did you mean 'grid'"):
        load_sweep(_sweep(tmp_path, "grids: {model.bits: [2]}\n"))
    p = tmp_path / "x.yaml"
    p.write_text("grid: {model.bits: [2]}\n")
    with pytest.raises(SweepError, match="train_config"):
        load_sweep(p)
    with pytest.raises(SweepError, match="non-empty list"):
        load_sweep(_sweep(tmp_path, "grid: {model.bits: 2}\n"))
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(SweepError, match="keep_checkpoints' must be one of"):
        load_sweep(_sweep(tmp_path, "grid: {model.bits: [2]}\nkeep_checkpoints: final\n"))


def test_prune_checkpoints_keeps_what_the_sweep_file_says(tmp_path):
    from paretoq_jax.sweep.runner import prune_checkpoints

    def fake(name):
        d = tmp_path / name / "checkpoints"
        for step in ("40", "80", "120", "160.orbax-checkpoint-tmp"):
            (d / step).mkdir(parents=True)
            (d / step / "state").write_text("x")
        return d

    for keep, left in (("all", ["120", "160.orbax-checkpoint-tmp", "40", "80"]),
                       ("last", ["120"]), ("none", None)):  # fmt: skip
        d = fake(keep)
        prune_checkpoints(d, keep)
        assert (sorted(p.name for p in d.iterdir()) if d.exists() else None) == left, keep
    prune_checkpoints(tmp_path / "absent" / "checkpoints", "last")  # a cell without checkpoints


def test_rtn_twin_drops_training_only_data_keys(tmp_path):
    body = """
grid: {model.bits: [2]}
include:
  - {model.bits: 2, train.optimizer.lr: 0.01, data.train_seq_len: 32, data.seq_len: 64}
rtn: true
"""
    names = [c.name for c in expand(load_sweep(_sweep(tmp_path, body)))]
    # the twin of the train_seq_len cell keeps data.seq_len (it sets the validation blocks) and
    # merges with nothing else; no twin evaluates with a training-only key
    assert names == [
        "bits=2",
        "bits=2,lr=0.01,data.seq_len=64,data.train_seq_len=32",
        "bits=2,steps=0",
        "bits=2,steps=0,data.seq_len=64",
    ]


def test_cell_config_applies_overrides_and_handles_rtn(tmp_path):
    spec = load_sweep(
        _sweep(tmp_path, "overrides: {train.optimizer.lr: 0.01, train.optimizer.warmup_steps: 2}\n")
    )
    cfg, steps = cell_config(
        spec, Cell("c", {"model.bits": 4, "model.method": "lsq"}), tmp_path / "r"
    )
    assert steps == 20 and cfg.train.optimizer.lr == 0.01 and cfg.model.bits == 4
    assert cfg.run_dir == str(tmp_path / "r")
    cfg, steps = cell_config(spec, Cell("c", {"train.steps": 0}), tmp_path / "r")
    assert steps == 0 and cfg.train.steps == 1 and cfg.train.optimizer.warmup_steps == 0
    with pytest.raises(ValueError, match="not defined at 1"):
        cell_config(spec, Cell("c", {"model.bits": 1, "model.method": "lsq"}), tmp_path / "r")


def test_claim_is_exclusive_and_released(tmp_path):
    with claim(tmp_path / "c") as first:
        assert first
        with claim(tmp_path / "c") as second:
            assert not second
    with claim(tmp_path / "c") as again:
        assert again


def test_run_cells_skips_finished_and_claimed_cells_and_survives_failures(tmp_path, monkeypatch):
    import paretoq_jax.sweep.runner as runner

    spec = load_sweep(_sweep(tmp_path, "grid: {model.bits: [2, 3, 4, 1.58]}\n"))
    cells = list(enumerate(expand(spec)))
    sweep_dir = tmp_path / "out"
    done_dir = sweep_dir / "cells" / cells[0][1].name
    done_dir.mkdir(parents=True)
    write_json_atomic(
        done_dir / "result.json", {"name": cells[0][1].name, "index": 0, "kind": "train"}
    )
    ran = []

    def fake_run_cell(spec, cell, index, cell_dir, *, progress):
        ran.append(cell.name)
        if cell.name == "bits=4":
            raise RuntimeError("boom")
        return {"name": cell.name, "index": index, "kind": "train", "val_ppl": 1.0, "wall_s": 0.0}

    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    with claim(sweep_dir / "cells" / "bits=3"):
        report = run_cells(spec, cells, sweep_dir)
    assert ran == ["bits=4", "bits=1.58"]
    assert report == {
        "done": ["bits=1.58"], "skipped": ["bits=2"], "busy": ["bits=3"], "failed": ["bits=4"]
    }  # fmt: skip
    assert "boom" in (sweep_dir / "cells" / "bits=4" / "error.txt").read_text()
    assert not (sweep_dir / "cells" / "bits=4" / "result.json").exists()
    rows = json.loads((sweep_dir / "results.json").read_text())
    assert [r["name"] for r in rows] == ["bits=2", "bits=1.58"]


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # ~35 s of CPU; over a minute of wall time on a busy 2-core machine
def test_tiny_sweep_end_to_end(tmp_path):
    """One 2-bit QAT cell (3 steps) and its round-to-nearest twin, then the report."""
    import math

    from paretoq_jax.report import build_report
    from paretoq_jax.sweep.__main__ import main

    sweep = _sweep(
        tmp_path,
        f"""
name: tiny-e2e
out_dir: {tmp_path / "out"}
overrides:
  train.steps: 3
  train.optimizer.lr: 0.003
  train.logging.quant_stats_every: 1
  checkpoint.every: 1
  checkpoint.keep: 5
  checkpoint.async_save: false
  data.max_val_blocks: 8
grid:
  model.bits: [2]
  model.method: [seq]
rtn: true
""",
    )
    assert main(["--config", str(sweep)]) == 0
    out = tmp_path / "out"
    rows = _read_csv(out / "results.csv")
    assert [r["name"] for r in rows] == ["bits=2,method=seq", "bits=2,method=seq,steps=0"]
    full = json.loads((out / "results.json").read_text())
    qat, rtn = full
    assert qat["tokens_seen"] == 3 * 8 * 64 and rtn["tokens_seen"] == 0
    assert qat["val_tokens"] == rtn["val_tokens"] == 8 * 63
    for r in full:
        assert math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9)
        # 92160 2-bit weights + 16 bits x (33088 float params + 1216 channel scales)
        assert r["size_bits"] == 92160 * 2 + 16 * (33088 + 1216)
    assert rtn["relative_l1"] == 0.0 and rtn["codes_changed"] == 0.0
    assert [t["step"] for t in qat["transition"]] == [1, 2, 3]
    # the committed-results record: the config as run and the metrics curve
    assert qat["config"]["train"]["steps"] == 3 and rtn["config"]["train"]["steps"] == 0
    assert [m["step"] for m in qat["curve"]] == [1, 2, 3] and rtn["curve"] == []
    assert all(math.isfinite(m["loss"]) for m in qat["curve"])
    # keep_checkpoints (default "last"): the finished cell keeps its final step only
    assert sorted(p.name for p in (out / "cells" / qat["name"] / "checkpoints").iterdir()) == ["3"]
    assert 0 < qat["transition"][0]["relative_l1"] < qat["relative_l1"]
    assert 0 < qat["codes_changed"] <= 1
    # QAT with a reasonable lr on the training distribution lowers the loss from the init
    assert qat["val_loss"] < rtn["val_loss"]
    # Rerunning skips both cells; the result files are untouched.
    stamp = os.stat(out / "cells" / qat["name"] / "result.json").st_mtime_ns
    assert main(["--config", str(sweep)]) == 0
    assert os.stat(out / "cells" / qat["name"] / "result.json").st_mtime_ns == stamp

    page = build_report(out)
    for f in ("pareto.svg", "ablation.svg", "transition.svg", "transition_over_training.svg",
              "loss_curves.svg"):  # fmt: skip
        assert (page.parent / f).stat().st_size > 1000, f
    text = page.read_text()
    assert "bits=2,method=seq" in text and "Pareto" in text


def test_cli_dry_run_lists_valid_cells_by_shard_and_kind(tmp_path, capsys):
    from paretoq_jax.sweep.__main__ import main

    sweep = _sweep(
        tmp_path,
        f"""
out_dir: {tmp_path / "out"}
grid:
  model.bits: [1, 2, 4]
  model.method: [lsq, minmax]
drop_invalid: true
rtn: true
""",
    )
    assert main(["--config", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dropped cell bits=1,method=lsq" in out and "10 of 10 cells" in out
    assert main(["--config", str(sweep), "--dry-run", "--shard", "1/3", "--kind", "rtn"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith(" ")]
    assert [(int(i), k) for i, k, _ in lines] == [(7, "rtn")]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    bad = _sweep(tmp_path, "grid: {model.bits: [1], model.method: [lsq]}\n", "bad.yaml")
    assert main(["--config", str(bad), "--out", str(tmp_path / "o2"), "--dry-run"]) == 2
