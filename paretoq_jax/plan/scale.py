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
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from paretoq_jax.cli import run_cli
from paretoq_jax.config import load_config
from paretoq_jax.outputs import TEXT_MARKER, atomic_write_text, check_output
from paretoq_jax.run.config import RunConfig

from .chips import CHIPS
from .table import flops_suspect, gib

# slices of each TPU family from the smallest up (the smallest-slice search)
V5P = ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8"]
_2D = ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"]
SLICES = {
    "v5p": V5P,
    "v4": [t.replace("v5p", "v4") for t in V5P],
    "v5e": [f"v5e:{s}" for s in _2D],
    "v6e": [f"v6e:{s}" for s in _2D],
    # H100 SXM nodes of 8 (compile-only, configs/gpu/h100_sxm.txtpb): 1, 2, 4, 8 nodes
    "h100": [f"h100:1x{n}x8" for n in (1, 2, 4, 8)],
}
# bits -> overrides, as the comments of configs/paper/*.yaml give them
BITS = {
    "2": ["model.bits=2", "model.method=seq"],
    "4": ["model.bits=4", "model.method=lsq"],
    "16": ["model.bits=16"],
}


def lower_bound_bytes(cfg, chips: int) -> float:
    """Bytes per chip no plan of ``cfg`` on ``chips`` chips can go below (a slice whose HBM is
    smaller is skipped without compiling): float32 weights + AdamW moments fully sharded, the
    bf16 layer inputs that remat keeps for the backward and the bf16 logits of one
    micro-batch, its tokens split over every chip."""
    from .core import architecture

    a = architecture(cfg.model.path)
    d, f, L = a.hidden_size, a.intermediate_size, a.num_hidden_layers
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    n = L * (2 * d * q + 2 * d * kv + 3 * d * f) + a.vocab_size * d * (
        1 if a.tie_word_embeddings else 2
    )
    tokens = cfg.train.batch_size // max(cfg.train.grad_accum, 1) * cfg.data.train_len / chips
    saved = L if cfg.model.remat else 0
    return 12.0 * n / chips + 2.0 * tokens * (saved * d + a.vocab_size)


def _chips(topology: str) -> int:
    return math.prod(int(x) for x in topology.split(":")[1].split("x"))


def grid_file(results: Path, path: str, bits: str, chip: str = "v5p") -> Path:
    """Where a grid cell's JSON is kept: ``<config>-<bits>bit.json`` for v5p (the page's main
    table), ``<config>-<bits>bit-<chip>.json`` for other chips."""
    suffix = "" if chip == "v5p" else f"-{chip}"
    return results / f"{Path(path).stem}-{bits}bit{suffix}.json"


def _grid_cells(results: Path, path: str, chip: str) -> list[Path]:
    """Every bit-width's grid JSON of one config on one chip family."""
    return list(results.glob(grid_file(results, path, "*", chip).name))


