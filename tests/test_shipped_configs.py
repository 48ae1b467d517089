"""Every shipped config trains on tiny shapes and its run dir works with eval, export and generate.

Each ``configs/*.yaml`` keeps its own keys (bits, method, scale init, distillation, schedule...)
with the model swapped for the tiny Llama (a saved float checkpoint where the config loads
pretrained weights) and sizes cut down: one step, short blocks, the fixture corpus. The default
suite runs the 2-bit recovery recipe (least-squares scale init + distillation, whose run dirs
could not be restored); the rest are ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paretoq_jax.config import load_config
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "corpus"
FAST = {"smollm2-135m-2bit-recover.yaml"}
CONFIGS = [
    pytest.param(p, marks=() if p.name in FAST else pytest.mark.slow, id=p.stem)
    for p in sorted((ROOT / "configs").glob("*.yaml"))
]


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory) -> Path:
    """A saved float tiny Llama (HF folder with tokenizer): the 'pretrained' model."""
    from flax import nnx
    from transformers import AutoTokenizer

    from paretoq_jax.io import save_pretrained
    from paretoq_jax.models import Llama, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny") / "tiny-pretrained"
    src = ROOT / "configs" / "models" / "tiny-llama"
    model = Llama(LlamaConfig.from_json(src), rngs=nnx.Rngs(5), scan_layers=False)
    save_pretrained(model, folder, tokenizer=AutoTokenizer.from_pretrained(str(src)))
    return folder


def tiny_overrides(path: Path, run: Path, cache: Path, pretrained: Path) -> list[str]:
    """The config's own keys, on the tiny model and tiny sizes."""
    cfg = load_config(RunConfig, path, [f"run_dir={run}"])
    over = [
        f"run_dir={run}", f"data.cache_dir={cache}", f"data.path={CORPUS}", "data.seq_len=32",
        "data.val_blocks=2", "data.val_path=null", "data.val_fraction=0", "train.steps=1",
        "train.optimizer.warmup_steps=0", "train.batch_size=2", "train.grad_accum=1",
        "train.logging.eval_every=1",
        "train.logging.quant_stats_every=1", "checkpoint.every=1",
    ]  # fmt: skip
    if cfg.model.init != "random":
        over += [f"model.path={pretrained}", "model.tokenizer=null", "model.teacher=null"]
    if cfg.data.train_seq_len is not None:
        over.append("data.train_seq_len=16")
    return over


def _main(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_trains_then_eval_export_generate(tmp_path, tiny_pretrained, path, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    over = tiny_overrides(path, run, cache, tiny_pretrained)
    cfg = load_config(RunConfig, path, over)
    shipped = load_config(RunConfig, path)
    for key in ("bits", "method", "scale_init", "init"):  # the recipe is the config's own
        assert getattr(cfg.model, key) == getattr(shipped.model, key)
    assert cfg.train.distill == shipped.train.distill
    assert cfg.train.optimizer.lr == shipped.train.optimizer.lr
    summary = train(cfg, progress=False)
    assert summary["step"] == 1
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[-1]["step"] == 1 and "val_ppl" in rows[-1]

    out = tmp_path / "eval.json"
    argv = ["--model", str(run), "--data", str(CORPUS), "--seq-len", "32", "--batch-size", "2",
            "--max-windows", "2", "--out", str(out)]  # fmt: skip
    assert _main("paretoq_jax.eval.__main__", argv) == 0
    assert json.loads(out.read_text())
    for fmt, dest in (("packed", "pk"), ("hf", "hf"), ("gguf", "m.gguf")):
        argv = ["--checkpoint", str(run), "--format", fmt, "--out", str(tmp_path / dest)]
        assert _main("paretoq_jax.export.__main__", argv) == 0, fmt
        assert (tmp_path / dest).exists()
    argv = ["--model", str(run), "--prompt", "To be", "--max-new-tokens", "3"]
    assert _main("paretoq_jax.generate", argv) == 0
    capsys.readouterr()
