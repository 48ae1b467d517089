"""The README's result tables, generated from the committed results files.

``README.md`` marks each generated block::

    <!-- BEGIN generated:NAME (python -m paretoq_jax.report --readme) -->
    ...
    <!-- END generated:NAME -->

:func:`blocks` makes every block's text from ``reports/`` (the quickstart's ``quickstart.json``
and the sweeps' ``results.json``); :func:`update_readme` rewrites the blocks of a README (or,
with ``check``, only says which differ). A block a README lacks is not added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from paretoq_jax.run.records import record_config

from .build import findings, load_rows
from .figures import METHOD_ORDER, bits_label
from .numbers import finite, lr, markdown_table, num
from .published import REPORTS_DIR
from .scaling import budget_block, frontier_block

__all__ = ["README", "blocks", "update_readme", "BLOCK"]

README = REPORTS_DIR.parent / "README.md"
BLOCK = re.compile(
    r"(<!-- BEGIN generated:(?P<name>[\w.-]+)[^>]*-->\n)(?P<body>.*?)(<!-- END generated:(?P=name) -->)",
    re.S,
)
_MIB = 2**20
NO_QUICKSTART = (
    "*No measured run of the current command is committed yet.* To fill this table: "
    "`python -m paretoq_jax.quickstart`, then `mkdir -p reports/quickstart && cp "
    "runs/quickstart/quickstart.json reports/quickstart/` and `python -m paretoq_jax.report "
    "--readme`."
)


def _plain_qat(r: Mapping[str, Any], cells: Mapping[str, dict]) -> dict[str, Any] | None:
    """The plain-QAT row beside the quickstart's result: the committed cell its record names
    (``plain_qat.source``: ``<results file>, cell <name>``) as that file has it now, so a cell
    run again after the quickstart shows its new number; the record's copy if the cell is
    gone."""
    ref = r.get("plain_qat")
    if not ref:
        return None
    cell = cells.get(str(ref.get("source", "")).rpartition(", cell ")[2])
    if cell is None or cell.get("status", "ok") != "ok":
        return dict(ref)
    return {"val_ppl": cell["val_ppl"], "tokens": cell.get("tokens_seen", ref["tokens"]),
            "lr": cell.get("lr", ref["lr"]), "source": ref["source"]}  # fmt: skip


def quickstart_block(r: Mapping[str, Any], cells: Mapping[str, dict] | None = None) -> str:
    """The quickstart's measured table from its ``quickstart.json``; ``cells``: the committed
    ``smollm2-bits`` rows by name, for the plain-QAT row (:func:`_plain_qat`)."""
    c, sw = record_config(r), r.get("software", {})
    plain = _plain_qat(r, cells or {})
    t = c["train"]
    seq = c["data"].get("train_seq_len") or c["data"]["seq_len"]
    tokens = t["steps"] * t["batch_size"] * seq
    label = f"{Path(r['model']).name}, {r['bits']:g}-bit {r['method'].upper()}"
    val = f"last {c['data']['val_blocks']} blocks of {c['data']['seq_len']} tokens"
    step_s = r["train_wall_s"] / max(r["train_steps"], 1)
    body = [
        [f"validation perplexity, float ({val})", num(r["ppl_float"])],
        ["validation perplexity, round-to-nearest (ParetoQ scale init, no training)",
         num(r["ppl_rtn"])],
        *([[f"validation perplexity, plain QAT ({plain['tokens']:,} tokens, lr "
            f"{lr(plain['lr'])}; not rerun by the quickstart: {plain['source']})",
            num(plain["val_ppl"])]] if plain else []),
        [f"validation perplexity, ParetoQ QAT, {r['train_steps']} steps of {t['batch_size']}x{seq} "
         f"tokens ({tokens:,} tokens), lr {lr(t['optimizer']['lr'])}"
         + (f", {r['recipe']}" if r.get("recipe") else ""), f"**{num(r['ppl_qat'])}**"],
        ["parameters", f"{r['params'] / 1e6:.1f} M"],
        ["size, bf16 (theory)", f"{r['bytes_bf16'] / _MIB:.1f} MiB"],
        ["size, packed export (codes + scales; embeddings, norms in float32)",
         f"{r['bytes_packed'] / _MIB:.1f} MiB"],
        ["size, GGUF", f"{r['bytes_gguf'] / _MIB:.1f} MiB"],
        ["QAT training speed (median)",
         f"{r['train_tokens_per_sec']:.0f} tokens/s ({step_s:.1f} s a step; "
         f"{r['train_wall_s'] / 60:.0f} min of training, {r['wall_s'] / 60:.0f} min in all)"],
        ["greedy generation from the packed integer codes, batch 1",
         f"{r['generate_tokens_per_sec']:.1f} tokens/s"],
    ]  # fmt: skip
    where = (
        f"Measured {r.get('finished_at', '')[:10]} on {sw.get('cpu_count', '?')} "
        f"{sw.get('backend', '?').upper()} cores (jax {sw.get('jax', '?')}, Python "
        f"{sw.get('python', '?')}); `reports/quickstart/quickstart.json` (config, loss curve, "
        "results)."
    )
    return where + "\n\n" + markdown_table([label, "value"], body)


def _by_name(rows: Sequence[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def _anchors(folder: Path) -> dict[str, float]:
    import yaml

    f = folder / "sweep.yaml"
    data = yaml.safe_load(f.read_text()) if f.is_file() else {}
    return {str(k): float(v) for k, v in ((data or {}).get("anchors") or {}).items()}


def bits_block(rows: Sequence[dict], anchors: Mapping[str, float]) -> str:
    """QAT and round-to-nearest perplexity per bit-width (and learning rate) and method."""
    train = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    rtn = {(r["bits"], r["method"]): r["val_ppl"] for r in rows if r["kind"] == "rtn"}
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in train)]
    groups = sorted({(r["bits"], r["lr"]) for r in train})
    body = []
    for b, rate in groups:
        cells = {r["method"]: r for r in train if (r["bits"], r["lr"]) == (b, rate)}
        row = [f"{bits_label(b)}, lr {lr(rate)}"]
        for m in methods:
            r = cells.get(m)
            ref = anchors.get(r["name"]) if r else None
            row.append("-" if r is None else num(r["val_ppl"]) + (f" [{num(ref)}]" if ref else ""))
        row.append(" / ".join(f"{m} {num(rtn[(b, m)])}" for m in methods if (b, m) in rtn) or "-")
        body.append(row)
    header = ["bits, lr", *(f"{m} QAT" for m in methods), "round-to-nearest"]
    fl = [r for r in rows if r["kind"] == "float"]
    tokens = sorted({r["tokens_seen"] for r in train})
    head = (
        f"Validation perplexity after {', '.join(f'{t:,}' for t in tokens)} training tokens "
        f"({len(train)} QAT cells; float: {num(fl[0]['val_ppl']) if fl else '-'}; the PyTorch "
        "reference's number in brackets):"
    )
    return head + "\n\n" + markdown_table(header, body)


def findings_block(rows: Sequence[dict]) -> str:
    """ParetoQ's findings as the report checks them on the committed cells."""
    return markdown_table(["claim", "verdict", "evidence"], [list(f) for f in findings(rows)])


