"""``build_report(sweep_dir)``: figures and a Markdown page from ``SWEEP_DIR/results.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from paretoq_jax.analysis import pareto_frontier
from paretoq_jax.run.records import curve_from_file
from paretoq_jax.sweep.runner import collect_results, write_json_atomic, write_table

from . import figures as F
from .numbers import finite

__all__ = ["build_report", "ablation_table", "findings", "load_rows"]

LEARNED = ("elastic", "seq", "lsq")
STATISTIC = ("absmean", "minmax")


def load_rows(sweep_dir: Path) -> list[dict]:
    """The finished cells' rows: the cells' ``result.json`` files, else ``results.json`` (a
    committed report folder). A row without its metrics ``curve`` (written before rows carried
    one) gets it from the cell's ``metrics.jsonl`` when that is there."""
    sweep_dir = Path(sweep_dir)
    rows = collect_results(sweep_dir)
    if not rows and (sweep_dir / "results.json").is_file():
        rows = json.loads((sweep_dir / "results.json").read_text())
    if not rows:
        raise FileNotFoundError(
            f"no finished cells in {sweep_dir} (no cells/*/result.json): run "
            "`python -m paretoq_jax.sweep --config SWEEP.yaml --out DIR` first"
        )
    for r in rows:
        for k in ("val_ppl", "val_loss", "relative_l1", "codes_changed"):
            if isinstance(r.get(k), str):  # "nan"/"inf" written as strings
                r[k] = float(r[k])
        metrics = sweep_dir / "cells" / r["name"] / "metrics.jsonl"
        if r["kind"] == "train" and "curve" not in r and metrics.is_file():
            r["curve"] = curve_from_file(metrics)
    return rows


def ablation_table(rows: Sequence[dict], kind: str = "train", key: str = "val_ppl") -> dict:
    """``{(bits, method): best value of key}`` over the cells of ``kind`` (lowest for perplexity
    and loss, highest otherwise), i.e. the best over the sweep's other grid keys."""
    better = min if key in ("val_ppl", "val_loss") else max
    out: dict = {}
    for r in rows:
        if r["kind"] != kind or not finite(r.get(key)):
            continue
        k = (r["bits"], r.get("method"))
        out[k] = r[key] if k not in out else better(out[k], r[key])
    return out


def _mean(xs):
    xs = [x for x in xs if finite(x)]
    return sum(xs) / len(xs) if xs else None


