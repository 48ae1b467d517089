"""paretoq_jax.report: tables, ParetoQ findings and the figures, from hand-made result rows."""

import json
import math

import pytest

from paretoq_jax.report import ablation_table, build_report, findings
from paretoq_jax.report.__main__ import main
from paretoq_jax.sweep.runner import write_json_atomic, write_results


def _row(i, bits, method, kind, ppl, rel=None, codes=None, size=None):
    name = f"bits={bits:g},method={method}" + (",steps=0" if kind == "rtn" else "")
    b = math.log2(3) if bits == 1.58 else bits
    return {
        "index": i, "name": name, "kind": kind, "status": "ok", "bits": bits, "method": method,
        "overrides": {"model.bits": bits, "model.method": method}, "model_path": "m",
        "size_bits": size or 1000 * b + 16 * 100, "size_bits_stored": size or 1000 * b + 1600,
        "val_ppl": ppl, "val_loss": math.log(ppl), "tokens_seen": 0 if kind == "rtn" else 4096,
        "relative_l1": rel, "codes_changed": codes, "wall_s": 1.0, "train_wall_s": None,
        "transition": [] if kind == "rtn" else [
            {"step": 5, "relative_l1": rel / 2, "codes_changed": codes / 2},
            {"step": 10, "relative_l1": rel, "codes_changed": codes},
        ],
    }  # fmt: skip


# A sweep where every ParetoQ finding holds ...
PAPER_LIKE = [
    _row(0, 1.58, "seq", "train", 30.0, 0.45, 0.5),
    _row(1, 1.58, "lsq", "train", 35.0, 0.42, 0.5),
    _row(2, 2, "seq", "train", 25.0, 0.40, 0.4),
    _row(3, 2, "lsq", "train", 28.0, 0.41, 0.4),
    _row(4, 2, "minmax", "train", 60.0, 0.30, 0.3),
    _row(5, 3, "seq", "train", 20.0, 0.15, 0.1),
    _row(6, 3, "lsq", "train", 19.0, 0.12, 0.1),
    _row(7, 4, "seq", "train", 18.5, 0.10, 0.05),
    _row(8, 4, "lsq", "train", 18.0, 0.11, 0.05),
    _row(9, 2, "seq", "rtn", 3.2e7, 0.0, 0.0),
    _row(10, 2, "minmax", "rtn", 5e5, 0.0, 0.0),
    _row(11, 4, "lsq", "rtn", 53.0, 0.0, 0.0),
    _row(12, 1.58, "seq", "rtn", 2.4e7, 0.0, 0.0),
]


def test_findings_hold_on_paper_like_rows():
    got = {claim: verdict for claim, verdict, _ in findings(PAPER_LIKE)}
    assert set(got.values()) == {"holds"}, got


def test_findings_fail_honestly():
    rows = [dict(r) for r in PAPER_LIKE]
    rows[0]["val_ppl"] = 40.0  # 1.58-bit SEQ now loses to LSQ
    rows[4]["val_ppl"] = 20.0  # 2-bit minmax beats the learned scales
    for r in rows:
        if r["kind"] == "train" and r["bits"] <= 2:
            r["relative_l1"] = 0.05  # weights hardly move at low bits
    got = {claim.split()[0]: (verdict, ev) for claim, verdict, ev in findings(rows)}
    assert got["SEQ"][0] == "partly" and "1.58-bit SEQ 40 vs LSQ 35" in got["SEQ"][1]
    assert got["Learned"][0] == "does not hold"  # the only bit-width with minmax: 2
    assert got["Learned"][1].endswith("bit-widths not measured: 1, 1.58, 3, 4")
    assert "not measured" not in got["SEQ"][1]  # SEQ and LSQ ran at all four bit-widths
    assert got["QAT"][1].endswith("bit-widths not measured: 1")
    assert got["Weights"][0] == "does not hold"
    assert got["QAT"][0] == "holds"
    assert {v for _, v, _ in findings([])} == {"not measured"}


