"""Collectives and loop costs of an optimized HLO module (``jit(f).lower(...).compile().as_text()``).

The one reader of collective traffic: the planner (``paretoq_jax.plan``) sums it per step and
chip, the FSDP code gathering (``paretoq_jax.parallel.code_gather``) and its tests read the
bytes of the gathers that feed the quantized linears. :func:`loop_cost` adds what
``cost_analysis()`` misses in loops (it counts a ``while`` body once); :func:`custom_calls`
lists the kernels it cannot see into.

Every all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute (async
``-start`` / ``-done`` pairs once) is one :class:`Collective` with:

- ``bytes``: its result arrays (an all-gather's gathered array, a reduce-scatter's scattered
  output), one execution; ``dtype`` / ``shapes`` of that result; ``op_name``: the JAX op that
  made it (metadata), e.g. ``".../gather_codes/..."``.
- ``count``: how often one run of the program executes it. An instruction inside a ``while``
  body (a scanned decoder layer, a gradient-accumulation micro-batch) counts once per
  iteration, nested loops multiply. The trip count is XLA's ``known_trip_count``; XLA:TPU drops
  it from optimized HLO, so otherwise it is read from the loop: the bound ``N`` of the
  ``i < N`` condition, the counter's start in the initial tuple and its step in the body
  (``lax.scan``: 0 and 1; XLA:TPU's collective-matmul loops step by 2); ``exact`` is False
  when there is no such bound (counted once).
- ``members`` / ``buffer_bytes`` / ``wire_bytes``: the ring-algorithm bytes one device sends
  per execution over its replica group of ``n`` devices (``S`` = the full, unsharded buffer):

  - all-gather: ``S (n - 1) / n``  (``S`` = the output)
  - reduce-scatter: ``S (n - 1) / n``  (``S`` = the input; XLA:TPU's ``all-reduce-scatter``
    fusions are an all-reduce of the input followed by a slice: counted as a reduce-scatter)
  - all-reduce: ``2 S (n - 1) / n``
  - all-to-all: ``S (n - 1) / n``;  collective-permute: ``S``

Each collective also has a ``role``: ``"gather"`` when it assembles an array from shards (an
all-gather, or an all-reduce whose operand is a zero buffer with the device's shard written in:
XLA:TPU's all-gather done as an all-reduce, which drops the op's metadata and may be combined
with gradient reductions into one tuple all-reduce, so each operand is classified by tracing it
to that ``dynamic-update-slice`` / ``pad`` of zeros), ``"reduce"`` when it sums (gradients,
Megatron activations, the loss) and ``"other"`` (all-to-all, collective-permute). A combined
all-reduce whose operands have both roles is two :class:`Collective` records.

Across TPU slices XLA lowers the DCN part of a collective to host ``send`` / ``recv`` pairs of
the megascale runtime (``_xla_megascale_*`` attributes; the rendezvous names the collective):
those are ``"<kind> (DCN)"`` with ``S`` = the payload a device sends, over ``n`` = the number of
slices (all-reduce ``2 S (n - 1) / n``, all-gather ``S (n - 1)``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "KINDS",
    "DTYPE_BYTES",
    "Collective",
    "collectives",
    "collective_bytes",
    "summarize",
    "summarize_roles",
    "shape_bytes",
    "LoopCost",
    "loop_cost",
    "CustomCall",
    "custom_calls",
    "Instruction",
    "instructions",
]

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

DTYPE_BYTES = {
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
_COND = re.compile(r"condition=%?([\w.\-]+)")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CONST = re.compile(r"\bconstant\((\d+)\)")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_RENDEZVOUS = re.compile(r'_xla_host_transfer_rendezvous="([a-z\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_ZERO = re.compile(r"\bconstant\((-?0(?:\.0*)?|false)\)")
_PARAM = re.compile(r"\bparameter\((\d+)\)")
# ops that pass an array through unchanged in value (layout, memory space, element type)
_PASS = ("copy-done", "copy-start", "bitcast", "copy", "convert", "reshape", "transpose")


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _ARRAY.findall(text)
        if dt in DTYPE_BYTES
    ]


def _nbytes(arrays: list[tuple[str, tuple[int, ...]]]) -> float:
    return sum(math.prod(s) * DTYPE_BYTES[dt] for dt, s in arrays)


def shape_bytes(text: str) -> float:
    """Bytes of every array shape written in ``text`` (e.g. ``(f32[2,3], bf16[4])``)."""
    return _nbytes(_arrays(text))


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
    """One collective instruction (see the module docstring)."""

    name: str
    kind: str  # one of KINDS, or "<kind> (DCN)" for a cross-slice megascale transfer
    dtype: str  # element type of the result (the first one, for a combined collective)
    shapes: tuple[tuple[int, ...], ...]  # result arrays (several for a combined collective)
    bytes: int  # bytes of the result arrays, one execution
    count: int  # executions per program run (product of enclosing loops' trip counts)
    exact: bool  # False when an enclosing loop's trip count is unknown (counted once)
    op_name: str  # the JAX op that produced it (metadata)
    computation: str
    members: tuple[int, ...]  # partition ids of the first replica group
    buffer_bytes: float  # S: the full buffer of the ring-algorithm count
    role: str = "other"  # "gather" (assembles shards), "reduce" (sums) or "other"
    dtypes: tuple[str, ...] = ()  # element type of each result array

    @property
    def total_bytes(self) -> int:
        """Result bytes per program run: ``bytes * count``."""
        return self.bytes * self.count

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


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction of an HLO module: ``name = <result type> op(rest``."""

    computation: str
    name: str
    op: str
    result: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each result array
    line: str