def findings(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """ParetoQ's findings, each checked on the measured cells: ``(claim, verdict, evidence)``
    with verdict ``holds`` / ``does not hold`` / ``partly`` / ``not measured``."""
    q, rtn = ablation_table(rows), ablation_table(rows, "rtn")
    out = []

    def verdict(results: list[bool]) -> str:
        if not results:
            return "not measured"
        return "holds" if all(results) else ("does not hold" if not any(results) else "partly")

    def unmeasured(ev: list[str], wanted: Sequence[float], seen: set) -> list[str]:
        missing = [f"{b:g}" for b in wanted if b not in seen]
        return ev + [f"bit-widths not measured: {', '.join(missing)}"] if ev and missing else ev

    res, ev, seen = [], [], set()
    for b in (1.58, 2, 3, 4):
        s, lq = q.get((b, "seq")), q.get((b, "lsq"))
        if s is None or lq is None:
            continue
        want_seq = b <= 2
        res.append((s < lq) == want_seq)
        ev.append(f"{b:g}-bit SEQ {s:.4g} vs LSQ {lq:.4g}")
        seen.add(b)
    ev = unmeasured(ev, (1.58, 2, 3, 4), seen)
    out.append(
        ("SEQ beats LSQ at 1.58 and 2 bits; LSQ beats SEQ at 3 and 4", verdict(res), "; ".join(ev))
    )

    res, ev, seen = [], [], set()
    for b in (1, 1.58, 2, 3, 4):
        learned = [q[(b, m)] for m in LEARNED if (b, m) in q]
        stats = [q[(b, m)] for m in STATISTIC if (b, m) in q]
        if learned and stats:
            res.append(min(learned) < min(stats))
            ev.append(f"{b:g}-bit learned {min(learned):.4g} vs statistic {min(stats):.4g}")
            seen.add(b)
    ev = unmeasured(ev, (1, 1.58, 2, 3, 4), seen)
    out.append(
        ("Learned scales beat absmean/minmax at every bit-width", verdict(res), "; ".join(ev))
    )

    res, ev, seen = [], [], set()
    for b in (1, 1.58, 2):
        pairs = [(rtn[k] / q[k], k[1]) for k in q if k[0] == b and k in rtn and q[k] > 0]
        if pairs:
            ratio, m = max(pairs)
            res.append(ratio >= 10)
            ev.append(f"{b:g}-bit RTN/QAT = {ratio:.3g}x ({m})")
            seen.add(b)
    ev = unmeasured(ev, (1, 1.58, 2), seen)
    out.append(
        (
            "QAT beats round-to-nearest by orders of magnitude below 3 bits",
            verdict(res),
            "; ".join(ev),
        )
    )

    out.append(_movement_finding(rows))
    return out


def _movement_finding(rows: Sequence[dict]) -> tuple[str, str, str]:
    """ParetoQ Sec. 2.2: QAT at <= 2 bits "reconstructs" (weights move far from their float
    start), at 3-4 bits it "compensates" (they stay close). With AdamW the distance moved grows
    about linearly with the learning rate, so cells trained at a learning rate both groups share
    decide the finding when there are any; otherwise, when the two groups were trained at
    different rates, it is also checked per unit of learning rate, and is not shown if the
    difference goes away there."""
    claim = "Weights move much more at <= 2 bits than at 3 and 4"
    train = [r for r in rows if r["kind"] == "train" and finite(r.get("relative_l1"))]
    low = [r for r in train if r["bits"] <= 2]
    high = [r for r in train if r["bits"] in (3, 4)]
    if not low or not high:
        return claim, "not measured", ""
    shared = {r.get("lr") for r in low} & {r.get("lr") for r in high}
    shared = {x for x in shared if finite(x)}
    if shared:
        lo, hi = (_mean(r["relative_l1"] for r in g if r.get("lr") in shared) for g in (low, high))
        verdict = "holds" if lo > 1.5 * hi else ("partly" if lo > hi else "does not hold")
        lrs = "/".join(f"{x:g}" for x in sorted(shared))
        ev = [f"at the same lr ({lrs}): mean relative L1 {lo:.3g} at <= 2 bits vs {hi:.3g} at 3-4"]
        clo, chi = (
            _mean(r.get("codes_changed") for r in g if r.get("lr") in shared) for g in (low, high)
        )
        if clo is not None and chi is not None:
            ev.append(f"codes changed {clo:.3g} vs {chi:.3g}")
        alo, ahi = (_mean(r["relative_l1"] for r in g) for g in (low, high))
        ev.append(f"all cells: {alo:.3g} vs {ahi:.3g}")
        return claim, verdict, "; ".join(ev)
    lo, hi = (_mean(r["relative_l1"] for r in g) for g in (low, high))
    verdict = "holds" if lo > 1.5 * hi else ("partly" if lo > hi else "does not hold")
    ev = [f"mean relative L1 {lo:.3g} at <= 2 bits vs {hi:.3g} at 3-4 bits"]
    clo, chi = (_mean(r.get("codes_changed") for r in g) for g in (low, high))
    if clo is not None and chi is not None:
        ev.append(f"codes changed {clo:.3g} vs {chi:.3g}")
    lrs = [{r.get("lr") for r in g} for g in (low, high)]
    if all(finite(x) and x > 0 for g in lrs for x in g) and lrs[0] != lrs[1]:
        nlo, nhi = (_mean(r["relative_l1"] / r["lr"] for r in g) for g in (low, high))
        lo_lr, hi_lr = ("/".join(f"{x:g}" for x in sorted(g)) for g in lrs)
        ev.append(
            f"learning rates differ ({lo_lr} vs {hi_lr}): per unit of lr {nlo:.3g} vs {nhi:.3g}"
        )
        if verdict != "does not hold" and nlo <= nhi:
            verdict = "not shown (lr differs)"
    return claim, verdict, "; ".join(ev)


def _val_curve_section(curves: dict[str, dict]) -> list[str]:
    """Markdown: validation perplexity at each evaluation during training, one row per cell."""
    tokens = sorted({t for c in curves.values() for t, _ in c["val"]})
    return [
        "## Validation perplexity during training",
        "",
        "Cells that evaluated during training (`train.eval_every`), by training tokens seen.",
        "",
        _md_table(
            ["cell"] + [f"{t:,}" for t in tokens],
            [[name] + [dict(c["val"]).get(t) for t in tokens] for name, c in curves.items()],
        ),
        "",
        "![validation curves](val_curves.svg)",
        "",
    ]


def _fmt(x, digits: int = 4) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


def _md_table(header: Sequence[str], body: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def _anchor_section(rows: Sequence[dict], anchors: dict) -> list[str]:
    """Our validation perplexity beside the reference implementation's (the sweep's ``anchors``)."""
    if not anchors:
        return []
    by_name = {r["name"]: r for r in rows}
    body = []
    for cell, ref in anchors.items():
        ours = by_name.get(cell, {}).get("val_ppl")
        ratio = ours / float(ref) if finite(ours) else None
        body.append([cell, ours if ours is not None else "not run", float(ref), ratio])
    return [
        "## Against the reference implementation",
        "",
        "Validation perplexity of our cells and of the PyTorch reference with the same settings "
        "(the sweep file's `anchors`, from `docs/anchors.md`).",
        "",
        _md_table(["cell", "ours", "reference", "ours / reference"], body),
        "",
    ]


def _curves(rows: Sequence[dict]) -> tuple[dict, dict]:
    """From the rows' metrics ``curve``: per QAT cell the loss and validation points against
    tokens seen, and the mean fraction of codes flipped at each quant-stat log (by step)."""
    curves, interval = {}, {}
    for r in rows:
        if r["kind"] != "train":
            continue
        c = r.get("curve") or []
        loss = [(m["tokens"], m["loss"]) for m in c if "tokens" in m and finite(m.get("loss"))]
        curves[r["name"]] = {
            "bits": r["bits"], "method": r.get("method"),
            "label": r["name"].replace(f"bits={r['bits']:g},", ""),
            "tokens": [t for t, _ in loss], "loss": [v for _, v in loss],
            "val": [(m["tokens"], m["val_ppl"]) for m in c if finite(m.get("val_ppl"))],
        }  # fmt: skip
        interval[r["name"]] = [
            (m["step"], m["codes_changed"]) for m in c if finite(m.get("codes_changed"))
        ]
    return curves, interval


def _provenance_section(rows: Sequence[dict]) -> list[str]:
    """Markdown: which cells' numbers were copied from an earlier report rather than written by
    the sweep runner (``provenance``), what of them is missing, and how to measure them again."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("provenance"):
            groups.setdefault(json.dumps(r["provenance"], sort_keys=True), []).append(r)
    if not groups:
        return []
    md = [
        "## Where the numbers come from",
        "",
        "Every number on this page is computed from this folder's `results.json`. The rows "
        "marked `*` in the table of all cells are not complete records (config, metrics curve, "
        "final metrics) written by the sweep runner:",
        "",
    ]
    for key, rs in groups.items():
        p = json.loads(key)
        cells = ", ".join(f"`{r['name']}`" for r in rs)
        md.append(f"- {cells}: {p.get('source', '')}. Not committed: {p.get('missing', '-')}.")
    md += [
        "",
        "To measure them again, with the metrics curve and the config as run: "
        "`python -m paretoq_jax.sweep --config SWEEP.yaml --cell NAME`, then "
        "`python -m paretoq_jax.report SWEEP_DIR --out THIS_FOLDER`.",
        "",
    ]
    return md


def _star(r: dict) -> str:
    return r["name"] + (" *" if r.get("provenance") else "")


def is_report_dir(path: str | Path) -> bool:
    """A committed report folder: ``results.json`` and no ``cells/`` (not a sweep directory)."""
    path = Path(path)
    return (path / "results.json").is_file() and not (path / "cells").is_dir()


def build_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md``, its SVG figures and the rows it was built from (``results.json``,
    ``results.csv``, and the sweep file as ``sweep.yaml``) into ``out``.

    ``out`` defaults to ``SWEEP_DIR/report``, or to ``SWEEP_DIR`` itself when that is a report
    folder (:func:`is_report_dir`): a committed report regenerates in place, byte for byte.
    """

    sweep_dir = Path(sweep_dir)
    if out is None:
        out = sweep_dir if is_report_dir(sweep_dir) else sweep_dir / "report"
    out = Path(out)
    rows = load_rows(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, anchors = sweep_dir.name, {}
    sweep_file = sweep_dir / "sweep.yaml"
    if sweep_file.is_file():
        import yaml

        text = sweep_file.read_text()
        sweep = yaml.safe_load(text) or {}
        name, anchors = sweep.get("name", name), sweep.get("anchors") or {}
        if (out / "sweep.yaml").resolve() != sweep_file.resolve():
            (out / "sweep.yaml").write_text(text)
    write_json_atomic(out / "results.json", rows)  # in place too: the canonical form
    write_table(out, rows)
    with F.style():
        md = _page(rows, name, anchors, out)
    page = out / "report.md"
    page.write_text("\n".join(md))
    return page


def _page(rows: list[dict], name: str, anchors: dict, out: Path) -> list[str]:
    """Draw the figures into ``out``; return the lines of ``report.md``."""
    curves, interval = _curves(rows)
    trained = [r for r in rows if r["kind"] == "train"]
    with_loss = {k: c for k, c in curves.items() if c["loss"]}
    q, rtn = ablation_table(rows), ablation_table(rows, "rtn")
    F.plot_pareto(rows, out / "pareto.svg")
    has_acc = any(F._metric(r, "accuracy") is not None for r in rows)
    if has_acc:
        F.plot_pareto(rows, out / "pareto_accuracy.svg", metric="accuracy")
    F.plot_ablation(q, rtn, out / "ablation.svg")
    over_training = any(r.get("transition") for r in trained) or any(interval.values())
    if trained:  # figures of training need QAT cells
        F.plot_transition(rows, out / "transition.svg")
    if over_training:
        F.plot_transition_over_training(rows, interval, out / "transition_over_training.svg")
    if with_loss:
        F.plot_loss_curves(with_loss, out / "loss_curves.svg")
    val_curves = {k: c for k, c in curves.items() if c["val"]}
    if val_curves:
        F.plot_val_curves(val_curves, out / "val_curves.svg")
    no_qat = ["No QAT cell has finished yet.", ""]
    no_curve = ["No QAT cell of this folder has a committed metrics curve.", ""]

    md = [f"# Sweep report: {name}", ""]
    budgets = sorted({r.get("tokens_seen") for r in rows if r["kind"] == "train"} - {None})
    models = sorted({str(r.get("model_path")) for r in rows})
    md += [
        f"{len(rows)} finished cells ({sum(r['kind'] == 'train' for r in rows)} QAT, "
        f"{sum(r['kind'] == 'rtn' for r in rows)} round-to-nearest, "
        f"{sum(r['kind'] == 'float' for r in rows)} float) of sweep `{name}`; "
        f"model: {', '.join(f'`{m}`' for m in models)}; training tokens per QAT cell: "
        f"{', '.join(f'{b:,}' for b in budgets) or '-'}. Perplexity is on the validation blocks "
        "of the training config's data split. Generated by `python -m paretoq_jax.report`.",
        "",
        "## Quality vs model size",
        "",
        "Model size counts every quantized weight at its bit-width (ternary at log2(3) bits; the "
        "dense 2-bit storage in the table), every other parameter and one scale per output "
        "channel at 16 bits. Filled markers: QAT; hollow: round-to-nearest; dashed: the Pareto "
        "frontier.",
        "",
        "![pareto](pareto.svg)",
        "",
    ]
    if has_acc:
        md += ["![pareto accuracy](pareto_accuracy.svg)", ""]
    pts = [r for r in rows if finite(r.get("val_ppl")) and finite(r.get("size_bits"))]
    front = [
        pts[i] for i in pareto_frontier([r["size_bits"] for r in pts], [r["val_ppl"] for r in pts])
    ]
    md += [
        "Cells on the frontier:",
        "",
        _md_table(
            ["cell", "kind", "size (Mbit)", "size stored (Mbit)", "val ppl"],
            [
                [
                    r["name"],
                    r["kind"],
                    r["size_bits"] / 1e6,
                    r["size_bits_stored"] / 1e6,
                    r["val_ppl"],
                ]
                for r in front
            ],
        ),  # fmt: skip
        "",
        "## Quantizer ablation",
        "",
        "Validation perplexity after QAT (best over the sweep's other grid keys), round-to-nearest "
        "(RTN: the initialized quantized model, no training) in parentheses.",
        "",
    ]
    bits = [b for b in F.BITS_ORDER if any(k[0] == b for k in (*q, *rtn))]
    methods = [m for m in F.METHOD_ORDER if any(k[1] == m for k in (*q, *rtn))]

    def cell(b, m):
        a, r_ = q.get((b, m)), rtn.get((b, m))
        if a is None and r_ is None:
            return "-"
        return f"{_fmt(a)} ({_fmt(r_)})" if r_ is not None else _fmt(a)

    md += [
        _md_table(
            ["method"] + [F.bits_label(b) for b in bits],
            [[m] + [cell(b, m) for b in bits] for m in methods],
        ),
        "",
        "![ablation](ablation.svg)",
        "",
        "## Learning transition",
        "",
        "Relative L1 change of the quantized layers' float weights from their start, "
        "`||W_T - W_0||_1 / ||W_0||_1`, and the fraction of integer codes that differ from the "
        "start (QAT cells; ParetoQ Sec. 2.2).",
        "",
        _md_table(
            ["cell", "bits", "method", "relative L1", "codes changed"],
            [
                [
                    r["name"],
                    F.bits_label(r["bits"]),
                    r.get("method"),
                    r.get("relative_l1"),
                    r.get("codes_changed"),
                ]
                for r in rows
                if r["kind"] == "train"
            ],
        )
        if trained
        else "",
        "",
        *(
            [
                "![transition](transition.svg)",
                "",
                *(
                    ["![transition over training](transition_over_training.svg)", ""]
                    if over_training
                    else []
                ),
            ]
            if trained
            else no_qat
        ),  # fmt: skip
        *_anchor_section(rows, anchors),
        "## ParetoQ's findings, checked on these cells",
        "",
        _md_table(["claim", "verdict", "evidence"], findings(rows)),
        "",
        "## Loss curves",
        "",
        *(
            ["![loss curves](loss_curves.svg)", ""]
            if with_loss
            else no_curve
            if trained
            else no_qat
        ),
        *(_val_curve_section(val_curves) if val_curves else []),
        "## All cells",
        "",
        _md_table(
            [
                "#",
                "cell",
                "kind",
                "status",
                "size (Mbit)",
                "val ppl",
                "tokens",
                "rel. L1",
                "codes changed",
                "train s",
                "wall s (last run)",
            ],
            [
                [
                    r.get("index"),
                    _star(r),
                    r["kind"],
                    r.get("status"),
                    r["size_bits"] / 1e6,
                    r.get("val_ppl"),
                    r.get("tokens_seen"),
                    r.get("relative_l1"),
                    r.get("codes_changed"),
                    r.get("train_elapsed_s") or r.get("train_wall_s"),
                    r.get("wall_s"),
                ]
                for r in rows
            ],
        ),  # fmt: skip
        "",
        *_provenance_section(rows),
    ]
    return md
