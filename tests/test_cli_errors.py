"""One error boundary for every CLI (issue 18, part 1): a table of bad inputs across ``train``,
``eval``, ``export``, ``generate``, ``sweep``, ``report`` and ``quickstart``; each must end in
``error: <message naming the problem>`` and a non-zero exit, never a traceback, and never touch
what is already saved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from paretoq_jax.cli import run_cli
from paretoq_jax.config import load_config
from paretoq_jax.data.mixture import main as mixture_main
from paretoq_jax.data.prepare import main as prepare_main
from paretoq_jax.errors import ParetoQError
from paretoq_jax.eval.__main__ import main as eval_main
from paretoq_jax.export.__main__ import main as export_main
from paretoq_jax.generate import main as generate_main
from paretoq_jax.plan.__main__ import main as plan_main
from paretoq_jax.plan.scale import main as plan_scale_main
from paretoq_jax.quickstart import main as quickstart_main
from paretoq_jax.report.__main__ import main as report_main
from paretoq_jax.scaling import main as scaling_main
from paretoq_jax.sweep.__main__ import main as sweep_main
from paretoq_jax.train import RunConfig, train
from paretoq_jax.train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_MODEL = ROOT / "configs" / "models" / "tiny-llama"
CORPUS = ROOT / "tests" / "fixtures" / "corpus"
MAINS = {
    "train": train_main,
    "eval": eval_main,
    "export": export_main,
    "generate": generate_main,
    "sweep": sweep_main,
    "report": report_main,
    "quickstart": quickstart_main,
    "prepare": prepare_main,
    "mixture": mixture_main,
    "scaling": scaling_main,
    "plan": plan_main,
    "plan.scale": plan_scale_main,
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A workspace of good and bad inputs, and one finished tiny training run."""
    d = tmp_path_factory.mktemp("cli")
    (d / "empty.txt").write_text("")
    (d / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (d / "short.txt").write_text("To be.\n")
    (d / "fake.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "broken.yaml").write_text("model: {bits: 2\n")
    (d / "bad.jsonl").write_text('{"context": "a", "choices": ["x"]}\nnot json\n')
    (d / "weightless").mkdir()
    (d / "weightless" / "config.json").write_text((TINY_MODEL / "config.json").read_text())
    (d / "foreign").mkdir()
    (d / "foreign" / "keep.txt").write_text("mine")
    (d / "emptydir").mkdir()
    (d / "emptysweep").mkdir()
    (d / "sweep_bad.yaml").write_text(
        f"train_config: {TINY}\nout_dir: {d / 'sb'}\ngrid: {{model.bitz: [2]}}\n"
    )
    (d / "sweep_ok.yaml").write_text(
        f"train_config: {TINY}\nout_dir: {d / 'sweep_out'}\ngrid:\n  model.bits: [2]\n"
    )
    (d / "afile").write_text("x")
    cfg = load_config(
        RunConfig, TINY,
        [f"run_dir={d / 'run'}", f"data.cache_dir={d / 'cache'}", "train.steps=2",
         "checkpoint.every=2", "train.logging.eval_every=0", "train.logging.quant_stats_every=0"],
    )  # fmt: skip
    train(cfg, progress=False)
    return {"d": d, "run": Path(cfg.run_dir), "cache": d / "cache"}


def _train(ws, *over: str) -> list[str]:
    d = ws["d"]
    return ["--config", str(TINY), "--no-progress", f"run_dir={d / 'newrun'}",
            f"data.cache_dir={ws['cache']}", "train.steps=1", *over]  # fmt: skip


def _eval(ws, *extra: str, model: str | None = None) -> list[str]:
    return ["--model", model or str(ws["run"]), "--seq-len", "32", *extra]


def _export(ws, *extra: str, ckpt: str | None = None) -> list[str]:
    out = str(ws["d"] / "exp")
    return ["--checkpoint", ckpt or str(ws["run"]), "--format", "packed", "--out", out, *extra]


# (cli, argv builder, substring the message must contain)
CASES: list[tuple[str, object, str]] = [
    # train: config files and overrides
    ("train", lambda w: ["--config", str(w["d"] / "nope.yaml")], "does not exist"),
    ("train", lambda w: ["--config", str(w["d"] / "list.yaml")], "mapping"),
    ("train", lambda w: ["--config", str(w["d"] / "broken.yaml")], "broken.yaml"),
    ("train", lambda w: _train(w, "train.stepz=3"), "unknown config key 'train.stepz'"),
    # outputs the planner keeps: refused over a file that is not an earlier one, before compiling
    ("plan", lambda w: ["--config", str(TINY), "--topology", "v5p:2x2x1", "--hlo",
                        str(w["d"] / "afile")], "no 'hlo' marker"),  # fmt: skip
    ("plan", lambda w: ["--config", str(TINY), "--topology", "v5p:2x2x1", "--hlo",
                        str(w["run"] / "config.yaml")], "training run directory"),  # fmt: skip
    ("plan.scale", lambda w: ["--render-only", "--out", str(w["d"] / "afile")],
     "no 'scale-page' marker"),  # fmt: skip
    ("train", lambda w: _train(w, "train.steps=abc"), "must be an integer"),
    ("train", lambda w: _train(w, "train.steps"), "key=value"),
    ("train", lambda w: _train(w, "train.optimizer.lr=-1"), "train.optimizer.lr"),
    ("train", lambda w: _train(w, "train.lr=1e-3"), "'train.lr' moved to 'train.optimizer.lr'"),
    ("train", lambda w: _train(w, "train.distill=true"), "moved to 'train.distill.logits'"),
    ("train", lambda w: _train(w, "model.bits=5"), "bits"),
    ("train", lambda w: _train(w, "model.method=foo"), "foo"),
    ("train", lambda w: _train(w, "model.scale_init=bogus"), "bogus"),
    ("train", lambda w: _train(w, "model.attention=flash"), "flash"),
    ("train", lambda w: _train(w, "model.attention=splash"), "multiples of 128"),
    # train: corpora
    ("train", lambda w: _train(w, f"data.path={w['d'] / 'missing.txt'}"), "missing.txt"),
    ("train", lambda w: _train(w, f"data.path={w['d'] / 'empty.txt'}"), "empty"),
    ("train", lambda w: _train(w, f"data.path={w['d'] / 'binary.bin'}"), "binary.bin"),
    ("train", lambda w: _train(w, f"data.path={w['d'] / 'short.txt'}"), "short.txt"),
    # train: models, mesh, run_dir
    ("train", lambda w: _train(w, "model.path=/nonexistent"), "/nonexistent"),
    ("train", lambda w: _train(w, f"model.path={w['d'] / 'fake.gguf'}"), "fake.gguf"),
    ("train", lambda w: _train(w, "model.path=asset:nope"), "asset"),
    ("train", lambda w: _train(w, "mesh.data=3"), "devices"),
    ("train", lambda w: _train(w, "train.grad_accum=3"), "divisible"),
    ("train", lambda w: _train(w, f"run_dir={w['d'] / 'foreign'}"), "not a training run"),
    ("train", lambda w: _train(w, f"run_dir={w['d'] / 'afile'}"), "not a directory"),
    ("train", lambda w: _train(w, f"run_dir={w['run'] / 'checkpoints'}"), "inside"),
    # eval
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), model="/nonexistent/run"), "nonexistent"),
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), model=str(w["d"] / "fake.gguf")), "fake.gguf"),
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), model=str(w["d"] / "weightless")), "weightless"),
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), model=str(w["d"] / "emptydir")), "emptydir"),
    ("eval", lambda w: _eval(w, "--data", str(w["d"] / "missing.txt")), "missing.txt"),
    ("eval", lambda w: _eval(w, "--data", str(w["d"] / "empty.txt")), "empty"),
    ("eval", lambda w: _eval(w, "--mc", str(w["d"] / "missing.jsonl")), "missing.jsonl"),
    ("eval", lambda w: _eval(w, "--mc", str(w["d"] / "bad.jsonl")), "bad.jsonl"),
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), "--out", str(w["d"] / "emptydir")), "is a directory"),
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), "--out", str(w["run"] / "config.yaml")), "reads"),
    ("eval", lambda w: ["--model", str(w["run"]), "--data", str(CORPUS), "--seq-len", "1"], "seq_len"),
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), "--stride", "0"), "stride"),
    ("eval", lambda w: _eval(w, "--data", str(CORPUS), "--bits", "2"), "drop --bits"),
    # export
    ("export", lambda w: _export(w, ckpt="/nonexistent/run"), "nonexistent"),
    ("export", lambda w: _export(w, ckpt=str(w["d"] / "emptydir")), "emptydir"),
    ("export", lambda w: [*_export(w)[:3], "onnx", *_export(w)[4:]], "unknown export format"),
    ("export", lambda w: [*_export(w)[:5], str(w["d"] / "foreign"), "--force"], "not an output"),
    ("export", lambda w: [*_export(w)[:5], str(w["run"]), "--force"], "reads"),
    ("export", lambda w: _export(w, "--gguf-qtype", "BAD"), "BAD"),
    ("export", lambda w: _export(w, "--step", "999"), "999"),
    # generate
    ("generate", lambda w: ["--model", "/nonexistent/run", "--prompt", "hi"], "nonexistent"),
    ("generate", lambda w: ["--model", str(w["d"] / "fake.gguf"), "--prompt", "hi"], "fake.gguf"),
    ("generate", lambda w: ["--model", str(w["run"]), "--prompt", "hi", "--top-p", "2"], "top_p"),
    # sweep
    ("sweep", lambda w: ["--config", str(w["d"] / "nope.yaml")], "nope.yaml"),
    ("sweep", lambda w: ["--config", str(w["d"] / "sweep_bad.yaml"), "--dry-run"], "bitz"),
    ("sweep", lambda w: ["--config", str(w["d"] / "sweep_ok.yaml"), "--out", str(w["run"])], "training run"),
    ("sweep", lambda w: ["--config", str(w["d"] / "sweep_ok.yaml"), "--out", str(w["d"] / "foreign")], "not an output"),
    ("sweep", lambda w: ["--config", str(w["d"] / "sweep_ok.yaml"), "--cell", "nope", "--dry-run"], "nope"),
    # report
    ("report", lambda w: [str(w["d"] / "nosweep")], "nosweep"),
    ("report", lambda w: [str(w["d"] / "emptysweep")], "no finished cells"),
    ("report", lambda w: [str(w["d"] / "emptysweep"), "--out", str(w["run"])], "training run"),
    # data.prepare
    ("prepare", lambda w: ["--data", str(w["d"] / "missing.txt"), "--tokenizer", str(TINY_MODEL), "--out", str(w["d"] / "p1")], "missing.txt"),
    ("prepare", lambda w: ["--data", str(CORPUS), "--tokenizer", str(TINY_MODEL), "--out", str(w["run"] / "data")], "run"),
    ("prepare", lambda w: ["--data", str(CORPUS), "--tokenizer", str(TINY_MODEL), "--out", str(w["d"] / "foreign")], "foreign"),
    # data.mixture, scaling (refused before any corpus is read)
    ("mixture", lambda w: ["--out", str(w["d"] / "foreign")], "not an unfinished mixture"),
    ("mixture", lambda w: ["--sources", "nope", "--out", str(w["d"] / "m1")], "unknown sources"),
    ("mixture", lambda w: ["--out", str(w["run"] / "config.yaml")], "is a file"),
    ("scaling", lambda w: ["export", str(w["d"] / "nosweep")], "has no cells"),
    ("scaling", lambda w: ["export", str(w["d"]), "--steps", "a,b"], "--steps must be"),
    # quickstart (all refused before any asset is fetched or model loaded)
    ("quickstart", lambda w: ["model.bits=16"], "quantized model"),
    ("quickstart", lambda w: ["model.nope=1"], "unknown config key"),
    ("quickstart", lambda w: [f"run_dir={w['d'] / 'foreign'}"], "not a training run"),
]  # fmt: skip


