"""The from-scratch scaling study's tables and verdicts (issue 21, docs/scaling.md).

Built from the rows of the QAT stage (`configs/sweeps/scaling-qat.yaml`, committed as
``reports/scaling/results.json``). A row's *size* and *float start* come from its
``model.path``: ``.../scaling-s2-step450`` is size ``s2`` after 450 float steps, a random-init
row (``configs/models/scaling-s2``) starts at step 0. Its *float fraction* is
``start / (start + train.steps)``: every cell of a size has the same total budget.

- :func:`budget_block`: validation perplexity by size x bits x float fraction, the best fraction
  per row, and the verdict on ParetoQ Sec. 2.1 ("~90% float then ~10% QAT beats QAT from scratch
  and a 50/50 split");
- :func:`frontier_block`: perplexity against model size in bits after the same QAT budget from
  the same float start step, the Pareto frontier, and the verdict on "at equal size, 1.58 / 2 /
  3 bits beat 4 bits".

Seeds: cells that differ only in ``train.seed`` are averaged and their spread (max - min) shown;
a verdict that hinges on a difference smaller than the largest measured seed spread is marked
"within noise".
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from paretoq_jax.analysis import pareto_frontier

from .numbers import num

__all__ = ["budget_block", "cell_facts", "frontier_block", "frontier_section", "is_scaling_rows"]

_START = re.compile(r"scaling-(?P<size>s\d+)(?:-step(?P<step>\d+))?$")
FRONTIER_BITS = (1.0, 1.58, 2.0, 3.0, 4.0)


def _bits(b: Any) -> float:
    return round(float(b), 2)


def _bits_name(b: float) -> str:
    return "float" if b >= 16 else f"{b:g}-bit"


def cell_facts(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{size, start, steps, budget, fraction, bits, seed}`` of a scaling row (None when not
    one); ``budget``: total training tokens, float start plus this cell's."""
    cfg = row.get("config") or {}
    model = cfg.get("model", {})
    path = str(row.get("overrides", {}).get("model.path", model.get("path", ""))).rstrip("/")
    m = _START.search(path)
    if m is None:
        return None
    start = int(m["step"] or 0)
    steps = int(row.get("steps") or 0)
    per_step = int(row.get("batch_size") or 0) * int(row.get("seq_len") or 0)
    return {
        "size": m["size"],
        "start": start,
        "steps": steps,
        "budget": (start + steps) * per_step,
        "fraction": start / (start + steps) if start + steps else float("nan"),
        "bits": _bits(row.get("bits", model.get("bits", 16))),
        "seed": int(cfg.get("train", {}).get("seed", 0)),
    }


