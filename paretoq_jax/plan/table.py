"""The planner's printed table."""

from __future__ import annotations

from typing import Any

__all__ = ["format_plan", "gib"]


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_plan(p: dict[str, Any]) -> str:
    """One human-readable table of a plan dict (``paretoq_jax.plan.plan``)."""
    b = p["bytes"]
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    rows = [
        ("topology", f"{p['topology']} x {p['slices']} slice(s): {p['devices']} {p['chip']} chips"),
        ("mesh", mesh),
        ("step", f"batch {p['batch']} x seq {p['seq_len']}, grad_accum {p['grad_accum']}, "
                 f"remat {p['remat']}, scan {p['scan_layers']}, bits {p['bits']} "
                 f"({p['method'] or 'default'}), distill {p['distill']}"),
        ("parameters / chip", gib(b["params"])),
        ("optimizer state / chip", gib(b["optimizer"])),
        ("temporaries / chip", gib(b["temporaries"])),
        ("peak / chip", f"{gib(b['peak'])} of {gib(b['hbm'])} HBM "
                        f"({100 * b['peak'] / b['hbm']:.1f}%)"
                        + (f"; JAX's allocator may use {gib(b['usable'])}"
                           if b.get("usable", b["hbm"]) < b["hbm"] else "")),
        ("model FLOPs / token", f"{p['model_flops_per_token']:.3e} (6N + 12 L H Dh S)"),
    ]  # fmt: skip
    if "flops_per_device" in p:
        t = p["time"]
        rows += [
            ("step FLOPs / chip", f"{p['flops_per_device']:.3e} (scan bodies x trip counts)"),
            ("step HBM bytes / chip", f"{p['hbm_bytes_per_device']:.3e}"),
            ("compute time", f"{1e3 * t['compute_s']:.1f} ms at peak bf16"),
            ("HBM time", f"{1e3 * t['hbm_s']:.1f} ms at peak bandwidth"),
        ]
    g = p.get("gather_codes")
    if g:
        rows.append(("code gathering", f"mesh.gather_codes={g['mode']}: {g['linears']} quantized "
                     f"linears gather packed codes, {g['bytes'] / 2**20:.1f} MiB sent / chip"
                     f"{', kept for the backward' if g.get('keep') and p.get('remat') else ''}"))  # fmt: skip
    for what, v in sorted(p.get("traffic", {}).items()):
        rows.append((f"  by what: {what}", f"{v['count']} arrays per step, "
                     f"{v['bytes'] / 2**20:.1f} MiB sent / chip"))  # fmt: skip
    for kind, v in sorted(p["collectives"].items()):
        rows.append((f"{kind}", f"{v['count']} per step, {v['bytes'] / 2**20:.1f} MiB sent / chip"))
    t = p["time"]
    rows.append(("collective time", f"{1e3 * t['collectives_ici_s']:.1f} ms ICI"
                 + (f" + {1e3 * t['collectives_dcn_s']:.1f} ms DCN" if t["collectives_dcn_s"] else "")))  # fmt: skip
    if "mfu" in p:
        rows += [
            ("step time (roofline)", f"{1e3 * t['step_overlapped_s']:.1f} ms overlapped, "
                                     f"{1e3 * t['step_serial_s']:.1f} ms if collectives do not "
                                     "overlap"),
            ("collective share", f"{100 * t['collective_share']:.1f}% of the serial step"),
            ("MFU (projected)", f"{100 * p['mfu']:.1f}% overlapped, "
                                f"{100 * p['mfu_serial']:.1f}% serial"),
            ("tokens / s", f"{p['tokens_per_s']:.3g}"),
        ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def flops_suspect(p: dict[str, Any]) -> bool:
    """Whether a plan's XLA FLOP count is below the model's own FLOPs (6N + attention): a loop
    body counted once (e.g. XLA:TPU's collective-matmul loops over weight shards,
    docs/scale/NOTES.md), not a real step. False when the plan has no count."""
    fl = p.get("flops_per_device")
    return fl is not None and fl < p["model_flops_per_step"] / p["devices"]