def _recipe(c: Mapping[str, Any]) -> str:
    m, d, t = c["model"], c["data"], c["train"]
    opt, dist = t.get("optimizer", {}), t.get("distill", {})
    seq = d.get("train_seq_len") or d["seq_len"]
    if not t["steps"]:
        init = m.get("scale_init", "paretoq")
        return "round-to-nearest, no training" + (
            f", `model.scale_init: {init}`" if init != "paretoq" else ", ParetoQ scale init"
        )
    parts = [f"{t['steps']} x {t['batch_size']}x{seq}", f"lr {lr(opt['lr'])}"]
    if opt.get("warmup_steps"):
        parts.append(f"warmup {opt['warmup_steps']}")
    if opt.get("schedule") not in (None, "cosine"):
        parts.append(f"{opt['schedule']} schedule")
    if m.get("scale_init", "paretoq") != "paretoq":
        parts.append(f"`model.scale_init: {m['scale_init']}`")
    # the committed reports name the keys as those runs wrote them (byte-identical rebuilds)
    if dist.get("logits"):
        parts.append("distillation (`train.distill`)")
    if dist.get("layers"):
        parts.append(f"`train.distill_layers: {dist['layers']:g}`")
    if opt.get("scale_lr") is not None:
        parts.append(f"scales at lr {lr(opt['scale_lr'])} (`train.scale_lr`)")
    return ", ".join(parts)


