"""Collectives of an optimized HLO module (``compiled.as_text()``), counted per step.

Each all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute is counted as
often as it runs: an instruction inside a ``while`` body (a scanned decoder layer, a gradient
accumulation micro-batch) counts ``known_trip_count`` times, nested loops multiply. For each
collective the bytes one device sends over the interconnect follow the ring algorithm over its
replica group of ``n`` devices (``S`` = the full, unsharded buffer):

- all-gather: ``S (n - 1) / n``  (``S`` = the output)
- reduce-scatter: ``S (n - 1) / n``  (``S`` = the input; XLA:TPU's ``all-reduce-scatter``
  fusions are an all-reduce of the input followed by a slice: counted as a reduce-scatter)
- all-reduce: ``2 S (n - 1) / n``
- all-to-all: ``S (n - 1) / n``;  collective-permute: ``S``

Across TPU slices XLA lowers the DCN part of a collective to host ``send`` / ``recv`` pairs of
the megascale runtime (``_xla_megascale_*`` attributes; the rendezvous names the collective):
those are reported as ``"<kind> (DCN)"`` with ``S`` = the payload a device sends, over
``n`` = the number of slices (all-reduce ``2 S (n - 1) / n``, all-gather ``S (n - 1)``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = ["Collective", "collectives", "summarize", "shape_bytes"]

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1,
    "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_RENDEZVOUS = re.compile(r'_xla_host_transfer_rendezvous="([a-z\-]+)')


def shape_bytes(text: str) -> float:
    """Bytes of every array shape written in ``text`` (e.g. ``(f32[2,3], bf16[4])``)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _first_group(attrs: str, n_devices: int) -> tuple[int, ...]:
    """The partition ids of the collective's first replica group."""
    m = _MESH_GROUPS.search(attrs)
    if m:
        axes = [kv.split("=") for kv in m[1].split(",")]
        names = [k.strip().strip("'") for k, _ in axes]
        ids = np.arange(math.prod(int(v) for _, v in axes)).reshape([int(v) for _, v in axes])
        chosen = [names.index(a.strip().strip("'")) for a in m[2].split(",")]
        index = tuple(slice(None) if i in chosen else 0 for i in range(len(names)))
        return tuple(int(x) for x in ids[index].ravel())
    m = _IOTA_GROUPS.search(attrs)
    if m:
        dims = [int(x) for x in m[1].split(",")]
        tail = attrs[m.end() :]
        t = re.match(r"\[([0-9,]+)\](T\(([0-9,]+)\))?", tail)
        ids = np.arange(math.prod(dims))
        if t:
            ids = ids.reshape([int(x) for x in t[1].split(",")])
            if t[3]:
                ids = ids.transpose([int(x) for x in t[3].split(",")])
        return tuple(int(x) for x in ids.reshape(dims)[0])
    m = _LIST_GROUPS.search(attrs)
    if m:
        return tuple(int(x) for x in m[1].split(",") if x)
    return tuple(range(n_devices))  # replica_groups={} : all devices


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: its kind, group size, bytes sent per device per execution
    and how many times a step executes it."""

    name: str
    kind: str
    members: tuple[int, ...]  # partition ids of the first replica group
    buffer_bytes: float  # S: the full buffer (see the module docstring)
    count: int

    @property
    def group(self) -> int:
        return len(self.members)

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends per execution (ring algorithm)."""
        n = self.group
        if n <= 1:
            return 0.0
        if self.kind.startswith("all-reduce"):
            return 2 * self.buffer_bytes * (n - 1) / n
        if self.kind.startswith("collective-permute"):
            return self.buffer_bytes
        return self.buffer_bytes * (n - 1) / n


def _split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry = ""
    current = None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = m[2]
            comps[current] = []
            if m[1]:
                entry = current
            continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


_COND = re.compile(r"condition=%?([\w.\-]+)")
_CONST = re.compile(r"\bconstant\((\d+)\)")


