"""Never destroy what the user has: every writing command refuses to write into, over or above a
training run or its own input, ``--force`` replaces only an earlier output of the same kind,
output paths are checked before any work, and an interrupted run exits non-zero (issue 22)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paretoq_jax.config import load_config
from paretoq_jax.eval.__main__ import main as eval_main
from paretoq_jax.export.__main__ import main as export_main
from paretoq_jax.outputs import (
    MARKER,
    OutputError,
    atomic_output,
    check_output,
    check_run_dir,
    output_kind,
)
from paretoq_jax.report.__main__ import main as report_main
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CORPUS = ROOT / "tests" / "fixtures" / "corpus"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and mtime: equal snapshots = nothing touched."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-step tiny training run inside a parent folder with an unrelated sibling."""
    tmp = tmp_path_factory.mktemp("outputs")
    cfg = load_config(
        RunConfig, TINY,
        [f"run_dir={tmp / 'runs' / 'run'}", f"data.cache_dir={tmp / 'cache'}", "train.steps=2",
         "checkpoint.every=2", "train.logging.eval_every=0", "train.logging.quant_stats_every=0"],
    )  # fmt: skip
    train(cfg, progress=False)
    sibling = tmp / "runs" / "notes"
    sibling.mkdir()
    (sibling / "thesis.txt").write_text("a week of work")
    return Path(cfg.run_dir)


def _export(run: Path, out: Path, *extra: str, fmt: str = "packed") -> int:
    return export_main(["--checkpoint", str(run), "--format", fmt, "--out", str(out), *extra])


@pytest.mark.parametrize("where", ["run", "parent", "inside", "checkpoints"])
def test_export_with_force_never_deletes_the_run_or_its_siblings(run, where, capsys):
    out = {
        "run": run,
        "parent": run.parent,
        "inside": run / "export",
        "checkpoints": run / "checkpoints",
    }[where]
    before = _snapshot(run.parent)
    assert _export(run, out, "--force") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert _snapshot(run.parent) == before  # the run, its checkpoints and the sibling intact


def test_force_replaces_only_an_earlier_export_of_the_same_kind(run, tmp_path, capsys):
    out = tmp_path / "packed"
    assert _export(run, out) == 0
    assert output_kind(out) == "export-packed" and (out / MARKER).is_file()
    assert _export(run, out) == 2 and "pass --force" in capsys.readouterr().err
    assert _export(run, out, "--force") == 0  # an earlier packed export: replaced
    # an earlier packed export is not an hf export: --force does not replace it
    before = _snapshot(out)
    assert _export(run, out, "--force", fmt="hf") == 2
    assert "earlier 'export-packed' output" in capsys.readouterr().err
    assert _snapshot(out) == before
    # a folder of other files, with --force: left alone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    assert _export(run, mine, "--force") == 2
    assert "not an output of paretoq_jax" in capsys.readouterr().err
    assert (mine / "data.csv").read_text() == "1,2\n"
    # an empty folder the user made is used as is
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(run, empty) == 0 and output_kind(empty) == "export-packed"


def test_gguf_force_replaces_our_gguf_but_not_another_file(run, tmp_path, capsys):
    g = tmp_path / "model.gguf"
    assert _export(run, g, fmt="gguf") == 0 and output_kind(g) == "export-gguf"
    assert _export(run, g, "--force", fmt="gguf") == 0
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 60)  # some other (here: broken) GGUF file
    assert _export(run, other, "--force", fmt="gguf") == 2
    assert other.read_bytes() == b"GGUF" + b"\0" * 60
    capsys.readouterr()


def test_eval_out_is_checked_before_the_evaluation(run, tmp_path, capsys, monkeypatch):
    import paretoq_jax.eval as ev

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(ev, "load_model", must_not_load)
    cfg_text = (run / "config.yaml").read_text()
    base = ["--model", str(run), "--data", str(CORPUS), "--seq-len", "32", "--max-windows", "2"]
    cases = {
        run / "config.yaml": "which this command reads",
        run / "results.json": "which this command reads",
        tmp_path: "is a directory",
    }
    for out, why in cases.items():
        assert eval_main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and "Traceback" not in err
    assert (run / "config.yaml").read_text() == cfg_text
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert eval_main([*base, "--out", str(blocked / "r.json")]) == 2  # parent is a file
    assert "is a file" in capsys.readouterr().err