def _id(case) -> str:
    cli, _, want = case
    return f"{cli}-{want[:24]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_gives_one_clear_error_line(ws, case, capsys):
    cli, build, want = case
    run_before = {p: p.stat().st_mtime_ns for p in ws["run"].rglob("*") if p.is_file()}
    try:
        code = MAINS[cli](build(ws))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"{cli} accepted bad input: {err}"
    assert "Traceback" not in err
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
    assert "error:" in last, err
    assert want in err, f"expected {want!r} in the message, got: {err}"
    assert "unexpected error" not in err, err  # a user error, not a bug
    run_after = {p: p.stat().st_mtime_ns for p in ws["run"].rglob("*") if p.is_file()}
    assert run_after == run_before  # nothing saved was touched
    assert (ws["d"] / "foreign" / "keep.txt").read_text() == "mine"
    # a train command that fails leaves no run dir behind (config.yaml is written only once
    # the model, data and trainer it names have been built)
    assert not (ws["d"] / "newrun").exists(), sorted((ws["d"] / "newrun").rglob("*"))


def test_the_table_is_large_and_covers_every_cli():
    assert len(CASES) >= 40
    assert {c[0] for c in CASES} == set(MAINS)


def test_run_cli_exit_codes_and_debug(monkeypatch, capsys):
    class Full(ParetoQError):
        exit_code = 4

    def raiser(exc):
        def main(argv):
            raise exc

        return main

    assert run_cli(raiser(Full("disk full: free 3 GB")), []) == 4
    assert capsys.readouterr().err == "error: disk full: free 3 GB\n"
    assert run_cli(raiser(FileNotFoundError(2, "No such file", "/x/y")), []) == 2
    assert capsys.readouterr().err == "error: No such file (/x/y)\n"
    assert run_cli(raiser(KeyboardInterrupt()), []) == 130
    assert run_cli(raiser(TypeError("bug")), []) == 1
    assert "--debug" in capsys.readouterr().err
    with pytest.raises(TypeError):
        run_cli(raiser(TypeError("bug")), ["--debug"])
    monkeypatch.setenv("PARETOQ_DEBUG", "1")
    with pytest.raises(Full):
        run_cli(raiser(Full("x")), [])
    seen = []
    monkeypatch.delenv("PARETOQ_DEBUG")
    assert run_cli(lambda argv: seen.append(argv) or 0, ["a", "--debug", "b"]) == 0
    assert seen == [["a", "b"]]  # --debug is the boundary's, not the command's


def test_a_real_process_prints_one_line_and_no_traceback(ws):
    """The boundary as users meet it: ``python -m`` in a fresh process."""
    cmd = [sys.executable, "-m", "paretoq_jax.eval", "--model", str(ws["d"] / "fake.gguf"),
           "--data", str(CORPUS)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
    proc = subprocess.run([*cmd, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # --debug shows it


def test_plan_scale_bad_gpu_memory_fraction_fails_before_any_compile(tmp_path, monkeypatch, capsys):
    """A bad ``$XLA_CLIENT_MEM_FRACTION`` is one error up front, not a "cannot plan" recorded
    (after a compile) for every slice of every config."""
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "lots")
    results = tmp_path / "results"
    code = plan_scale_main([
        "--chip", "h100", "--configs", "configs/paper/llama-3-8b.yaml", "--bits", "2",
        "--results", str(results), "--out", str(tmp_path / "scale.md"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code not in (0, None) and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: $XLA_CLIENT_MEM_FRACTION='lots'")
    assert not results.exists() and not (tmp_path / "scale.md").exists()