def plan_config(
    path: str,
    bits: str,
    results: Path,
    *,
    flops: bool,
    topologies: list[str] | None = None,
    chip: str = "v5p",
    hlo_dir: Path | None = None,
) -> dict[str, Any]:
    """Find the smallest ``chip`` slice (``SLICES``) for ``path`` at ``bits``; cache the
    result as JSON. Slices below :func:`lower_bound_bytes` are skipped, and so are those smaller
    than the slice the config fits at another bit-width (memory does not depend on the
    bit-width: the same float32 weights and per-channel scales); the search stops at the first
    fit."""
    from .core import HBMError, PlanError, plan

    out_file = grid_file(results, path, bits, chip)
    if out_file.exists():
        return json.loads(out_file.read_text())
    order = topologies or SLICES[chip]
    fits_elsewhere = [
        json.loads(f.read_text()).get("plan", {}).get("topology")
        for f in _grid_cells(results, path, chip)
    ]
    start = min((order.index(t) for t in fits_elsewhere if t in order), default=0)
    tried = []
    record: dict[str, Any] = {"config": path, "bits": bits}
    for i, topo in enumerate(order):
        cfg = load_config(RunConfig, path, BITS[bits])
        if i < start:
            tried.append({"topology": topo, "result": f"skipped: below {order[start]}, the "
                          "fit at another bit-width (memory does not depend on bits)"})  # fmt: skip
            continue
        bound = lower_bound_bytes(cfg, _chips(topo))
        if bound > CHIPS[chip].hbm_bytes:
            tried.append({"topology": topo, "result": f"skipped: lower bound {gib(bound)} "
                          f"per chip > HBM"})  # fmt: skip
            continue
        t0 = time.time()
        hlo_out = hlo_dir / f"{out_file.stem}-{topo.replace(':', '_')}.hlo.gz" if hlo_dir else None
        try:
            p = plan(cfg, topo, count_flops=flops, name=path, hlo_out=hlo_out)
        except HBMError as e:
            tried.append({"topology": topo, "result": str(e), "compile_s": time.time() - t0})
            continue
        except PlanError as e:  # e.g. the batch does not divide over this many chips
            tried.append({"topology": topo, "result": f"cannot plan: {e}"})
            continue
        p["compile_s"] = time.time() - t0
        tried.append({"topology": topo, "result": "fits", "compile_s": p["compile_s"]})
        record["plan"] = p
        if flops and bits != "16":
            f16 = load_config(RunConfig, path, BITS["16"])
            record["float"] = plan(f16, topo, count_flops=True, name=path)
        break
    record["tried"] = tried
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file, json.dumps(record, indent=2))
    return record


def fill_flops(path: str, bits: str, results: Path, *, chip: str = "v5p") -> dict[str, Any]:
    """Add the FLOP count to a planned grid cell (``plan_config``'s JSON) that lacks it: the
    step's FLOPs and HBM bytes and those of the same step at ``model.bits=16`` on the cell's
    slice, from the small compiles of ``core.count_flops`` (the whole step is not compiled
    again); the float count is shared by the cells of one config on one slice."""
    from .core import add_roofline, count_flops

    out_file = grid_file(results, path, bits, chip)
    record = json.loads(out_file.read_text())
    p = record.get("plan")
    if p is None or ("flops_per_device" in p and "float" in record):
        return record
    topo, slices = p["topology"], p.get("slices", 1)
    t0 = time.time()
    cfg = load_config(RunConfig, path, BITS[bits])
    add_roofline(p, *count_flops(cfg, topo, slices, name=path))
    float_count = None
    for f in _grid_cells(results, path, chip):
        other = json.loads(f.read_text())
        fl = other.get("float", {})
        if fl.get("topology") == topo and "flops_per_device" in fl:
            float_count = fl
    if float_count is None:
        f16 = load_config(RunConfig, path, BITS["16"])
        fl, nb = count_flops(f16, topo, slices, name=path)
        float_count = {"topology": topo, "flops_per_device": fl, "hbm_bytes_per_device": nb}
    record["float"] = float_count
    record["flops_count_s"] = time.time() - t0
    atomic_write_text(out_file, json.dumps(record, indent=2))
    return record


# mesh.gather_codes on (auto) vs off: the same step, the same slice (docs/fsdp-code-gather.md).
# (config, bits, topology, overrides); v5e-256: batch 128 over 256 chips needs tensor = 2.
GATHER = [
    ("configs/paper/llama-3-8b.yaml", "2", "v5p:4x4x4", []),
    ("configs/paper/llama-3-8b.yaml", "2", "v5e:16x16", ["mesh.fsdp=128", "mesh.tensor=2"]),
    ("configs/paper/llama-3-8b.yaml", "4", "v5p:4x4x4", []),
    # the other sizes on their smallest slice (the grid's plan is the auto side)
    ("configs/paper/mobilellm-125m.yaml", "2", "v5p:2x2x1", []),
    ("configs/paper/llama-3.2-1b.yaml", "2", "v5p:2x2x1", []),
    ("configs/paper/llama-3.2-1b.yaml", "4", "v5p:2x2x1", []),
    ("configs/paper/llama-3.2-3b.yaml", "2", "v5p:2x2x1", []),
]
# issue 16's goal: code-gathered weight all-gather bytes / the bf16 path's, per bit-width
GATHER_GOAL = {"1": 1 / 8, "2": 1 / 6, "3": 1 / 4, "4": 1 / 3}
GATHER_MODES = ("auto", "off")