def test_eval_writes_marked_json_and_replaces_it_only_with_force(run, tmp_path, capsys):
    base = ["--model", str(run), "--data", str(CORPUS), "--seq-len", "32", "--max-windows", "2"]
    out = tmp_path / "res" / "eval.json"
    assert eval_main([*base, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["output_kind"] == "eval" and data["perplexity"] > 1
    assert eval_main([*base, "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert eval_main([*base, "--out", str(out), "--force"]) == 0
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert eval_main([*base, "--out", str(notes), "--force"]) == 2
    assert json.loads(notes.read_text()) == {"mine": 1}


def test_report_refuses_a_run_and_foreign_folders(run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for out in (run, run / "report", run.parent):
        before = _snapshot(run.parent)
        assert report_main([str(sweep), "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith("error: ")
        assert _snapshot(run.parent) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("x")
    assert report_main([str(sweep), "--out", str(foreign)]) == 2
    assert (foreign / "paper.tex").read_text() == "x"


def test_train_refuses_a_run_dir_full_of_other_files_or_inside_a_run(run, tmp_path):
    for run_dir, why in (
        (run.parent / "notes", "not a training run directory"),
        (run / "checkpoints" / "nested", "inside the training run directory"),
    ):
        cfg = load_config(RunConfig, TINY, [f"run_dir={run_dir}", "train.steps=1"])
        with pytest.raises(OutputError, match=why):
            train(cfg, progress=False)
    assert (run.parent / "notes" / "thesis.txt").read_text() == "a week of work"
    assert not (run / "checkpoints" / "nested").exists()
    check_run_dir(run)  # the run itself: resumable
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / ".lock").write_text("")  # a sweep's lock: still a fresh folder
    check_run_dir(tmp_path / "fresh")


def test_atomic_output_leaves_the_target_alone_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out, "export-hf", directory=True) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1" and output_kind(out) == "export-hf"
    with (
        pytest.raises(RuntimeError),
        atomic_output(out, "export-hf", directory=True, force=True) as tmp,
    ):
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("export died halfway")
    assert (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_check_output_refuses_symlinked_ways_into_a_run(run, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(OutputError, match="training run directory"):
        check_output(link / "x", "export-packed", directory=True, force=True)
    with pytest.raises(OutputError, match="which this command reads"):
        check_output(run.parent, "export-packed", directory=True, force=True, reads=[link])


_SLOW_LAUNCH = """
import functools, sys, time
import paretoq_jax.train.__main__ as cli
# so the signal lands mid-run
cli.train = functools.partial(cli.train, callbacks=[lambda end: time.sleep(0.5)])
sys.exit(cli.main(sys.argv[1:]))
"""


def _start_train(run_dir: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", _SLOW_LAUNCH, "--config", str(TINY), "--no-progress",
           f"run_dir={run_dir}", f"data.cache_dir={cache}", "train.steps=40",
           "checkpoint.every=50", "train.logging.eval_every=0",
           "train.logging.quant_stats_every=0"]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_training_saves_and_exits_128_plus_signal(tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = _start_train(run_dir, tmp_path / "cache")
    t0 = time.time()
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 300, "no training step after 300 s"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    assert "rerun the same command to resume" in out and "done:" not in out
    assert "Traceback" not in out
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) < 40


def test_planner_outputs_replace_only_their_own_kind(tmp_path):
    """``plan --hlo`` / ``plan.scale --hlo-dir`` dumps and the ``plan.scale`` page are recognised
    by their content (an HLO module header, plain or gzipped; the page's first-line marker), so a
    rerun replaces them and nothing else: before, any file at those paths was overwritten."""
    import gzip

    from paretoq_jax.outputs import TEXT_MARKER, OutputError, atomic_write_text, check_output
    from paretoq_jax.plan.core import _write_hlo
    from paretoq_jax.plan.scale import PAGE_KIND

    dump = tmp_path / "step.hlo.gz"
    _write_hlo(dump, "HloModule jit_step, entry_computation_layout={}\n")
    assert output_kind(dump) == "hlo"
    _write_hlo(dump, "HloModule jit_step_again\n")  # an earlier dump: replaced
    with gzip.open(dump, "rt") as f:
        assert f.read() == "HloModule jit_step_again\n"
    plain = tmp_path / "step.hlo"
    _write_hlo(plain, "HloModule m\n")
    assert output_kind(plain) == "hlo"
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    with pytest.raises(OutputError, match="no 'hlo' marker"):
        _write_hlo(mine, "HloModule m\n")
    assert mine.read_text() == "my notes"

    page = tmp_path / "scale.md"
    atomic_write_text(page, TEXT_MARKER.format(kind=PAGE_KIND) + "\n# page\n")
    assert check_output(page, PAGE_KIND, directory=False) == page  # regenerated without --force
    with pytest.raises(OutputError, match="no 'scale-page' marker"):
        check_output(mine, PAGE_KIND, directory=False)