def is_scaling_rows(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``rows`` come from the scaling study (some row's start is a scaling model)."""
    return any(cell_facts(r) is not None for r in rows)


def _trained(rows: Sequence[Mapping[str, Any]]) -> list[tuple[dict, Mapping]]:
    out = []
    for r in rows:
        f = cell_facts(r)
        if f is not None and r.get("kind") == "train" and r.get("status") == "ok":
            out.append((f, r))
    return out


def _seed_groups(rows, key) -> dict[Any, list[float]]:
    g: dict[Any, list[float]] = defaultdict(list)
    for f, r in _trained(rows):
        k = key(f)
        if k is not None:
            g[k].append(float(r["val_ppl"]))
    return g


def _mean(v: Sequence[float]) -> float:
    return sum(v) / len(v)


def _cell(v: Sequence[float] | None, bold: bool = False) -> str:
    if not v:
        return "-"
    s = num(_mean(v))
    if len(v) > 1:
        s += f" ±{num((max(v) - min(v)) / 2)}"
    return f"**{s}**" if bold else s


def _noise(groups: Mapping[Any, list[float]]) -> float:
    """The largest relative seed spread ((max - min) / mean) over groups with >= 2 seeds."""
    spreads = [(max(v) - min(v)) / _mean(v) for v in groups.values() if len(v) > 1]
    return max(spreads) if spreads else float("nan")


def budget_block(rows: Sequence[Mapping[str, Any]]) -> str:
    """The budget-split table and its verdicts (Markdown)."""
    groups = _seed_groups(
        rows, lambda f: (f["size"], f["budget"], f["bits"], round(f["fraction"], 3))
    )
    if not groups:
        return "*No budget-split cell has finished yet.*"
    fracs = sorted({k[3] for k in groups})
    noise = _noise(groups)
    lines = [
        "Validation perplexity (32,768 held-out tokens) after the same total budget per size, "
        "by the fraction of it spent on float pretraining (the rest: QAT, or at `float` the "
        "same decay in float). ± is half the spread of two seeds where both ran; bold: the "
        "best fraction of the row.",
        "",
        "| size | tokens | bits | " + " | ".join(f"float {x:g}" for x in fracs) + " | best |",
        "|---|---|---|" + "---|" * (len(fracs) + 1),
    ]
    verdicts = []
    keys = sorted({k[:3] for k in groups}, key=lambda k: (int(k[0][1:]), k[1], k[2]))
    for size, budget, bits in keys:
        row = {x: groups.get((size, budget, bits, x)) for x in fracs}
        have = {x: _mean(v) for x, v in row.items() if v}
        best = min(have, key=have.get)
        cells = [_cell(row[x], bold=(x == best and len(have) > 1)) for x in fracs]
        label = f"| {size} | {budget:,} | {_bits_name(bits)} | "
        lines.append(label + " | ".join(cells) + f" | {best:g} |")
        if bits < 16:
            verdicts.append(_budget_verdict(f"{size}, {budget:,} tokens", bits, have, noise))
    lines += [
        "",
        "| size, budget, bits | verdict: ~90% float then QAT is best | evidence |",
        "|---|---|---|",
    ]
    lines += verdicts
    lines += ["", _noise_line(noise)]
    return "\n".join(lines)


def _noise_line(noise: float) -> str:
    if math.isnan(noise):
        return (
            "Noise: no cell has a second seed yet, so no difference here is known to exceed "
            "seed noise."
        )
    return (
        f"Noise: the largest seed spread measured is {noise:.1%} of the perplexity; differences "
        "smaller than that are marked within noise."
    )


def _budget_verdict(size: str, bits: float, have: Mapping[float, float], noise: float) -> str:
    near = [x for x in have if 0.8 <= x <= 0.95]
    far = [x for x in have if x <= 0.5]
    ev = "; ".join(f"{x:g}: {num(v)}" for x, v in sorted(have.items()))
    if not near or not far:
        return f"| {size}, {_bits_name(bits)} | not measured (need 0.8-0.95 and 0 or 0.5) | {ev} |"
    best_near = min(have[x] for x in near)
    best_far = min(have[x] for x in far)
    margin = (best_far - best_near) / best_near
    if best_near < best_far:
        verdict = "holds"
        if min(have, key=have.get) not in near:
            verdict = "partly (0.8-0.95 beats 0 and 0.5, but another fraction is best)"
    else:
        verdict = "does not hold"
    if not math.isnan(noise) and abs(margin) < noise:
        verdict += " (within noise)"
    return f"| {size}, {_bits_name(bits)} | {verdict} | {ev}; margin {margin:+.1%} |"


def frontier_block(rows: Sequence[Mapping[str, Any]], starts: Sequence[int] = (450, 225)) -> str:
    """One size-frontier section per float start step in ``starts`` that has cells."""
    parts = [frontier_section(rows, s) for s in starts]
    found = [p for p in parts if not p.startswith("*No cell")]
    return "\n\n".join(found) if found else parts[0]


def frontier_section(rows: Sequence[Mapping[str, Any]], start: int) -> str:
    """The size-frontier table, the Pareto frontier and the per-bit-width verdicts of the
    cells started from float step ``start``."""
    groups = _seed_groups(rows, lambda f: (f["size"], f["bits"]) if f["start"] == start else None)
    if not groups:
        return f"*No cell started from float step {start} has finished yet.*"
    size_of: dict[tuple[str, float], float] = {}
    for f, r in _trained(rows):
        if f["start"] == start:
            size_of[(f["size"], f["bits"])] = float(r["size_bits"]) / 1e6
    sizes = sorted({k[0] for k in groups}, key=lambda s: int(s[1:]))
    bits_all = sorted({k[1] for k in groups})
    lines = [
        f"Validation perplexity after float pretraining to step {start} and the same QAT "
        "budget at every bit-width (model size in Mbit in brackets: quantized weights at their "
        "bits, ternary at log2 3, the rest at 16 bits).",
        "",
        "| size | " + " | ".join(_bits_name(b) for b in bits_all) + " |",
        "|---|" + "---|" * len(bits_all),
    ]
    for s in sizes:
        cells = []
        for b in bits_all:
            v = groups.get((s, b))
            cells.append(f"{_cell(v)} [{size_of[(s, b)]:.2f}]" if v else "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    keys = [k for k in groups if k[1] < 16]
    front = pareto_frontier([size_of[k] for k in keys], [_mean(groups[k]) for k in keys])
    lines += [
        "",
        "Pareto frontier (quantized cells, smallest first): "
        + ", ".join(
            f"{keys[i][0]} {_bits_name(keys[i][1])} ({size_of[keys[i]]:.2f} Mbit: "
            f"{num(_mean(groups[keys[i]]))})"
            for i in front
        )
        + ".",
        "",
        "| claim | verdict | evidence |",
        "|---|---|---|",
    ]
    # seed noise measured on any cell of the study (a second seed ran for some starts only)
    noise = _noise(_seed_groups(rows, lambda f: (f["size"], f["start"], f["steps"], f["bits"])))
    curve, dropped = scaling_sizes(groups, sizes)
    for b in (1.0, 1.58, 2.0, 3.0):
        lines.append(_frontier_verdict(b, groups, size_of, curve, noise))
    lines += ["", _noise_line(noise)]
    for s, (f, prev, fp) in dropped.items():
        lines += [
            "",
            f"{s} is left out of the verdicts: its float model ({num(f)}) is worse than the "
            f"smaller {prev}'s ({num(fp)}) after the same tokens, so at this budget it is not "
            "a larger point on a scaling curve (not better, only bigger); interpolating through "
            "it would compare bit-widths across a training failure.",
        ]
    return "\n".join(lines)


def scaling_sizes(
    groups: Mapping[tuple[str, float], Sequence[float]], sizes: Sequence[str]
) -> tuple[list[str], dict[str, tuple[float, str, float]]]:
    """The sizes (smallest first) whose float reference (bits 16, same start) improves on every
    smaller kept size's: the points of a scaling curve. Returns ``(kept, dropped)`` with
    ``dropped[size] = (its float ppl, the best smaller size, that size's float ppl)``; sizes
    without a float cell are kept."""
    kept: list[str] = []
    dropped: dict[str, tuple[float, str, float]] = {}
    best: tuple[str, float] | None = None
    for s in sizes:
        f = _mean(groups[(s, 16.0)]) if (s, 16.0) in groups else None
        if f is not None and best is not None and f >= best[1]:
            dropped[s] = (f, best[0], best[1])
            continue
        kept.append(s)
        if f is not None:
            best = (s, f)
    return kept, dropped


def _interp(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """log-perplexity interpolated linearly in log size between measured points (None outside)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def _frontier_verdict(b, groups, size_of, sizes, noise) -> str:
    claim = f"{_bits_name(b)} beats 4-bit at equal size"
    low = [(size_of[(s, b)], _mean(groups[(s, b)])) for s in sizes if (s, b) in groups]
    four = [(s, size_of[(s, 4.0)], _mean(groups[(s, 4.0)])) for s in sizes if (s, 4.0) in groups]
    ev, wins, total, close = [], 0, 0, False
    for s, x, y in four:
        at = _interp(low, x)
        if at is None:
            continue
        total += 1
        wins += at < y
        close |= not math.isnan(noise) and abs(at - y) / y < noise
        ev.append(f"4-bit {s} ({x:.2f} Mbit) {num(y)} vs {_bits_name(b)} at that size {num(at)}")
    if total == 0:
        return (
            f"| {claim} | not measured | needs {_bits_name(b)} cells on both sides of a 4-bit "
            "model's size (more sizes) |"
        )
    verdict = "holds" if wins == total else "does not hold" if wins == 0 else "partly"
    if close:
        verdict += " (within noise)"
    return f"| {claim} | {verdict} | {'; '.join(ev)} |"
