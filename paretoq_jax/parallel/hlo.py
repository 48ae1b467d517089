"""Collective traffic read from an optimized HLO module's text (``jit(f).lower(...).compile()
.as_text()``): every all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute,
its element type, shape, bytes and how many times one execution of the program runs it.

Bytes are those of the collective's result (an all-gather's gathered array, an all-reduce's
reduced array), the usual way to size a collective; each device receives ``(n - 1) / n`` of an
all-gather's result over ``n`` devices. Async pairs (``all-gather-start`` / ``-done``) count
once. A collective inside a ``while`` body counts once per iteration when XLA knows the trip
count (``known_trip_count``, e.g. a ``lax.scan`` over layers); otherwise once, and
``Collective.exact`` is False.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

__all__ = ["Collective", "collectives", "collective_bytes", "DTYPE_BYTES"]

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(" + "|".join(KINDS) + r")(-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]")
_CALLEE = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of an HLO module."""

    name: str
    kind: str  # one of KINDS
    dtype: str  # element type of the result (the first one, for a combined collective)
    shapes: tuple[tuple[int, ...], ...]  # result arrays (several for a combined collective)
    bytes: int  # bytes of the result arrays, one execution
    count: int  # executions per program run (product of enclosing loops' trip counts)
    exact: bool  # False when an enclosing loop's trip count is unknown (counted once)
    op_name: str  # the JAX op that produced it (metadata), e.g. ".../gather_codes/..."
    computation: str

    @property
    def total_bytes(self) -> int:
        """Bytes moved per program run: ``bytes * count``."""
        return self.bytes * self.count


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _ARRAY.findall(shape_text)
        if dt in DTYPE_BYTES
    ]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an optimized HLO module (see the module docstring)."""
    comps: dict[str, list[str]] = {}
    order: list[str] = []
    entry = None
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current], order = [], [*order, current]
            if m.group(1):
                entry = current
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    if entry is None:
        raise ValueError("not an HLO module's text: no ENTRY computation found")

    # Multiplicity of each computation: callers are printed after their callees, so walking
    # the computations in reverse order visits every caller before its callees.
    mult: dict[str, int] = {entry: 1}
    exact: dict[str, bool] = {entry: True}
    for comp in reversed(order):
        if comp not in mult:
            continue
        for line in comps[comp]:
            callees = [c for _, c in _CALLEE.findall(line)]
            for group in _BRANCHES.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            if not callees:
                continue
            trip = 1
            known = True
            if re.search(r"\swhile\(", line):
                t = _TRIP.search(line)
                trip, known = (int(t.group(1)), True) if t else (1, False)
            for callee in callees:
                mult[callee] = mult.get(callee, 0) + mult[comp] * trip
                exact[callee] = exact.get(callee, True) and exact[comp] and known

    found = []
    for comp in order:
        if comp not in mult:
            continue
        for line in comps[comp]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, shape_text, kind, start = m.groups()
            arrays = _arrays(shape_text)
            if start and shape_text.startswith("(") and kind == "all-gather":
                arrays = arrays[len(arrays) // 2 :]  # (operands..., results...)
            elif start and kind == "collective-permute":
                arrays = arrays[:1]
            if not arrays:
                continue
            nbytes = sum(math.prod(s) * DTYPE_BYTES[dt] for dt, s in arrays)
            op = _OP_NAME.search(line)
            found.append(
                Collective(
                    name=name,
                    kind=kind,
                    dtype=arrays[0][0],
                    shapes=tuple(s for _, s in arrays),
                    bytes=int(math.ceil(nbytes)),
                    count=mult[comp],
                    exact=exact[comp],
                    op_name=op.group(1) if op else "",
                    computation=comp,
                )
            )
    return found


def collective_bytes(
    hlo_text: str,
    kind: str | None = "all-gather",
    where: Callable[[Collective], bool] | None = None,
) -> int:
    """Bytes per program run of the collectives of ``kind`` (``None``: all kinds) that pass
    ``where``; e.g. ``collective_bytes(text, where=lambda c: c.dtype == "u8")``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS} or None")
    return sum(
        c.total_bytes
        for c in collectives(hlo_text)
        if (kind is None or c.kind == kind) and (where is None or where(c))
    )
