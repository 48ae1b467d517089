"""The sweep file (``configs/sweeps/*.yaml``) and its expansion into cells; see ``docs/sweeps.md``.

A sweep names a base training config, overrides shared by every cell and a grid of values over
any dotted config keys. Expansion, in order:

1. the Cartesian product of ``grid`` (keys in file order, the last key varying fastest);
2. ``exclude``: drop every cell matching all keys of one rule (a list value matches any item);
3. ``include``: append extra cells given verbatim (dotted key -> value);
4. ``set_when``: ``{when: RULE, set: {key: value}}`` sets keys on the cells matching ``RULE``
   (e.g. a lower learning rate at 3 and 4 bits), except keys an ``include`` cell gives itself;
5. ``rtn``: for every cell a round-to-nearest twin: ``train.steps=0`` (evaluate the initialized
   quantized model, no training) without the other ``train.*`` keys (``train.seed`` is kept)
   or ``data.train_seq_len`` (they shape training only);
   ``float``: one cell evaluating the unquantized model (``model.bits=16``, ``train.steps=0``);
6. cells with the same name (the same overrides) are merged, keeping the first.

A cell is named by its own overrides (not the shared ones), with keys in one fixed order, so the
same overrides give the same name (and run directory) whatever grid they came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from paretoq_jax.config import ConfigError, from_dict, moved_keys, read_yaml
from paretoq_jax.errors import ParetoQError
from paretoq_jax.quant import parse_bits
from paretoq_jax.run.config import RunConfig

__all__ = [
    "Cell",
    "SweepError",
    "SweepConfig",
    "SweepEval",
    "SetWhen",
    "cell_name",
    "expand",
    "load_sweep",
    "matches",
    "select",
    "parse_shard",
]

# Short names used in cell names, in the order they appear there.
ALIASES = {
    "model.path": "model",
    "model.bits": "bits",
    "model.method": "method",
    "train.steps": "steps",
    "train.lr": "lr",
    "train.distill": "distill",
    "train.batch_size": "bs",
    "train.seed": "seed",
}
_SAFE = re.compile(r"^[A-Za-z0-9.+\-]+$")
_MAX_NAME = 180


class SweepError(ParetoQError, ValueError):
    """A sweep file or cell selection is invalid; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: its name (= run directory name) and its own dotted overrides."""

    name: str
    overrides: dict[str, Any]

    @property
    def kind(self) -> str:
        """``"train"`` (QAT), ``"rtn"`` (no training, quantized) or ``"float"`` (no training)."""
        if int(self.overrides.get("train.steps", -1)) != 0:
            return "train"
        bits = self.overrides.get("model.bits")
        return "float" if bits is not None and parse_bits(bits) in (16, 32) else "rtn"


@dataclasses.dataclass
class SweepEval:
    """How each cell is evaluated after training (the sweep file's ``eval`` section).

    ``batch_size``: validation batch (null: the cell's ``train.batch_size``);
    ``max_val_blocks``: at most this many validation blocks (null: all);
    ``tasks``: zero-shot multiple-choice jsonl file(s) (``paretoq_jax.eval``);
    ``transition_every_checkpoint``: measure the learning transition at every checkpoint (else
    only at the last one).
    """

    batch_size: int | None = None
    max_val_blocks: int | None = None
    tasks: str | list[str] | None = None
    transition_every_checkpoint: bool = True


@dataclasses.dataclass
class SetWhen:
    """``{when: RULE, set: {key: value}}``: set keys on the cells matching ``RULE``."""

    when: dict[str, Any]
    set: dict[str, Any]


@dataclasses.dataclass
class SweepConfig:
    """A sweep file (``configs/sweeps/*.yaml``; ``docs/sweeps.md``), read by :func:`load_sweep`
    with the run config's YAML loader and checks (``paretoq_jax.config.from_dict``).

    Every mapping of config keys (``overrides``, ``grid``, ``exclude``, ``include``,
    ``set_when``) holds dotted run-config keys once loaded (nested mappings are flattened);
    ``train_config`` is resolved relative to the sweep file, ``source`` is the file itself.
    """

    train_config: Path
    name: str | None = None
    out_dir: Path | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, Any] = dataclasses.field(default_factory=dict)
    exclude: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    include: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    set_when: list[SetWhen] = dataclasses.field(default_factory=list)
    rtn: bool = False
    float: bool = False
    drop_invalid: bool = False
    keep_checkpoints: Literal["all", "last", "none"] = "last"
    eval: SweepEval = dataclasses.field(default_factory=SweepEval)
    anchors: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: Path | None = dataclasses.field(default=None, init=False)


# Run-config keys renamed since sweeps were first run (``train.lr`` -> ``train.optimizer.lr``):
# a sweep file must use the new key; a cell's name keeps the old spelling (_NAME_KEYS), so the
# cells (and run directories) of an existing sweep keep their names.
_MOVED = moved_keys(RunConfig)
_NAME_KEYS = {new: old for old, new in _MOVED.items()}


def _flat(d: Any, what: str) -> dict[str, Any]:
    """A mapping of dotted keys; nested mappings are flattened (``{a: {b: 1}}`` -> ``a.b``)."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise SweepError(f"{what} must be a mapping of dotted config keys, got {d!r}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            for k2, v2 in _flat(v, what).items():
                out[f"{k}.{k2}"] = v2
        else:
            out[str(k)] = v
    for k in out:
        if k in _MOVED:
            raise SweepError(f"{what}: config key '{k}' moved to '{_MOVED[k]}'; write that instead")
    return out


def load_sweep(path: str | Path) -> SweepConfig:
    """Parse and check a sweep file (unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        data = read_yaml(path)
        if not isinstance(data, Mapping):
            raise SweepError(f"sweep file {path} must hold a mapping at the top level")
        if "train_config" not in data:
            raise SweepError(
                f"sweep file {path} needs 'train_config: PATH' (the base training config)"
            )
        # a key left empty (``overrides:`` over commented-out lines) is its default
        spec = from_dict(SweepConfig, {k: v for k, v in data.items() if v is not None})
    except ConfigError as e:
        msg = str(e).replace("config file", "sweep file", 1).replace("config key", "sweep key")
        raise SweepError(msg if str(path) in msg else f"sweep file {path}: {msg}") from None
    base = (path.parent / spec.train_config).resolve()
    if not base.is_file():
        raise SweepError(f"train_config {base} (from {path}) does not exist")
    grid = _flat(spec.grid, "'grid'")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"grid key '{k}' needs a non-empty list of values, got {v!r}")
    out = dataclasses.replace(
        spec,
        train_config=base,
        name=spec.name or path.stem,
        overrides=_flat(spec.overrides, "'overrides'"),
        grid=grid,
        exclude=[_flat(r, "an entry of 'exclude'") for r in spec.exclude],
        include=[_flat(r, "an entry of 'include'") for r in spec.include],
        set_when=[
            SetWhen(_flat(r.when, "set_when.when"), _flat(r.set, "set_when.set"))
            for r in spec.set_when
        ],
        anchors=_anchors(spec.anchors),
    )
    out.source = path.resolve()
    return out


def _anchors(data: Mapping[str, Any]) -> dict[str, float]:
    """``anchors: {cell name: reference validation perplexity}`` (shown beside ours in the report)."""
    try:
        return {str(k): float(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise SweepError(f"'anchors' values must be numbers, got {dict(data)!r}") from None


def _norm(key: str, value: Any) -> Any:
    """Canonical value for comparisons: bit-widths parsed, numbers as floats."""
    if key.endswith("bits") and value is not None:
        try:
            return parse_bits(value)
        except ValueError:
            return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def matches(overrides: Mapping[str, Any], rule: Mapping[str, Any]) -> bool:
    """True when every key of ``rule`` is in ``overrides`` with that value (or one of a list)."""
    for k, want in rule.items():
        if k not in overrides:
            return False
        options = want if isinstance(want, list) else [want]
        if _norm(k, overrides[k]) not in [_norm(k, o) for o in options]:
            return False
    return True


def _fmt(key: str, value: Any) -> str:
    if key.endswith("bits") and value is not None:
        try:
            b = parse_bits(value)
            return f"{b:g}"
        except ValueError:
            pass
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    s = str(value)
    if _SAFE.match(s):
        return s
    stem = re.sub(r"[^A-Za-z0-9.+\-]+", "-", Path(s).name or s).strip("-") or "v"
    return f"{stem}~{hashlib.sha1(s.encode()).hexdigest()[:6]}"


def _key_order(key: str) -> tuple[int, str]:
    names = list(ALIASES)
    return (names.index(key), "") if key in ALIASES else (len(names), key)


def cell_name(overrides: Mapping[str, Any]) -> str:
    """A stable, filesystem-safe name of a cell's overrides, e.g. ``bits=2,method=seq,lr=0.0005``.

    Keys are sorted in a fixed order (``ALIASES`` first), so the name does not depend on the
    grid's order. Values that are not plain tokens (paths) become ``basename~hash``.
    """
    if not overrides:
        return "base"
    named = {_NAME_KEYS.get(k, k): (k, v) for k, v in overrides.items()}
    parts = [f"{ALIASES.get(n, n)}={_fmt(*named[n])}" for n in sorted(named, key=_key_order)]
    name = ",".join(parts)
    if len(name) > _MAX_NAME:
        by_name = {n: v for n, (_, v) in named.items()}
        digest = hashlib.sha1(json.dumps(by_name, sort_keys=True, default=str).encode())
        name = f"{name[: _MAX_NAME - 9]}~{digest.hexdigest()[:8]}"
    return name


_TRAIN_ONLY_KEYS = ("data.train_seq_len",)  # outside train.* but meaningless without training


def _rtn_twin(o: Mapping[str, Any]) -> dict[str, Any]:
    twin = {
        k: v
        for k, v in o.items()
        if (not k.startswith("train.") or k == "train.seed") and k not in _TRAIN_ONLY_KEYS
    }
    twin["train.steps"] = 0
    return twin


def expand(spec: SweepConfig) -> list[Cell]:
    """All cells of a sweep in their fixed order (see the module docstring)."""
    keys = list(spec.grid)
    cells = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*spec.grid.values())]
    if not keys:
        cells = [{}] if not spec.include else []
    cells = [c for c in cells if not any(matches(c, r) for r in spec.exclude)]
    own = [set()] * len(cells) + [set(r) for r in spec.include]  # keys set_when must not touch
    cells += [dict(r) for r in spec.include]
    for rule in spec.set_when:
        for c, keep in zip(cells, own, strict=True):
            if matches({**spec.overrides, **c}, rule.when):
                c.update({k: v for k, v in rule.set.items() if k not in keep})
    if spec.rtn:
        cells += [_rtn_twin(c) for c in cells if int(c.get("train.steps", 1)) != 0]
    if spec.float:
        cells.append({"model.bits": 16, "train.steps": 0})
    out: dict[str, Cell] = {}
    for c in cells:
        name = cell_name(c)
        out.setdefault(name, Cell(name, c))
    return list(out.values())


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise SweepError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def select(
    cells: Sequence[Cell], *, cell: str | None = None, shard: tuple[int, int] | None = None
) -> list[Cell]:
    """The cells one process runs: ``cell`` (an index or a name) or shard ``K/N`` (cells ``i``
    with ``i % N == K``: every cell lands in exactly one shard), else all."""
    if cell is not None and shard is not None:
        raise SweepError("give either --cell or --shard, not both")
    if cell is not None:
        if cell.isdigit():
            i = int(cell)
            if i >= len(cells):
                raise SweepError(
                    f"--cell {i}: the sweep has {len(cells)} cells (0..{len(cells) - 1})"
                )
            return [cells[i]]
        found = [c for c in cells if c.name == cell]
        if not found:
            raise SweepError(f"--cell {cell!r}: no such cell; list them with --dry-run")
        return found
    if shard is not None:
        k, n = shard
        return [c for i, c in enumerate(cells) if i % n == k]
    return list(cells)
