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
    from paretoq_jax.config import load_config
    from paretoq_jax.train.config import RunConfig

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
    return TEMPLATE.format(table=header + "\n" + "\n".join(rows), chips=chips)


TEMPLATE = (
    (Path(__file__).with_name("scale_template.md")).read_text()
    if (Path(__file__).with_name("scale_template.md").exists())
    else "{table}\n\n{chips}\n"
)


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