def test_movement_finding_checks_the_learning_rate():
    rows = [dict(r, lr=5e-4 if r["bits"] <= 2 else 2e-5) for r in PAPER_LIKE]
    for r in rows:  # 25x the lr, and only 4x the movement: per unit of lr, 4 bits moved more
        if r["kind"] == "train" and r["bits"] in (3, 4):
            r["relative_l1"] = 0.1
    got = {claim.split()[0]: (verdict, ev) for claim, verdict, ev in findings(rows)}
    verdict, ev = got["Weights"]
    assert verdict == "not shown (lr differs)", got
    assert "learning rates differ (0.0005 vs 2e-05)" in ev and "codes changed" in ev
    # one 4-bit cell at the low-bit lr: the cells at the shared lr decide, the rest is context
    rows.append(dict(_row(13, 4, "lsq", "train", 40.0, 0.39, 0.3), lr=5e-4, name="4-same-lr"))
    verdict, ev = {c.split()[0]: (v, e) for c, v, e in findings(rows)}["Weights"]
    assert verdict == "partly" and ev.startswith("at the same lr (0.0005):"), ev
    rows[-1]["relative_l1"] = 0.05  # the 4-bit weights stay close at the same lr: holds
    verdict, ev = {c.split()[0]: (v, e) for c, v, e in findings(rows)}["Weights"]
    assert verdict == "holds" and "vs 0.05 at 3-4" in ev, ev
    for r in rows:  # same lr everywhere: the raw comparison decides
        r["lr"] = 1e-4
    got = {claim.split()[0]: verdict for claim, verdict, _ in findings(rows)}
    assert got["Weights"] == "holds"


def test_ablation_table_keeps_the_best_cell():
    rows = PAPER_LIKE + [dict(_row(13, 2, "seq", "train", 22.0, 0.4, 0.4), name="lr2")]
    t = ablation_table(rows)
    assert t[(2, "seq")] == 22.0 and t[(4, "lsq")] == 18.0
    assert ablation_table(rows, "rtn")[(2, "seq")] == 3.2e7


def test_report_files_from_a_sweep_dir(tmp_path):
    for r in PAPER_LIKE:
        d = tmp_path / "cells" / r["name"]
        d.mkdir(parents=True)
        write_json_atomic(d / "result.json", r)
        if r["kind"] == "train":
            with open(d / "metrics.jsonl", "w") as f:
                for s in range(1, 11):
                    row = {"step": s, "loss": 5 - 0.1 * s * r["bits"] / 4, "tokens": 512 * s}
                    if s % 5 == 0:
                        row["quant"] = {"layers.0.mlp.up_proj": {"codes_changed": 0.01 * r["bits"]}}
                        if r["name"] == "bits=2,method=seq":  # the one cell with eval_every
                            row["val_ppl"] = 500.0 / s
                    f.write(json.dumps(row) + "\n")
    write_results(tmp_path)
    (tmp_path / "sweep.yaml").write_text(
        'name: paper-like\nanchors: {"bits=4,method=lsq,steps=0": 26.5, "bits=9": 1.0}\n'
    )
    assert main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    out = tmp_path / "rep"
    for f in ("pareto.svg", "ablation.svg", "transition.svg", "transition_over_training.svg",
              "loss_curves.svg", "val_curves.svg"):  # fmt: skip
        assert (out / f).read_bytes().startswith(b"<?xml"), f
    md = (out / "report.md").read_text()
    # the frontier of PAPER_LIKE by (size, ppl): 1.58 seq, 2 seq, 3 lsq, 4 lsq
    frontier = md.split("Cells on the frontier:")[1].split("## ")[0]
    names = [ln.split("|")[1].strip() for ln in frontier.splitlines() if ln.startswith("| bits")]
    assert names == ["bits=1.58,method=seq", "bits=2,method=seq", "bits=3,method=lsq",
                     "bits=4,method=lsq"]  # fmt: skip
    assert "| seq | 30 (2.4e+07) | 25 (3.2e+07) | 20 | 18.5 |" in md
    assert md.count("| holds |") == 4
    assert md.startswith("# Sweep report: paper-like")
    assert "| bits=4,method=lsq,steps=0 | 53 | 26.5 | 2 |" in md
    assert "| bits=9 | not run | 1 | - |" in md
    val = md.split("## Validation perplexity during training")[1].split("## ")[0]
    assert "| cell | 2,560 | 5,120 |" in val and "| bits=2,method=seq | 100 | 50 |" in val


def test_report_on_an_empty_dir_says_what_to_do(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "run `python -m paretoq_jax.sweep" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path)
