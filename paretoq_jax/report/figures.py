"""The report's figures (matplotlib, Agg backend: no display needed). Each function takes the
result rows of ``SWEEP_DIR/results.json`` and writes one figure, SVG or PNG by the path's suffix.

Inside :func:`style` the output is a function of the rows and matplotlib's version alone:
matplotlib's default style (no ``matplotlibrc``), a fixed SVG hash salt, text kept as SVG text,
and no date in the metadata, so a committed report's figures regenerate byte for byte."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from paretoq_jax.analysis import pareto_frontier  # noqa: E402

from .numbers import finite  # noqa: E402

__all__ = [
    "BITS_ORDER",
    "style",
    "plot_pareto",
    "plot_ablation",
    "plot_transition",
    "plot_transition_over_training",
    "plot_loss_curves",
]

BITS_ORDER = (1, 1.58, 2, 3, 4, 16, 32)
METHOD_ORDER = ("elastic", "seq", "lsq", "absmean", "minmax")
_BIT_COLORS = {1: "#7b3294", 1.58: "#c2a5cf", 2: "#d7191c", 3: "#fdae61", 4: "#2c7bb6"}
_METHOD_MARKERS = {"elastic": "P", "seq": "o", "lsq": "s", "absmean": "^", "minmax": "v"}
_DPI = 110


def bits_label(b: float) -> str:
    return "float" if b in (16, 32) else f"{b:g}-bit"


def _color(b: float) -> str:
    return _BIT_COLORS.get(b, "black")


# what makes the saved bytes depend on anything but the figure: ids hashed with a random salt,
# glyphs drawn from the system's fonts, the save date
_REPRODUCIBLE = {"svg.hashsalt": "paretoq_jax", "svg.fonttype": "none", "path.simplify": True}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """matplotlib's default style (whatever a ``matplotlibrc`` says) plus :data:`_REPRODUCIBLE`."""
    with plt.style.context("default"), matplotlib.rc_context(_REPRODUCIBLE):
        yield


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    metadata = {"Date": None} if fmt == "svg" else None
    with matplotlib.rc_context(_REPRODUCIBLE):
        fig.savefig(path, dpi=_DPI, format=fmt, metadata=metadata)
    plt.close(fig)
    return path


def plot_pareto(rows: Sequence[dict], path: Path, metric: str = "val_ppl") -> Path:
    """Quality (``val_ppl``: lower is better, log axis; ``accuracy``: higher) against model size
    in Mbit; filled markers are QAT cells, hollow ones round-to-nearest; the frontier (over all
    cells) is the dashed line."""
    lower = metric != "accuracy"
    pts = [r for r in rows if finite(_metric(r, metric)) and finite(r.get("size_bits"))]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in pts:
        b, m = r["bits"], r.get("method")
        color = _color(b)
        kw = dict(s=60, marker=_METHOD_MARKERS.get(m, "*"), edgecolors=color, linewidths=1.5)
        if r["kind"] == "float":
            kw.update(marker="*", s=160)
        face = color if r["kind"] != "rtn" else "none"
        ax.scatter(r["size_bits"] / 1e6, _metric(r, metric), c=face, **kw)
    if pts:
        idx = pareto_frontier(
            [r["size_bits"] for r in pts], [_metric(r, metric) for r in pts], minimize=lower
        )
        fx = [pts[i]["size_bits"] / 1e6 for i in idx]
        fy = [_metric(pts[i], metric) for i in idx]
        ax.step(fx, fy, where="post", ls="--", color="0.3", lw=1, label="Pareto frontier", zorder=0)
        for i in idx:
            r = pts[i]
            ax.annotate(
                f"{'RTN ' if r['kind'] == 'rtn' else ''}{bits_label(r['bits'])} "
                f"{r.get('method') or ''}".strip(),
                (r["size_bits"] / 1e6, _metric(r, metric)),
                textcoords="offset points", xytext=(6, 4), fontsize=8,
            )  # fmt: skip
    if lower and pts and all(_metric(r, metric) > 0 for r in pts):
        ax.set_yscale("log")
    ax.set_xlabel("model size (Mbit): quantized weights at their bits, the rest at 16")
    ax.set_ylabel("validation perplexity" if lower else "zero-shot accuracy")
    ax.set_title("Quality vs model size")
    _legend(ax, rows)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def _metric(r: dict, metric: str):
    if metric == "accuracy":
        acc = r.get("accuracy")
        if isinstance(acc, dict):
            return acc.get("mean", next(iter(acc.values()), None)) if acc else None
        return acc
    return r.get(metric)


def _legend(ax, rows: Sequence[dict]) -> None:
    from matplotlib.lines import Line2D

    handles = []
    bits = sorted({r["bits"] for r in rows if r["bits"] in _BIT_COLORS})
    for b in bits:
        handles.append(Line2D([], [], ls="", marker="o", color=_color(b), label=bits_label(b)))
    methods = [m for m in METHOD_ORDER if any(r.get("method") == m for r in rows)]
    for m in methods:
        handles.append(
            Line2D([], [], ls="", marker=_METHOD_MARKERS[m], color="0.4", mfc="0.4", label=m)
        )
    if any(r["kind"] == "rtn" for r in rows):
        handles.append(
            Line2D([], [], ls="", marker="o", color="0.4", mfc="none", label="RTN (no QAT)")
        )
    if any(r["kind"] == "float" for r in rows):
        handles.append(Line2D([], [], ls="", marker="*", color="black", ms=10, label="float"))
    handles.append(Line2D([], [], ls="--", color="0.3", label="Pareto frontier"))
    ax.legend(handles=handles, fontsize=8, loc="best", ncol=2)