def instructions(hlo: str, op: str | None = None) -> list[Instruction]:
    """Every instruction of the module (only those of ``op`` when given), fused computations
    included, in text order."""
    comps, _ = _split_computations(hlo)
    out = []
    for comp, lines in comps.items():
        for line in lines:
            m = _INST.match(line)
            if m and (op is None or m[3] == op):
                out.append(Instruction(comp, m[1], m[3], tuple(_arrays(m[2])), line.strip()))
    return out


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
        if line.rstrip() == "}":  # not "}}, metadata=...": a multi-line attribute's tail
            current = None
        elif current is not None:
            comps[current].append(line)
    if not entry:
        raise ValueError("not an HLO module's text: no ENTRY computation found")
    return comps, entry


Defs = dict[str, dict[str, tuple[str, str]]]  # computation -> instruction -> (op, rest of line)
_ROOT = "<root>"  # a key no HLO instruction name can take: (root instruction name, "")


def _definitions(comps: dict[str, list[str]]) -> Defs:
    defs: Defs = {}
    for comp, lines in comps.items():
        d = defs.setdefault(comp, {})
        for line in lines:
            m = _INST.match(line)
            if m:
                d[m[1]] = (m[3], m[4])
                if line.lstrip().startswith("ROOT"):
                    d[_ROOT] = (m[1], "")  # the name of the computation's result
    return defs


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction (``rest``: the text after ``op(``)."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return _OPERAND.findall(rest[:end])


def _is_zeros(
    defs: Defs, comp: str, name: str, depth: int = 0, outer: tuple[str, list[str]] | None = None
) -> bool:
    """Whether ``name`` in ``comp`` is an array of zeros (a broadcast zero constant); in a fusion
    computation, ``outer`` = (the calling computation, the fusion's operands) maps parameters."""
    op, rest = defs.get(comp, {}).get(name, ("", ""))
    if depth > 8 or not op:
        return False
    if op == "constant":
        return bool(_ZERO.search(f"constant({rest}"))
    if op == "parameter" and outer is not None:
        m = _PARAM.search(f"parameter({rest}")
        i = int(m[1]) if m else len(outer[1])
        return i < len(outer[1]) and _is_zeros(defs, outer[0], outer[1][i], depth + 1)
    if op == "broadcast" or op in _PASS:
        args = _operands(rest)
        return bool(args) and _is_zeros(defs, comp, args[0], depth + 1, outer)
    return False


def _is_zero_padded_shard(
    defs: Defs, comp: str, name: str, depth: int = 0, outer: tuple[str, list[str]] | None = None
) -> bool:
    """Whether ``name`` in ``comp`` is zeros with one block written in (``dynamic-update-slice``
    of a shard into a zero buffer, or ``pad`` with zeros): the operand of an all-gather that XLA
    does as an all-reduce. Traced through copies, bitcasts and a fusion (its root; inside it,
    ``outer`` = (the calling computation, the fusion's operands) maps its parameters, so the
    zero buffer may come in from outside)."""
    op, rest = defs.get(comp, {}).get(name, ("", ""))
    if depth > 8 or not op:
        return False
    args = _operands(rest)
    if op in _PASS:
        return bool(args) and _is_zero_padded_shard(defs, comp, args[0], depth + 1, outer)
    base = {"dynamic-update-slice": 0, "pad": 1}.get(op)  # the operand holding the buffer
    if base is not None:
        return len(args) > base and _is_zeros(defs, comp, args[base], outer=outer)
    if op == "fusion" and outer is None:
        called = _CALLS.search(rest)
        inner = called[2] if called else ""
        root = defs.get(inner, {}).get(_ROOT, ("", ""))[0]
        return bool(root) and _is_zero_padded_shard(defs, inner, root, depth + 1, (comp, args))
    return False


def _constant(defs: Defs, comp: str, name: str, depth: int = 0) -> int | None:
    """The integer value of ``name`` in ``comp`` when it is a constant (through copies)."""
    op, rest = defs.get(comp, {}).get(name, ("", ""))
    if op == "constant":
        m = re.match(r"\s*(-?\d+)\)", rest)
        return int(m[1]) if m else None
    args = _operands(rest)
    if op in _PASS and args and depth < 8:
        return _constant(defs, comp, args[0], depth + 1)
    return None


def _tuple_index(defs: Defs, comp: str, name: str) -> int | None:
    """``k`` when ``name`` is ``get-tuple-element(parameter), index=k`` (through copies)."""
    for _ in range(8):
        op, rest = defs.get(comp, {}).get(name, ("", ""))
        if op == "get-tuple-element":
            m = re.search(r"\bindex=(\d+)", rest)
            return int(m[1]) if m else None
        args = _operands(rest)
        if op not in _PASS or not args:
            return None
        name = args[0]
    return None


def _trip_count(comps: dict[str, list[str]], line: str, defs: Defs, caller: str) -> int | None:
    """Trip count of the ``while`` instruction ``line`` of computation ``caller``: XLA's
    ``known_trip_count``, else read from the loop (XLA:TPU drops that field from optimized HLO):
    the condition ``counter < N`` (the counter a tuple element), the counter's start in the
    loop's initial tuple and its step in the body's result (``counter + s``; XLA:TPU's
    collective-matmul loops step by 2), ``ceil((N - start) / s)``. When the condition is
    ``i < N`` but the rest cannot be traced, start 0 and step 1 (``lax.scan``); None when
    the condition is not a ``<`` bound."""
    m = _TRIP.search(line)
    if m:
        return int(m[1])
    cond_m, body_m = _COND.search(line), _BODY.search(line)
    cond, body = cond_m[1] if cond_m else "", body_m[1] if body_m else ""
    bounds = [int(x) for ln in comps.get(cond, []) for x in _CONST.findall(ln)]
    if not any("direction=LT" in ln for ln in comps.get(cond, [])) or not bounds:
        return None
    bound, start, step, index = max(bounds), 0, 1, None
    op, rest = defs.get(cond, {}).get(defs.get(cond, {}).get(_ROOT, ("", ""))[0], ("", ""))
    if op == "compare" and "direction=LT" in rest and len(_operands(rest)) == 2:
        counter, limit = _operands(rest)
        n, index = _constant(defs, cond, limit), _tuple_index(defs, cond, counter)
        bound = n if n is not None else bound
    if index is not None:
        init = _operands(line.split(" while(", 1)[1])[:1]
        op, rest = defs.get(caller, {}).get(init[0] if init else "", ("", ""))
        args = _operands(rest) if op == "tuple" else []
        if index < len(args):
            start = _constant(defs, caller, args[index]) or 0
        body_defs = defs.get(body, {})
        out = _operands(body_defs.get(body_defs.get(_ROOT, ("", ""))[0], ("", ""))[1])
        op, rest = body_defs.get(out[index], ("", "")) if index < len(out) else ("", "")
        terms = _operands(rest) if op == "add" else []
        for a, b in (terms, terms[::-1]) if len(terms) == 2 else ():
            if _tuple_index(defs, body, a) == index:
                step = _constant(defs, body, b) or 1
                break
    return max(0, -(-(bound - start) // max(step, 1)))


def _multiplicities(
    comps: dict[str, list[str]], entry: str, loops: bool = True, defs: Defs | None = None
) -> tuple[dict[str, int], dict[str, bool]]:
    """How many times one run executes each computation (while bodies x their trip counts;
    ``loops=False``: each body once, as ``cost_analysis()`` counts), and whether every
    enclosing trip count was known. ``defs``: ``_definitions(comps)`` when the caller has it."""
    edges: dict[str, list[tuple[str, int, bool]]] = defaultdict(list)
    if loops and defs is None:
        defs = _definitions(comps)
    for name, lines in comps.items():
        for line in lines:
            trip, known = 1, True
            if loops and " while(" in line:
                t = _trip_count(comps, line, defs, name)
                trip, known = (t, True) if t is not None else (1, False)
            for key, callee in _CALLS.findall(line):
                loop = key in ("body", "condition")
                edges[name].append((callee, trip if loop else 1, known or not loop))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    if callee.strip():
                        edges[name].append((callee.strip().lstrip("%"), 1, True))
    # computations form a DAG: accumulate in topological order from the entry
    order: list[str] = []
    seen: set[str] = set()

    def visit(c: str) -> None:
        if c in seen:
            return
        seen.add(c)
        for callee, _, _ in edges.get(c, ()):
            visit(callee)
        order.append(c)

    visit(entry)
    mult: dict[str, int] = defaultdict(int)
    exact: dict[str, bool] = defaultdict(lambda: True)
    mult[entry] = 1
    for c in reversed(order):
        for callee, factor, known in edges.get(c, ()):
            mult[callee] += mult[c] * factor
            exact[callee] = exact[callee] and exact[c] and known
    return mult, exact


def _result_arrays(kind: str, op: str, out_type: str) -> list[tuple[str, tuple[int, ...]]]:
    """The result arrays of a collective (an async ``-start``'s tuple also holds operands)."""
    arrays = _arrays(out_type)
    if not (op.endswith("-start") and out_type.startswith("(")):
        return arrays
    if kind == "collective-permute":
        return arrays[:1]
    if kind == "all-reduce":
        return arrays  # all-reduce-start's tuple holds the results only
    return arrays[len(arrays) // 2 :]  # (operands..., results...)


def collectives(hlo: str, n_devices: int | None = None, n_slices: int = 1) -> list[Collective]:
    """Every collective of the optimized HLO module ``hlo`` with its per-run execution count
    (cross-slice DCN transfers as ``"<kind> (DCN)"``, ``members`` = the slices). ``n_devices``:
    the devices of ``replica_groups={}`` (default: the module's ``num_partitions``)."""
    comps, entry = _split_computations(hlo)
    if n_devices is None:
        m = _PARTITIONS.search(hlo.split("\n", 1)[0])
        n_devices = int(m[1]) if m else 1
    defs = _definitions(comps)
    mult, exact = _multiplicities(comps, entry, defs=defs)
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
            meta = _OP_NAME.search(rest)
            common = dict(
                name=name, count=count, exact=exact[comp], computation=comp,
                op_name=meta[1] if meta else "",
            )  # fmt: skip
            if op == "send" and "xla_megascale_runtime" in rest:
                r = _RENDEZVOUS.search(rest)
                base = next((k for k in KINDS if r and r[1].startswith(k)), "all-reduce")
                arrays = _arrays(out_type)[:1]
                payload = _nbytes(arrays)
                if base == "all-gather":
                    payload *= n_slices  # S: the gathered buffer (the device sends S (n-1)/n)
                found.append(
                    Collective(
                        kind=f"{base} (DCN)",
                        dtype=arrays[0][0] if arrays else "",
                        shapes=tuple(s for _, s in arrays),
                        dtypes=tuple(d for d, _ in arrays),
                        bytes=math.ceil(_nbytes(arrays)),
                        members=tuple(range(n_slices)),
                        buffer_bytes=payload,
                        role="gather" if base == "all-gather" else "reduce",
                        **common,
                    )  # fmt: skip
                )
                continue
            kind = next((k for k in KINDS if op in (k, f"{k}-start")), None)
            if kind is None:
                continue
            arrays = _result_arrays(kind, op, out_type)
            if not arrays:
                continue
            members = _first_group(rest, n_devices)
            role = {"all-gather": "gather", "all-reduce": "reduce", "reduce-scatter": "reduce"}
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # the full input is all-reduce's operand/result
            parts = [(role.get(kind, "other"), arrays)]
            if kind == "all-reduce":  # all-gathers done as all-reduces: split the tuple by role
                operands = _operands(rest)
                gathered = [
                    i < len(operands) and _is_zero_padded_shard(defs, comp, operands[i])
                    for i in range(len(arrays))
                ]
                parts = [
                    (r, [a for a, g in zip(arrays, gathered, strict=True) if g == (r == "gather")])
                    for r in ("gather", "reduce")
                ]
            for part_role, part in parts:
                if not part:
                    continue
                out_bytes = _nbytes(part)
                buffer = out_bytes
                if kind == "reduce-scatter" and not comp.startswith("all-reduce-scatter"):
                    buffer = out_bytes * len(members)  # S is the input: n times the output
                found.append(
                    Collective(
                        kind=kind,
                        dtype=part[0][0],
                        shapes=tuple(s for _, s in part),
                        dtypes=tuple(d for d, _ in part),
                        bytes=math.ceil(out_bytes),
                        members=members,
                        buffer_bytes=buffer,
                        role=part_role,
                        **common,
                    )  # fmt: skip
                )
    return found


def collective_bytes(
    hlo: str,
    kind: str | None = "all-gather",
    where: Callable[[Collective], bool] | None = None,
) -> int:
    """Result bytes per program run of the collectives of ``kind`` (``None``: all kinds) that
    pass ``where``; e.g. ``collective_bytes(text, where=lambda c: c.dtype == "u8")``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS} or None")
    return sum(
        c.total_bytes
        for c in collectives(hlo)
        if (kind is None or c.kind == kind) and (where is None or where(c))
    )


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


def summarize_roles(
    found: list[Collective],
    classify: Callable[[Collective, str, tuple[int, ...]], str] | None = None,
) -> dict[str, dict[str, float]]:
    """``{class: {"count", "bytes"}}``: executions and bytes sent per device per step, one entry
    per result array; its class is ``classify(collective, dtype, shape)`` (default: the
    collective's ``role``)."""
    out: dict[str, dict[str, float]] = {}
    for c in found:
        rate = c.wire_bytes / c.buffer_bytes if c.buffer_bytes else 0.0  # sent per byte of S
        per_byte = c.buffer_bytes / c.bytes if c.bytes else 0.0  # S per result byte
        for dtype, shape in zip(c.dtypes or (c.dtype,) * len(c.shapes), c.shapes, strict=True):
            key = classify(c, dtype, shape) if classify else c.role
            row = out.setdefault(key, {"count": 0, "bytes": 0.0})
            row["count"] += c.count
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
            row["bytes"] += nbytes * per_byte * rate * c.count
    return out


# --- what cost_analysis() misses inside loops -------------------------------------------------

# 1 FLOP per output element, as XLA's HloCostAnalysis counts them (exp, log, tanh, rsqrt, ...
# are its "transcendentals", not FLOPs)
_ELEMENTWISE = frozenset(
    "add subtract multiply divide maximum minimum compare select clamp negate abs sign floor "
    "ceil round-nearest-even round-nearest-afz power remainder and or xor not".split()
)
# no HBM traffic of their own: aliases, tuples, control flow (its bodies are counted) and the
# second half of async pairs (counted at their -start)
_NO_TRAFFIC = frozenset(
    "parameter get-tuple-element tuple constant bitcast while call conditional after-all "
    "partition-id replica-id opt-barrier".split()
)
_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{([0-9,]*)\}")
_DIM_LABELS = re.compile(r"\bdim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)")
_WINDOW = re.compile(r"\bwindow=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """FLOPs and HBM bytes of one program run that ``cost_analysis()`` leaves out."""

    flops: float
    bytes: float
    exact: bool  # False when a loop's trip count is unknown (its body stays counted once)


def _window_taps(window: str, spatial: int, sizes: list[tuple[int, int, int]]) -> int:
    """How many (output position, kernel tap) pairs of a convolution read real input, over
    its spatial dims (``sizes``: input, kernel, output size each): padding and dilation
    holes read nothing (XLA writes a batched or outer-product dot as such a window)."""
    fields = dict(f.split("=", 1) for f in window.split() if "=" in f)

    def per_dim(key: str, default: int) -> list[int]:
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * spatial

    stride, lhs_dil, rhs_dil = (per_dim(k, 1) for k in ("stride", "lhs_dilate", "rhs_dilate"))
    pads = [p.split("_") for p in fields["pad"].split("x")] if "pad" in fields else []
    taps = 1
    for i, (n, k, o) in enumerate(sizes):
        low = int(pads[i][0]) if i < len(pads) else 0
        pos = np.arange(o)[:, None] * stride[i] + np.arange(k)[None, :] * rhs_dil[i] - low
        real = (pos >= 0) & (pos <= (n - 1) * lhs_dil[i]) & (pos % lhs_dil[i] == 0)
        taps *= int(real.sum())
    return taps


def _instruction_flops(op: str, out_type: str, rest: str, types: dict[str, str]) -> float:
    """FLOPs of one instruction, as XLA's HloCostAnalysis counts them: a dot ``2 * out * K``
    (``K``: the contracted lhs dims); a convolution ``2 * batch * out features * in features
    * taps`` (:func:`_window_taps`); an elementwise op 1 per output element; a reduce 1 per
    input element."""
    out_arrays = _arrays(out_type)
    out_shape = out_arrays[0][1] if out_arrays else ()
    args = _operands(rest)

    def operand_shape(i: int) -> tuple[int, ...]:
        arrays = _arrays(types.get(args[i], "")) if i < len(args) else []
        return arrays[0][1] if arrays else ()

    if op == "dot":
        m, lhs = _CONTRACTING.search(rest), operand_shape(0)
        dims = [int(d) for d in m[1].split(",") if d] if m else []
        return 2.0 * math.prod(out_shape) * math.prod(lhs[d] for d in dims if d < len(lhs))
    if op == "convolution":
        m, lhs, rhs = _DIM_LABELS.search(rest), operand_shape(0), operand_shape(1)
        if not m or (len(m[1]), len(m[2]), len(m[3])) != (len(lhs), len(rhs), len(out_shape)):
            return 0.0
        lhs_l, rhs_l, out_l = m[1], m[2], m[3]
        spatial = len(lhs_l) - 2
        sizes = [
            (lhs[lhs_l.index(d)], rhs[rhs_l.index(d)], out_shape[out_l.index(d)])
            for d in map(str, range(spatial))
        ]
        w = _WINDOW.search(rest)
        taps = _window_taps(w[1] if w else "", spatial, sizes)
        batch, features = out_shape[out_l.index("b")], out_shape[out_l.index("f")]
        return 2.0 * batch * features * rhs[rhs_l.index("i")] * taps
    if op in _ELEMENTWISE:
        return float(math.prod(out_shape))
    if op == "reduce":
        return float(math.prod(operand_shape(0)))
    return 0.0


def loop_cost(hlo: str) -> LoopCost:
    """What ``compiled.cost_analysis()`` misses in the optimized HLO module ``hlo``: it counts
    every ``while`` body once, whatever its trip count (a ``lax.scan``, a gradient-accumulation
    loop, or one of the "collective matmul" loops into which XLA:TPU splits a sharded dot).

    Each computation is weighed by how many more times a run executes it than that single
    count (its loops' trip counts, as :func:`collectives` counts them) and contributes the
    FLOPs of its dots, convolutions, elementwise ops and reductions, and the HBM bytes of its
    top-level instructions (operands + results; inside a fusion nothing is counted again).
    Dots and convolutions are counted exactly; the rest, like ``cost_analysis()``'s own model,
    is an estimate. Add the result to ``cost_analysis()``'s ``flops`` / ``bytes accessed``."""
    comps, entry = _split_computations(hlo)
    mult, exact = _multiplicities(comps, entry)
    once, _ = _multiplicities(comps, entry, loops=False)
    fused, reducers = set(), set()  # fusion bodies (no traffic of their own), reducers (no FLOPs)
    for lines in comps.values():
        for line in lines:
            for key, callee in _CALLS.findall(line):
                if key == "to_apply":
                    reducers.add(callee)
                elif key == "calls" and " fusion(" in line:
                    fused.add(callee)
    flops = nbytes = 0.0
    for comp, lines in comps.items():
        extra = mult.get(comp, 0) - once.get(comp, 0)
        if extra <= 0 or comp in reducers:
            continue
        insts = [m.groups() for m in map(_INST.match, lines) if m]
        types = {name: out_type for name, out_type, _, _ in insts}
        for _, out_type, op, rest in insts:
            flops += extra * _instruction_flops(op, out_type, rest, types)
            if comp in fused or op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            operands = sum(_nbytes(_arrays(types.get(a, ""))) for a in _operands(rest))
            nbytes += extra * (shape_bytes(out_type) + operands)
    return LoopCost(flops=flops, bytes=nbytes, exact=all(exact[c] for c in mult if mult[c]))


@dataclasses.dataclass(frozen=True)
class CustomCall:
    """One ``custom-call`` of a module: a kernel XLA cannot see into (e.g. Pallas on TPU)."""

    name: str  # the instruction's name (Pallas names it after the kernel, e.g. splash_mha_fwd)
    target: str  # custom_call_target, e.g. "tpu_custom_call"
    operands: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of each array operand
    results: tuple[tuple[str, tuple[int, ...]], ...]
    count: int  # executions per run of the program (loop trip counts, as for collectives)

    @property
    def io_bytes(self) -> float:
        """Bytes of its operands and results: what ``cost_analysis()`` counts of one call."""
        return _nbytes(list(self.operands + self.results))


_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def custom_calls(hlo: str) -> list[CustomCall]:
    """Every ``custom-call`` of the optimized HLO module ``hlo`` with its operand and result
    shapes and how often one run executes it. ``cost_analysis()`` counts no FLOPs inside such a
    kernel, only its operand and result bytes; the caller that knows the kernel adds the rest
    (``paretoq_jax.plan`` for splash attention)."""
    comps, entry = _split_computations(hlo)
    defs = _definitions(comps)
    mult, _ = _multiplicities(comps, entry, defs=defs)
    found = []
    for comp, lines in comps.items():
        if not mult.get(comp):
            continue
        insts = [m.groups() for m in map(_INST.match, lines) if m]
        types = {name: out_type for name, out_type, _, _ in insts}
        for name, out_type, op, rest in insts:
            if op != "custom-call":
                continue
            target = _TARGET.search(rest)
            operands = [a for o in _operands(rest) for a in _arrays(types.get(o, ""))]
            found.append(
                CustomCall(
                    name=name,
                    target=target[1] if target else "",
                    operands=tuple(operands),
                    results=tuple(_arrays(out_type)),
                    count=mult[comp],
                )  # fmt: skip
            )
    return found
