"""``python -m paretoq_jax.plan.scale``: plan every paper config on TPU v5p slices -> docs/scale.md.

For each ``configs/paper/*.yaml`` (its own defaults: mesh, remat, scan, grad_accum) at each
bit-width, the v5p slices are tried from the smallest up; the first one whose compile fits
HBM is the config's slice. Each result is kept as JSON under ``--results`` (rerunning skips
what is there; delete a file to redo it) and the markdown is rendered from those files, so the
page is regenerated with ``--render-only`` in seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from paretoq_jax.config import load_config
from paretoq_jax.run.config import RunConfig

from .chips import CHIPS
from .table import gib

# v5p slices from the smallest up (topology, chips)
V5P = ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8"]
# bits -> overrides, as the comments of configs/paper/*.yaml give them
BITS = {
    "2": ["model.bits=2", "model.method=seq"],
    "4": ["model.bits=4", "model.method=lsq"],
    "16": ["model.bits=16"],
}


def _state_bytes_per_chip(cfg, chips: int) -> float:
    """float32 weights + AdamW moments, fully sharded: a lower bound to skip hopeless slices."""
    from .core import architecture

    a = architecture(cfg.model.path)
    d, f, L = a.hidden_size, a.intermediate_size, a.num_hidden_layers
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    n = L * (2 * d * q + 2 * d * kv + 3 * d * f) + a.vocab_size * d * (
        1 if a.tie_word_embeddings else 2
    )
    return 12.0 * n / chips


def plan_config(
    path: str, bits: str, results: Path, *, flops: bool, topologies: list[str] | None = None
) -> dict[str, Any]:
    """Find the smallest v5p slice for ``path`` at ``bits``; cache the result as JSON."""
    from .core import HBMError, plan

    out_file = results / f"{Path(path).stem}-{bits}bit.json"
    if out_file.exists():
        return json.loads(out_file.read_text())
    tried = []
    record: dict[str, Any] = {"config": path, "bits": bits}
    for topo in topologies or V5P:
        cfg = load_config(RunConfig, path, BITS[bits])
        chips = 1
        for x in topo.split(":")[1].split("x"):
            chips *= int(x)
        if _state_bytes_per_chip(cfg, chips) > 0.8 * CHIPS["v5p"].hbm_bytes:
            tried.append({"topology": topo, "result": "skipped: state alone > 80% of HBM"})
            continue
        t0 = time.time()
        try:
            p = plan(cfg, topo, count_flops=flops, name=path)
        except HBMError as e:
            tried.append({"topology": topo, "result": str(e)})
            continue
        p["compile_s"] = time.time() - t0
        tried.append({"topology": topo, "result": "fits"})
        record["plan"] = p
        if flops and bits != "16":
            f16 = load_config(RunConfig, path, BITS["16"])
            record["float"] = plan(f16, topo, count_flops=True, name=path)
        break
    record["tried"] = tried
    results.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(record, indent=2))
    return record


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def render(results: Path) -> str:
    """docs/scale.md from the JSON results."""
    rows = []
    for f in sorted(glob.glob(str(results / "*.json"))):
        r = json.loads(Path(f).read_text())
        p = r.get("plan")
        name = f"`{r['config']}`"
        if p is None:
            rows.append(f"| {name} | {r['bits']} | none of {', '.join(V5P)} | | | | | | |")
            continue
        b, t = p["bytes"], p["time"]
        mesh = "x".join(str(v) for v in p["mesh"].values())
        mfu = f"{100 * p['mfu']:.0f}%" if "mfu" in p else "-"
        share = f"{100 * t['collective_share']:.0f}%" if "collective_share" in t else "-"
        fl = by = "-"
        if "float" in r and "flops_per_device" in p:
            q, fp = p, r["float"]
            fl = f"{q['flops_per_device']:.3g} vs {fp['flops_per_device']:.3g} ({_pct(q['flops_per_device'], fp['flops_per_device'])})"
            by = f"{q['hbm_bytes_per_device']:.3g} vs {fp['hbm_bytes_per_device']:.3g} ({_pct(q['hbm_bytes_per_device'], fp['hbm_bytes_per_device'])})"
        rows.append(
            f"| {name} | {r['bits']} | {p['topology']} ({p['devices']}) | {mesh} | "
            f"{p['grad_accum']} | {gib(b['peak'])} ({100 * b['peak'] / b['hbm']:.0f}%) | "
            f"{mfu} | {share} | {fl} | {by} |"
        )
    chips = "\n".join(
        f"| {c.name} | {c.bf16_tflops:g} | {c.hbm_bytes / 2**30:.0f} | {c.hbm_GBps:g} | "
        f"{c.ici_GBps:g} | {c.dcn_GBps:g} | {c.source} |"
        for c in CHIPS.values()
    )
    header = (
        "| config | bits | smallest v5p slice (chips) | mesh data x fsdp x tensor | grad_accum "
        "| peak / chip (% HBM) | projected MFU | collective share | step FLOPs / chip, QAT vs "
        "float | HBM bytes / chip, QAT vs float |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    notes = (results / "NOTES.md").read_text() if (results / "NOTES.md").exists() else ""
    return TEMPLATE.format(table=header + "\n" + "\n".join(rows), chips=chips, notes=notes)


TEMPLATE = """# Pod scale, planned on a CPU: the paper's configs on TPU slices