def plot_ablation(table: dict, rtn: dict, path: Path) -> Path:
    """Grouped bars: for each bit-width, validation perplexity per quantizer after QAT (solid)
    and at round-to-nearest (hatched, behind)."""
    bits = [b for b in BITS_ORDER if any(b == k[0] for k in (*table, *rtn))]
    methods = [m for m in METHOD_ORDER if any(m == k[1] for k in (*table, *rtn))]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(bits) + 2), 4.5))
    width = 0.8 / max(len(methods), 1)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(bits))]
        r = [rtn.get((b, m), math.nan) for b in bits]
        q = [table.get((b, m), math.nan) for b in bits]
        ax.bar(xs, r, width * 0.95, color="none", edgecolor=cmap(j), hatch="///", lw=0.8)
        ax.bar(xs, q, width * 0.95, color=cmap(j), label=m)
    ax.set_xticks(range(len(bits)), [bits_label(b) for b in bits])
    ax.set_yscale("log")
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title("Quantizer ablation: QAT (solid) vs round-to-nearest (hatched)")
    ax.legend(fontsize=8, title="method", title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return _save(fig, path)


def plot_transition(rows: Sequence[dict], path: Path) -> Path:
    """The learning transition: relative L1 change of the quantized layers' float weights and
    the fraction of integer codes changed from the start, per bit-width (QAT cells)."""
    cells = [r for r in rows if r["kind"] == "train" and finite(r.get("relative_l1"))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    bits = [b for b in BITS_ORDER if any(r["bits"] == b for r in cells)]
    pos = {b: i for i, b in enumerate(bits)}
    for ax, key, label in (
        (axes[0], "relative_l1", "||W_T - W_0||_1 / ||W_0||_1"),
        (axes[1], "codes_changed", "fraction of integer codes changed"),
    ):
        for r in cells:
            m = r.get("method")
            ax.scatter(
                pos[r["bits"]], r[key], marker=_METHOD_MARKERS.get(m, "o"), s=50,
                color=_color(r["bits"]), label=m,
            )  # fmt: skip
        ax.set_xticks(range(len(bits)), [bits_label(b) for b in bits])
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=8, title="method", title_fontsize=8)
    axes[0].set_title("Weight movement from the float start")
    axes[1].set_title("Codes changed from the start")
    return _save(fig, path)


def plot_transition_over_training(
    rows: Sequence[dict], interval_codes: dict[str, list[tuple[int, float]]], path: Path
) -> Path:
    """Over training: relative L1 from the start at each checkpoint (left) and the fraction of
    codes changed between consecutive quant-stat logs of ``metrics.jsonl`` (right)."""
    cells = [r for r in rows if r["kind"] == "train" and r.get("transition")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {}
    for r in cells:
        m = r.get("method")
        styles[r["name"]] = dict(color=_color(r["bits"]), marker=_METHOD_MARKERS.get(m, "o"),
                                 label=f"{bits_label(r['bits'])} {m}")  # fmt: skip
        t = [{"step": 0, "relative_l1": 0.0}, *r["transition"]]
        axes[0].plot(
            [p["step"] for p in t], [p["relative_l1"] for p in t], ms=4, **styles[r["name"]]
        )
    ys = []
    for name, pts in interval_codes.items():
        if name in styles and pts:
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], ms=4, **styles[name])
            ys += [p[1] for p in pts]
    axes[0].set_ylabel("relative L1 change from the start")
    axes[1].set_ylabel("fraction of codes changed since the previous log")
    if ys and min(ys) > 0:
        axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    if cells:
        axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_title("Weight movement over training")
    axes[1].set_title("Code flips per logging interval")
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, dict], path: Path) -> Path:
    """Training loss against tokens seen, one panel per bit-width, one line per cell."""
    bits = [b for b in BITS_ORDER if any(c["bits"] == b for c in curves.values())]
    n = max(len(bits), 1)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for k, b in enumerate(bits):
        ax = axes[k // cols][k % cols]
        cells = sorted((c for c in curves.values() if c["bits"] == b), key=lambda c: c["label"])
        by_method = len({c.get("method") for c in cells}) == len(cells)
        for j, c in enumerate(cells):
            m = c.get("method")
            # one line per method: the method's color, as in the ablation chart
            color = cmap(METHOD_ORDER.index(m)) if by_method and m in METHOD_ORDER else cmap(j % 10)
            ax.plot(c["tokens"], c["loss"], color=color, lw=1.2, label=c["label"])
        ax.set_title(bits_label(b))
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("train loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(bits), rows_n * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("Training loss per cell")
    return _save(fig, path)


def plot_val_curves(curves: dict[str, dict], path: Path) -> Path:
    """Validation perplexity (log scale) against tokens seen, one line per cell that evaluated
    during training (``train.logging.eval_every``): how fast each recipe recovers per token."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cmap = plt.get_cmap("tab10")
    cells = sorted((name, c) for name, c in curves.items() if c.get("val"))
    for j, (name, c) in enumerate(cells):  # labelled by the full cell name: bits included
        t, v = zip(*c["val"], strict=True)
        ax.plot(t, v, marker="o", ms=3, lw=1.2, color=cmap(j % 10), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("Validation perplexity during training")
    return _save(fig, path)