def _condition_bound(comps: dict[str, list[str]], line: str) -> int:
    """Trip count of a ``while`` without ``known_trip_count`` (XLA:TPU drops it): the loop
    ``i < N`` from 0 by 1 that ``lax.scan`` emits, ``N`` the condition's integer constant."""
    m = _COND.search(line)
    body = comps.get(m[1], []) if m else []
    if not any("direction=LT" in x for x in body):
        return 1
    bounds = [int(c) for x in body for c in _CONST.findall(x)]
    return max(bounds) if bounds else 1


def _multiplicities(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times one step runs each computation (while bodies x their trip counts)."""
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            trip = 1
            if " while(" in line:
                m = _TRIP.search(line)
                trip = int(m[1]) if m else _condition_bound(comps, line)
            for key, callee in _CALLS.findall(line):
                edges[name].append((callee, trip if key in ("body", "condition") else 1))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    edges[name].append((callee.strip().lstrip("%"), 1))
    mult: dict[str, int] = defaultdict(int)
    # computations form a DAG: accumulate in topological order from the entry
    order: list[str] = []
    seen: set[str] = set()

    def visit(c: str) -> None:
        if c in seen:
            return
        seen.add(c)
        for callee, _ in edges.get(c, ()):
            visit(callee)
        order.append(c)

    visit(entry)
    mult[entry] = 1
    for c in reversed(order):
        for callee, factor in edges.get(c, ()):
            mult[callee] += mult[c] * factor
    return mult


def collectives(hlo: str, n_devices: int, n_slices: int = 1) -> list[Collective]:
    """Every collective of the optimized HLO module with its per-step execution count
    (cross-slice DCN transfers as ``"<kind> (DCN)"``, ``members`` = the slices)."""
    comps, entry = _split_computations(hlo)
    mult = _multiplicities(comps, entry)
    found = []
    for comp, lines in comps.items():
        count = mult.get(comp, 0)
        if not count:
            continue
        for line in lines:
            m = _INST.match(line)
            if not m:
                continue
            name, out_type, op, rest = m.groups()
            if op == "send" and "xla_megascale_runtime" in rest:
                r = _RENDEZVOUS.search(rest)
                base = next((k for k in KINDS if r and r[1].startswith(k)), "all-reduce")
                payload = shape_bytes(
                    " ".join(f"{d}[{x}]" for d, x in _ARRAY.findall(out_type)[:1])
                )
                if base == "all-gather":
                    payload *= n_slices  # S: the gathered buffer (the device sends S (n-1)/n)
                found.append(
                    Collective(name, f"{base} (DCN)", tuple(range(n_slices)), payload, count)
                )
                continue
            kind = next((k for k in KINDS if op == k or op == f"{k}-start"), None)
            if kind is None:
                continue
            if op.endswith("-start") and out_type.startswith("("):
                # async start: (operands..., outputs...[, context]): keep the outputs' half
                arrays = _ARRAY.findall(out_type)
                half = arrays[len(arrays) // 2 :] if kind != "all-reduce" else arrays
                out_bytes = shape_bytes(" ".join(f"{d}[{s}]" for d, s in half))
            else:
                out_bytes = shape_bytes(out_type)
            members = _first_group(rest, n_devices)
            group = len(members)
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # the full input is all-reduce's operand/result
            elif kind == "reduce-scatter":
                out_bytes *= group  # S is the input: n times the scattered output
            found.append(Collective(name, kind, members, out_bytes, count))
    return found


def summarize(
    found: list[Collective], slice_of: Sequence[int] | None = None
) -> dict[str, dict[str, float]]:
    """``{kind: {"count": executions per step, "bytes": bytes sent per device per step}}``;
    with ``slice_of`` (partition id -> TPU slice), collectives whose group spans several slices
    are keyed ``"<kind> (DCN)"``."""
    out: dict[str, dict[str, float]] = {}
    for c in found:
        key = c.kind
        if slice_of is not None and len({slice_of[i] for i in c.members}) > 1:
            key = c.kind if "DCN" in c.kind else f"{c.kind} (DCN)"
        row = out.setdefault(key, {"count": 0, "bytes": 0.0})
        row["count"] += c.count
        row["bytes"] += c.wire_bytes * c.count
    return out