Generated by `python -m paretoq_jax.plan.scale` (the JSON results in `docs/scale/`; rerun with
`--render-only` to redraw this page, delete a JSON to recompute it). Every row is the real
train step of the config (its own defaults: bf16 compute, float32 master weights and AdamW
state, `model.remat`, `model.scan_layers`, `train.grad_accum`, `mesh.fsdp: -1`; seq 2048,
global batch 128) compiled by XLA for compile-only TPU devices (`jax[tpu]`'s libtpu on a
CPU-only host; no TPU, no weights, no data). "Smallest slice" is the first v5p slice, from
v5p-8 (4 chips) up, whose compile fits HBM.

{table}

{notes}

## Planning a run yourself

```bash
pip install -e ".[tpu]"      # jax[tpu]: libtpu compiles for TPU topologies on any Linux host
python -m paretoq_jax.plan --config configs/paper/llama-3-8b.yaml --topology v5p:4x4x4
python -m paretoq_jax.plan --config configs/paper/llama-3.2-1b.yaml --topology v5p:2x2x1 \\
    --slices 2 mesh.data=2 mesh.fsdp=-1 --out plan.json      # data across 2 slices (DCN)
```

It prints one table: devices and mesh; parameters, optimizer state, temporaries and peak per
chip against HBM; FLOPs per step (scan bodies counted by their trip counts); model FLOPs per
token; compute, HBM and collective times; the bytes of every collective kind per step; the
roofline step time, MFU and tokens/s. `--no-flops` skips the 3 extra compiles of the FLOP count
(memory and collectives only). A step that does not fit is one line `error: ...` naming XLA's
figure and what to change (`mesh.fsdp`, `mesh.tensor`, `model.remat`, `train.grad_accum`),
exit status 2. The architecture comes from `configs/models/<hub id>/config.json` (committed for
the paper's models) or a local `model.path` folder: no weights, tokenizer or corpus are read.

How to read it:
- peak / chip: XLA's own memory analysis of the compiled step (arguments + outputs - donated +
  temporaries + code). XLA fails the compile when a chip would overflow (the planner turns that
  into a one-paragraph error naming what to change).
- step FLOPs / HBM bytes per chip: XLA's `cost_analysis()` of the compiled step. It counts a
  `lax.scan` body once, so the planner compiles the same step with 1 and 2 unrolled layers on
  one micro-batch, extrapolates to L layers, multiplies by `train.grad_accum` and subtracts the
  optimizer update counted too often (compiled on its own). "QAT vs float" is the same step
  with `model.bits=16` (no quantizer) on the same slice.
- projected MFU: model FLOPs (6 N + 12 L H Dh S per token, PaLM's convention) per step over
  chips x peak bf16 x the roofline step time max(FLOPs / peak, HBM bytes / HBM bandwidth,
  collective time): perfect overlap, so an upper bound; the planner also prints the serial
  figure (collectives not overlapped).
- collective share: collective time / (max(compute, HBM) + collective time). Collective bytes
  are read from the optimized HLO (each all-gather / reduce-scatter / all-reduce counted as
  often as its loop runs, ring algorithm over its replica group) at the ICI bandwidth below;
  across slices XLA's megascale send/recv pairs go at the DCN bandwidth.
- Memory does not depend on the bit-width (the same float32 weights and one scale per output
  channel at 1-4 bits), so a config that fits at 2 bits fits at 4 on the same slice.

## Chips

| chip | bf16 TFLOPs (dense) | HBM GiB | HBM GB/s | ICI GB/s per chip, one direction | DCN GB/s per chip | source |
|---|---|---|---|---|---|---|
{chips}

Only v5p has been planned here; any `--topology` that libtpu knows works (`v4:2x2x1`,
`v5e:16x16`, `v6e:8x8`, ...). GPUs (H100 / H200) are in the table for the launch scripts' users
but not yet compiled: XLA's GPU compile-only path (`jax-cuda12-plugin` with a target config)
is not wired into the planner.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paretoq_jax.plan.scale", description=__doc__)
    parser.add_argument("--configs", nargs="*", default=sorted(glob.glob("configs/paper/*.yaml")))
    parser.add_argument("--bits", nargs="*", default=["2", "4"])
    parser.add_argument("--results", default="docs/scale", help="JSON results folder")
    parser.add_argument("--out", default="docs/scale.md")
    parser.add_argument("--flops", action="store_true", help="also FLOPs/bytes (4 more compiles)")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = Path(args.results)
    if not args.render_only:
        for path in args.configs:
            if Path(path).name == "base.yaml":
                continue
            for bits in args.bits:
                r = plan_config(path, bits, results, flops=args.flops)
                print(f"[scale] {path} {bits}-bit: {r.get('plan', {}).get('topology', 'no fit')}")
    Path(args.out).write_text(render(results))
    print(f"[scale] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