def recovery_block(rows: Sequence[dict], baseline: dict | None, anchors: Mapping) -> str:
    """The round-to-nearest starts, then each recovery cell (and the plain-QAT baseline, with
    its anchor in ``anchors``) with its validation perplexity during training and at the end,
    best last."""
    train = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    rtn = [r for r in rows if r["kind"] == "rtn"]
    cells = rtn + ([baseline] if baseline else []) + sorted(train, key=lambda r: -r["val_ppl"])
    body = []
    for r in cells:
        vals = [
            (m["tokens"], m["val_ppl"]) for m in r.get("curve") or [] if finite(m.get("val_ppl"))
        ]
        during = "; ".join(f"{t:,}: {num(v)}" for t, v in vals[:-1]) or "-"
        ref = anchors.get(r["name"])
        where = " (smollm2-bits)" if r is baseline else ""
        body.append(
            [
                _recipe(record_config(r)) + where,
                during,
                f"**{num(r['val_ppl'])}**",
                num(ref) if ref else "-",
            ]
        )
    header = ["recipe (2-bit SEQ)", "during training (tokens: val ppl)", "val ppl", "reference"]
    return markdown_table(header, body)


def recovery_summary(rows: Sequence[dict], baseline: dict | None, anchors: Mapping) -> str:
    """One sentence: the best recipe against plain QAT and the reference with distillation."""
    train = [r for r in rows if r["kind"] == "train" and finite(r.get("val_ppl"))]
    best = min(train, key=lambda r: r["val_ppl"])
    out = f"Best: **{num(best['val_ppl'])}** validation perplexity ({_recipe(record_config(best))})"
    if baseline:
        out += f", {baseline['val_ppl'] / best['val_ppl']:.1f}x lower than plain QAT"
    ref = anchors.get("lr=0.0005,distill=true")
    if ref:
        out += f" and {ref / best['val_ppl']:.1f}x lower than the reference with distillation"
    minutes = (best.get("train_elapsed_s") or 0) / 60
    return out + (f"; {minutes:.0f} minutes of training on a CPU." if minutes else ".")


def blocks(reports: str | Path | None = None) -> dict[str, str]:
    """Every generated README block, by name, from the committed files under ``reports``."""
    root = Path(reports) if reports is not None else REPORTS_DIR
    out: dict[str, str] = {}
    bits_dir = root / "smollm2-bits"
    baseline, base_ref = None, None
    bits_rows = load_rows(bits_dir) if (bits_dir / "results.json").is_file() else []
    qs = root / "quickstart" / "quickstart.json"
    out["quickstart"] = (
        quickstart_block(json.loads(qs.read_text()), _by_name(bits_rows))
        if qs.is_file()
        else NO_QUICKSTART
    )
    if bits_rows:
        bits_anchors = _anchors(bits_dir)
        out["smollm2-bits"] = bits_block(bits_rows, bits_anchors)
        out["smollm2-bits-findings"] = findings_block(bits_rows)
        baseline = _by_name(bits_rows).get("bits=2,method=seq")
        base_ref = bits_anchors.get("bits=2,method=seq")
    rec_dir = root / "smollm2-recovery"
    if (rec_dir / "results.json").is_file():
        rows = load_rows(rec_dir)
        anchors = _anchors(rec_dir)
        if baseline is not None and base_ref is not None:
            anchors[baseline["name"]] = base_ref
        out["smollm2-recovery"] = recovery_block(rows, baseline, anchors)
        out["smollm2-recovery-summary"] = recovery_summary(rows, baseline, anchors)
    scaling_dir = root / "scaling"
    if (scaling_dir / "results.json").is_file():
        rows = load_rows(scaling_dir)
        out["scaling-budget"] = budget_block(rows)
        out["scaling-frontier"] = frontier_block(rows)
    return out


def update_readme(
    path: str | Path | None = None,
    *,
    check: bool = False,
    make: Callable[[], dict[str, str]] = blocks,
) -> list[str]:
    """Rewrite the generated blocks of ``path`` (default: the checkout's README.md); returns the
    names of the blocks that differed (with ``check``, nothing is written). A block the README
    marks but the reports cannot make is an error."""
    path = Path(path) if path is not None else README
    text = path.read_text()
    made = make()
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in made:
            raise FileNotFoundError(
                f"{path}: block generated:{name} has no committed results to come from (no "
                f"reports/.../results.json or quickstart.json for it)"
            )
        body = made[name].rstrip("\n") + "\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(sub, text)
    if changed and not check:
        path.write_text(new)
    return changed