def gather_file(results: Path, path: str, bits: str, topo: str, mode: str) -> Path:
    """Where the plan of one code-gathering comparison cell is kept (``plan --out`` JSON)."""
    return results / "gather" / f"{Path(path).stem}-{bits}bit-{topo.replace(':', '_')}-{mode}.json"


def plan_gather(
    path: str,
    bits: str,
    topo: str,
    overrides: list[str],
    results: Path,
    *,
    flops: bool,
    hlo_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Plan ``path`` at ``bits`` on ``topo`` with mesh.gather_codes auto and off; each plan is
    cached as the JSON that ``python -m paretoq_jax.plan --out`` writes."""
    from paretoq_jax.config import load_config
    from paretoq_jax.outputs import JSON_KIND_KEY
    from paretoq_jax.run.config import RunConfig

    from .core import plan

    out = {}
    for mode in GATHER_MODES:
        f = gather_file(results, path, bits, topo, mode)
        grid = grid_file(results, path, bits)  # the v5p grid's cell (auto)
        if not f.exists() and mode == "auto" and not overrides and grid.exists():
            p = dict(json.loads(grid.read_text()).get("plan") or {})
            if p.get("topology") == topo and p.get("slices", 1) == 1 and "traffic" in p:
                p["compile_wall_s"] = p.pop("compile_s", None)
                p["from_grid"] = grid.name  # the same step: gather_codes=auto is the default
                f.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(f, json.dumps({JSON_KIND_KEY: "plan", **p}, indent=2) + "\n")
        if not f.exists():
            cfg = load_config(
                RunConfig, path, [*BITS[bits], *overrides, f"mesh.gather_codes={mode}"]
            )
            t0 = time.time()
            hlo_out = hlo_dir / f"{f.stem}.hlo.gz" if hlo_dir else None
            p = plan(cfg, topo, count_flops=flops, name=path, hlo_out=hlo_out)
            p["compile_wall_s"] = time.time() - t0
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(f, json.dumps({JSON_KIND_KEY: "plan", **p}, indent=2) + "\n")
        out[mode] = json.loads(f.read_text())
    return out


def _mib(x: float) -> str:
    return f"{x / 2**30:,.1f} GiB" if x >= 2**30 else f"{x / 2**20:,.0f} MiB"


def _change(off: float, on: float) -> str:
    return f"{_mib(off)} -> {_mib(on)}" + (f" ({on / off:.2f}x)" if off else "")


def render_gather(results: Path) -> str:
    """The code-gathering table: per-step collective bytes and time, on vs off."""
    from .chips import chip_for

    rows = []
    for path, bits, topo, overrides in GATHER:
        files = {m: gather_file(results, path, bits, topo, m) for m in GATHER_MODES}
        if not all(f.exists() for f in files.values()):
            missing = ", ".join(str(f) for f in files.values() if not f.exists())
            cmd = f"python -m paretoq_jax.plan.scale --gather  # {missing}"
            rows.append(f"| `{path}` | {bits} | {topo} | not planned yet: `{cmd}` |||||||||")
            continue
        on, off = (json.loads(files[m].read_text()) for m in GATHER_MODES)
        chip = chip_for(topo)
        kinds = sorted(set(on["collectives"]) | set(off["collectives"]))
        by_kind = "; ".join(
            f"{k} {_change(*(p['collectives'].get(k, {}).get('bytes', 0.0) for p in (off, on)))}"
            for k in kinds
        )
        total = [sum(v["bytes"] for v in p["collectives"].values()) for p in (on, off)]
        weights = "-"
        if "traffic" in on and "traffic" in off:
            w_off, w_on = off["weight_gather_bytes"], on["weight_gather_bytes"]
            r_off, r_on = (p["traffic"].get("reductions", {}).get("bytes", 0.0) for p in (off, on))
            goal = GATHER_GOAL.get(bits)
            met = "" if goal is None else (" met" if w_on <= goal * w_off else " NOT met")
            weights = (
                f"{_change(w_off, w_on)}, goal <= 1/{round(1 / goal)}:{met} | "
                if goal
                else f"{_change(w_off, w_on)} | "
            ) + _change(r_off, r_on)
        else:
            weights = "not split (planned before the split: replan) | -"
        t = [p["time"]["collectives_ici_s"] + p["time"]["collectives_dcn_s"] for p in (on, off)]
        # the step's model FLOPs at the chip's peak: the compute the collectives hide behind
        t_model = on["model_flops_per_step"] / on["devices"] / chip.peak_flops
        mesh = "x".join(str(v) for v in on["mesh"].values())
        linears = on.get("gather_codes", {}).get("linears", "-")
        rows.append(
            f"| `{path}` {' '.join(overrides)} | {bits} | {topo} ({on['devices']}) | {mesh} | "
            f"{linears} | {weights} | {by_kind} | {_change(total[1], total[0])} | "
            f"{1e3 * t[1]:.0f} -> {1e3 * t[0]:.0f} ms | {1e3 * t_model:.0f} ms | "
            f"{100 * t[1] / (t[1] + t_model):.0f}% -> {100 * t[0] / (t[0] + t_model):.0f}% |"
        )
    header = (
        "| config | bits | topology (chips) | mesh data x fsdp x tensor | linears gathering "
        "codes | weight gathers (linears) / chip / step, off -> on | reductions (gradients) "
        "/ chip / step, off -> on | bytes sent / chip / step by kind, off -> on | all "
        "collectives, off -> on | collective time (ICI), off -> on | model FLOPs at peak | "
        "collective share, off -> on |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return header + "\n" + "\n".join(rows)


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def _paper_configs() -> list[str]:
    return [p for p in sorted(glob.glob("configs/paper/*.yaml")) if Path(p).name != "base.yaml"]


def _slice_cell(r: dict[str, Any], chip: str) -> str:
    """The fitting topology, with the smaller slices that were not compiled named."""
    p = r["plan"]
    order = SLICES.get(chip, [])
    below = order[: order.index(p["topology"])] if p["topology"] in order else []
    tried = {t["topology"]: t["result"] for t in r.get("tried", []) if t["result"] != "fits"}
    untried = [t for t in below if t not in tried]
    too_small = [t for t in below if t in tried and not tried[t].startswith("skipped")]
    cell = f"{p['topology']} ({p['devices']})"
    cell += f", smaller does not fit: {', '.join(too_small)}" if too_small else ""
    return cell + (f", smaller not compiled: {', '.join(untried)}" if untried else "")


def _grid_row(r: dict[str, Any], chip: str) -> str:
    p = r["plan"]
    b, t = p["bytes"], p["time"]
    mesh = "x".join(str(v) for v in p["mesh"].values())
    mfu = f"{100 * p['mfu']:.0f}%" if "mfu" in p else "-"
    if flops_suspect(p):  # fewer FLOPs than the model's own: a loop body counted once
        mfu = "suspect: XLA counted fewer FLOPs than the model's"
    coll = 1e3 * (t["collectives_ici_s"] + t["collectives_dcn_s"])
    share = f"{100 * t['collective_share']:.0f}%" if "collective_share" in t else "-"
    fl = by = "-"
    if "float" in r and "flops_per_device" in p:
        q, fp = p, r["float"]
        fl = f"{q['flops_per_device']:.3g} vs {fp['flops_per_device']:.3g} ({_pct(q['flops_per_device'], fp['flops_per_device'])})"
        by = f"{q['hbm_bytes_per_device']:.3g} vs {fp['hbm_bytes_per_device']:.3g} ({_pct(q['hbm_bytes_per_device'], fp['hbm_bytes_per_device'])})"
    secs = [x["compile_s"] for x in r.get("tried", []) if "compile_s" in x]
    compiled = f"{sum(secs) / 60:.0f} min" if secs else "-"
    if "traffic" in p:
        coll_cell = f"{coll:.0f} ms ({share})"
    else:  # planned before loops were counted by their trip counts
        coll_cell = "- (stale: see the code-gathering table)"
    return (
        f"| `{r['config']}` | {r['bits']} | {_slice_cell(r, chip)} | {mesh} | "
        f"{p['grad_accum']} | {p.get('attention', 'xla')} | "
        f"{gib(b['peak'])} ({100 * b['peak'] / b['hbm']:.0f}%) | "
        f"{mfu} | {coll_cell} | {fl} | {by} | {compiled} |"
    )


_GRID_COLUMNS = (
    "config", "bits", "{slice}", "mesh data x fsdp x tensor", "grad_accum", "attention",
    "peak / chip (% HBM)", "projected MFU", "collective time (share)",
    "step FLOPs / chip, QAT vs float", "HBM bytes / chip, QAT vs float",
    "compile (wall, this host)",
)  # fmt: skip


def _grid_header(slice_label: str) -> str:
    """The header of the tables of :func:`_grid_row` rows."""
    names = [c.format(slice=slice_label) for c in _GRID_COLUMNS]
    return "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|"


def render_grid(results: Path, chip: str = "v5p") -> str:
    """Smallest slice of every paper config at 2 and 4 bits; missing cells name their command."""
    rows, missing = [], []
    for path in _paper_configs():
        for bits in ("2", "4"):
            f = grid_file(results, path, bits, chip)
            if not f.exists():
                opt = "" if chip == "v5p" else f" --chip {chip}"
                missing.append(
                    f"- `{path}` {bits}-bit: `python -m paretoq_jax.plan.scale --configs "
                    f"{path} --bits {bits}{opt}`"
                )
                continue
            r = json.loads(f.read_text())
            if r.get("plan") is None:
                tried = ", ".join(t["topology"] for t in r.get("tried", []))
                blank = "|" * (len(_GRID_COLUMNS) - 2)  # the rest of the row's cells, empty
                rows.append(f"| `{path}` | {bits} | none of {tried} fits {blank}")
                continue
            rows.append(_grid_row(r, chip))
    out = _grid_header("smallest slice (chips)") + "\n" + "\n".join(rows)
    if missing:
        out += "\n\nNot planned yet (one command each; JSON lands in `docs/scale/`):\n"
        out += "\n".join(missing)
    return out


def render_flops(results: Path) -> str:
    """Plans with the FLOP count (``--flops``) kept under ``docs/scale/flops/``."""
    rows = []
    for f in sorted((results / "flops").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("plan"):
            rows.append(_grid_row(r, ""))
    return (
        _grid_header("slice (chips)") + "\n" + "\n".join(rows) if rows else "(none yet: `--flops`)"
    )


# fsdp vs fsdp x tensor on one slice: (config, bits, topology, tensor sizes)
MESHES = [("configs/paper/llama-3-8b.yaml", "2", "v5p:4x4x4", (1, 4))]


def mesh_file(results: Path, path: str, bits: str, topo: str, tensor: int) -> Path:
    """The plan of one mesh-comparison cell (tensor 1 is the code-gathering table's auto)."""
    if tensor == 1:
        return gather_file(results, path, bits, topo, "auto")
    stem = f"{Path(path).stem}-{bits}bit-{topo.replace(':', '_')}-tensor{tensor}"
    return results / "mesh" / f"{stem}.json"


def render_meshes(results: Path) -> str:
    """Memory and collectives of fsdp-only vs fsdp x tensor meshes on the same slice."""
    rows = []
    for path, bits, topo, tensors in MESHES:
        for n in tensors:
            f = mesh_file(results, path, bits, topo, n)
            if not f.exists():
                cmd = (
                    f"python -m paretoq_jax.plan --config {path} --topology {topo} --no-flops "
                    f"{' '.join(BITS[bits])} mesh.tensor={n} --out {f}"
                )
                rows.append(
                    f"| `{path}` | {bits} | {topo} | tensor={n}: not planned: `{cmd}` ||||||||"
                )
                continue
            p = json.loads(f.read_text())
            b, tr = p["bytes"], p.get("traffic", {})
            red = tr.get("reductions", {}).get("bytes", 0.0)
            total = sum(v["bytes"] for v in p["collectives"].values())
            t = p["time"]["collectives_ici_s"] + p["time"]["collectives_dcn_s"]
            mesh = "x".join(str(v) for v in p["mesh"].values())
            rows.append(
                f"| `{path}` | {bits} | {topo} | {mesh} | {gib(b['params'] + b['optimizer'])} | "
                f"{gib(b['temporaries'])} | {gib(b['peak'])} | {_mib(p.get('weight_gather_bytes', 0))} | "
                f"{_mib(red)} | {_mib(total)} | {1e3 * t:.0f} ms |"
            )
    header = (
        "| config | bits | topology | mesh data x fsdp x tensor | params + AdamW / chip | "
        "temporaries / chip | peak / chip | weight gathers / chip / step | reductions / chip / "
        "step | all collectives | collective time (ICI) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return header + "\n" + "\n".join(rows)


def render(results: Path) -> str:
    """docs/scale.md from the JSON results."""
    chips = "\n".join(
        f"| {c.name} | {c.bf16_tflops:g} | {c.hbm_bytes / 2**30:.0f} | {c.hbm_GBps:g} | "
        f"{c.ici_GBps:g} | {c.dcn_GBps:g} | {c.source} |"
        for c in CHIPS.values()
    )
    notes = (results / "NOTES.md").read_text() if (results / "NOTES.md").exists() else ""
    return TEMPLATE.format(
        table=render_grid(results),
        gpus=render_grid(results, "h100"),
        flops=render_flops(results),
        meshes=render_meshes(results),
        gather=render_gather(results),
        chips=chips,
        notes=notes,
    )


PAGE_KIND = "scale-page"
TEMPLATE = (
    TEXT_MARKER.format(kind=PAGE_KIND)
    + """
# Pod scale, planned on a CPU: the paper's configs on TPU slices and H100s

Generated by `python -m paretoq_jax.plan.scale` (the JSON results in `docs/scale/`; rerun with
`--render-only` to redraw this page, delete a JSON to recompute it). Every row is the real
train step of the config (its own defaults: bf16 compute, float32 master weights and AdamW
state, `model.remat`, `model.scan_layers`, `train.grad_accum`, `mesh.fsdp: -1`; seq 2048,
global batch 128) compiled by XLA for compile-only TPU devices (`jax[tpu]`'s libtpu on a
CPU-only host; no TPU, no weights, no data). "Smallest slice" is the first slice of the chip
family, from the smallest up (v5p-8, 4 chips, by default; `--chip v5e|v6e|v4` searches those),
whose compile fits HBM. Slices below an analytic lower bound (float32 weights + AdamW state
fully sharded, remat's saved bf16 layer inputs and the logits of one micro-batch) and below
the config's fit at the other bit-width (memory does not depend on the bit-width) are skipped
without compiling; the search stops at the first fit. "Projected MFU" and the FLOP / byte
columns come from `--flops`, which adds the count to a planned cell without compiling the whole
step again: the same step with 1 and 2 unrolled layers (2 compiles), and the float step
likewise (2 more, shared by a config's bit-widths on one slice); the loops XLA leaves in them
(collective matmuls on 8+ chips), whose bodies `cost_analysis()` counts once, are added for
their trip counts (`hlo.loop_cost`). "attention" is what the step computes attention with:
`splash` is the fused Pallas kernel, `model.attention: auto`'s choice on TPU, and `cudnn`
cuDNN's fused kernel, its choice on NVIDIA GPUs (`docs/attention.md`; splash's FLOPs, which
`cost_analysis()` cannot see inside the kernel, are counted from its shapes:
`plan.core.splash_cost`); `xla` rows were planned before the fused kernels, with the (batch,
heads, 2048, 2048) scores materialized.

{table}

### Llama-3 8B on 64 chips, with the FLOP count

The 8B step on a larger slice than its smallest (`v5p:4x4x4`, the issue's v5p-64 question),
planned with `--flops` (JSON in `docs/scale/flops/`).

{flops}

### H100 counts (compile-only, `--chip h100`)

The smallest number of H100 SXM GPUs (nodes of 8) whose compiled peak is within what JAX's
allocator may use: 75% of the 80 GiB by default (`$XLA_CLIENT_MEM_FRACTION` of the planning
process changes it; the percentages below are of the whole 80 GiB). XLA:GPU raises no OOM at
compile time: the planner compares the peak itself. No FLOP count
on GPUs (no `cost_analysis()` for compile-only devices).

{gpus}

## fsdp vs fsdp x tensor, same slice

The same step on the same chips with the tensor axis at 1 and 4 (Megatron: heads, MLP and
vocabulary split over `tensor`, activations pinned to the batch axes): tensor parallelism
shrinks what each chip holds of the weights' gathers and of the gradient reductions (its
shards are not gathered) but adds activation all-reduces, and each fsdp shard now holds 4x
the batch.

{meshes}

## FSDP gathering integer codes (`mesh.gather_codes`), on vs off

The same step compiled twice on the same slice, `mesh.gather_codes=auto` (the default of
`train` and of the planner, on TPU and GPU meshes: quantized linears all-gather packed integer
codes + scales, `docs/fsdp-code-gather.md`) and `off` (bf16 kernels gathered). On a config's
own grid slice the grid's plan is the `auto` side, so only `off` is compiled. Bytes are those one chip sends
per step (ring algorithm, every scanned layer counted by its trip count), read from the
optimized HLO; times at the chip's ICI bandwidth (table below). "Model FLOPs at peak" is the
step's model FLOPs (6 N + attention) per chip at peak bf16, the compute the collectives overlap
with; "collective share" is collective time / (that + collective time). Regenerate with
`python -m paretoq_jax.plan.scale --gather` (JSON in `docs/scale/gather/`).

{gather}

{notes}

## Planning a run yourself

```bash
pip install -e ".[tpu]"      # jax[tpu]: libtpu compiles for TPU topologies on any Linux host
python -m paretoq_jax.plan --config configs/paper/llama-3-8b.yaml --topology v5p:4x4x4
python -m paretoq_jax.plan --config configs/paper/llama-3.2-1b.yaml --topology v5p:2x2x1 \\
    --slices 2 mesh.data=2 mesh.fsdp=-1 --out plan.json      # data across 2 slices (DCN)
pip install -e ".[gpu-plan]"  # XLA's CUDA plugin: compile-only H100s
python -m paretoq_jax.plan --config configs/paper/llama-3.2-1b.yaml --gpu h100:1x2x8
python -m paretoq_jax.plan.scale --gather    # the code-gathering table (auto vs off)
python -m paretoq_jax.plan.scale --chip v5e  # smallest v5e slice of every paper config
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
  temporaries + code). XLA:TPU fails the compile when its temporaries alone overflow HBM; the
  planner also refuses a plan whose whole peak does (XLA compiled Llama-3 8B on 4 v5p chips
  with 22 GiB of state + 82 GiB of temporaries), and on GPUs compares it with what JAX's
  allocator may use. Either way the result is a one-paragraph error naming what to change.
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

Any `--topology` that libtpu knows works (`v4:2x2x1`, `v5e:16x16`, `v6e:8x8`, ...).

## GPUs, compile-only

`pip install -e ".[gpu-plan]"` adds XLA's CUDA plugin (`jax-cuda12-plugin` and
`jax-cuda12-pjrt` at the project's jax version, without the CUDA runtime: nothing runs) and the
cuDNN library (`model.attention: auto` is cuDNN's fused attention on NVIDIA GPUs, and JAX looks
for the library when it traces the call; without it the plan falls back to XLA's attention), and
`python -m paretoq_jax.plan --config CONFIG --gpu h100:1x2x8` compiles the same step for
compile-only H100s (`<gpu>:<slices>x<nodes>x<gpus per node>`: 2 nodes of 8 here) from the
target description `configs/gpu/h100_sxm.txtpb` (XLA's `GpuTargetConfigProto`, written from
NVIDIA's public H100 SXM figures in the layout of XLA's own spec files; its header says where
each value comes from). XLA:GPU raises no out-of-memory error at compile time and has no
`cost_analysis()` for these devices, so the planner compares the compiled peak with the GPU's
memory itself (the same one-paragraph error) and reports memory and collectives, not FLOPs.
"""
)


def main(argv: list[str] | None = None) -> int:
    """``python -m paretoq_jax.plan.scale`` under the CLIs' error boundary (``error: ...``)."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paretoq_jax.plan.scale", description=__doc__)
    parser.add_argument("--configs", nargs="*", default=sorted(glob.glob("configs/paper/*.yaml")))
    parser.add_argument("--bits", nargs="*", default=["2", "4"])
    parser.add_argument("--results", default="docs/scale", help="JSON results folder")
    parser.add_argument("--out", default="docs/scale.md")
    parser.add_argument("--flops", action="store_true", help="also FLOPs/bytes (4 more compiles)")
    parser.add_argument(
        "--chip",
        default="v5p",
        choices=sorted(SLICES),
        help="find the smallest slice of this TPU family (results of other families than v5p "
        "are kept as <config>-<bits>bit-<chip>.json)",
    )
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--topologies", nargs="*", help="search these slices instead of the chip's list"
    )
    parser.add_argument("--hlo-dir", help="also keep each compiled step's optimized HLO here")
    parser.add_argument(
        "--gather",
        action="store_true",
        help="plan only the code-gathering comparison (mesh.gather_codes auto vs off)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = Path(args.results)
    # before any compile: the page replaces only an earlier page (its first-line marker), and a
    # bad $XLA_CLIENT_MEM_FRACTION is one error, not a "cannot plan" recorded for every slice
    out = check_output(args.out, PAGE_KIND, directory=False)
    if not args.render_only:
        from .core import GPU_TARGETS, gpu_mem_fraction

        if args.chip in GPU_TARGETS:
            gpu_mem_fraction()
    if args.gather and not args.render_only:
        for path, bits, topo, overrides in GATHER:
            plan_gather(
                path, bits, topo, overrides, results, flops=args.flops,
                hlo_dir=Path(args.hlo_dir) if args.hlo_dir else None,
            )  # fmt: skip
            print(f"[scale] {path} {bits}-bit on {topo}: gather_codes auto and off planned")
    elif not args.render_only:
        for path in args.configs:
            if Path(path).name == "base.yaml":
                continue
            for bits in args.bits:
                r = plan_config(
                    path, bits, results, flops=args.flops, chip=args.chip,
                    topologies=args.topologies,
                    hlo_dir=Path(args.hlo_dir) if args.hlo_dir else None,
                )  # fmt: skip
                if args.flops and args.chip not in GPU_TARGETS and r.get("plan"):
                    r = fill_flops(path, bits, results, chip=args.chip)
                print(f"[scale] {path} {bits}-bit: {r.get('plan', {}).get('topology', 'no fit')}")
    atomic_write_text(out, render(results))
    print(f"[scale] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
