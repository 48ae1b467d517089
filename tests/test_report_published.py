"""The committed reports and the README's result tables are what the committed results make.

Every folder under ``reports/`` regenerates byte for byte from its ``results.json`` and
``sweep.yaml`` (figures too, when the installed matplotlib wrote them), and every generated
block of README.md equals what ``python -m paretoq_jax.report --readme`` makes."""

from __future__ import annotations

import json
import shutil

import matplotlib
import pytest

from paretoq_jax.report.__main__ import main
from paretoq_jax.report.published import REPORTS_DIR, check_report, figure_version, report_dirs
from paretoq_jax.report.readme import BLOCK, README, blocks, update_readme
from paretoq_jax.run.records import curve_of

COMMITTED = report_dirs()


def test_there_are_committed_reports():
    names = {d.name for d in COMMITTED}
    assert {"tiny", "smollm2-bits", "smollm2-recovery"} <= names, names
    assert all(d.parent == REPORTS_DIR for d in COMMITTED)


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda d: d.name)
def test_committed_report_regenerates_byte_for_byte(folder):
    problems, notes = check_report(folder)
    assert not problems, "\n".join(problems) + "\nrun: python -m paretoq_jax.report"
    svgs = sorted(folder.glob("*.svg"))
    assert svgs and "![" in (folder / "report.md").read_text()
    assert not any(b"<dc:date>" in p.read_bytes() for p in svgs)  # no save date in the figures
    if any(figure_version(p.read_bytes()) != matplotlib.__version__ for p in svgs):
        pytest.skip(f"figures written by another matplotlib: {notes}")  # report.md was compared


def test_every_row_has_config_and_curve_or_says_where_it_came_from():
    for folder in COMMITTED:
        for r in json.loads((folder / "results.json").read_text()):
            assert isinstance(r.get("config"), dict), (folder.name, r["name"])
            if r.get("provenance"):
                assert r["provenance"]["source"] and r["provenance"]["missing"]
            elif r["kind"] == "train":
                assert r["curve"] and all("loss" in m for m in r["curve"]), r["name"]


def test_readme_tables_are_generated_from_the_committed_results():
    made = blocks()
    marked = [m.group("name") for m in BLOCK.finditer(README.read_text())]
    assert sorted(marked) == sorted(made), (marked, sorted(made))
    assert update_readme(README, check=True) == [], "run: python -m paretoq_jax.report --readme"


def test_a_changed_result_is_caught(tmp_path):
    src = next(d for d in COMMITTED if d.name == "tiny")
    folder = tmp_path / "tiny"
    shutil.copytree(src, folder)
    rows = json.loads((folder / "results.json").read_text())
    rows[0]["val_ppl"] *= 1.5
    (folder / "results.json").write_text(json.dumps(rows, indent=2))  # not the canonical form
    (folder / "old.png").write_bytes(b"x")
    problems, _ = check_report(folder)
    text = "\n".join(problems)
    assert "report.md: differs" in text and "results.json: differs" in text
    assert "old.png: not generated" in text
    assert main([str(folder), "--check"]) == 1
    assert main([str(folder)]) == 0  # regenerated in place (a report folder: out = itself)
    (folder / "old.png").unlink()
    assert check_report(folder) == ([], [])


def test_readme_blocks_are_rewritten_and_checked(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- BEGIN generated:x (note) -->\nold\n<!-- END generated:x -->\ntail\n"
    )
    assert update_readme(readme, check=True, make=lambda: {"x": "new"}) == ["x"]
    assert "old" in readme.read_text()
    assert update_readme(readme, make=lambda: {"x": "new"}) == ["x"]
    assert readme.read_text() == (
        "intro\n<!-- BEGIN generated:x (note) -->\nnew\n<!-- END generated:x -->\ntail\n"
    )
    assert update_readme(readme, check=True, make=lambda: {"x": "new"}) == []
    with pytest.raises(FileNotFoundError, match="generated:x"):
        update_readme(readme, make=lambda: {})


def test_curve_keeps_the_metrics_and_the_mean_code_flips():
    rows = [
        {"step": 1, "loss": 3.0, "tokens": 8, "tokens_per_sec": 9.0, "elapsed_s": 1.0},
        {"step": 2, "loss": 2.5, "tokens": 16, "val_ppl": 20.0, "quant": {
            "a": {"codes_changed": 0.1}, "b": {"codes_changed": 0.3}, "c": {"codes_changed": None}
        }},
    ]  # fmt: skip
    assert curve_of(rows) == [
        {"step": 1, "tokens": 8, "loss": 3.0, "elapsed_s": 1.0},
        {
            "step": 2,
            "tokens": 16,
            "loss": 2.5,
            "val_ppl": 20.0,
            "codes_changed": pytest.approx(0.2),
        },
    ]
