"""Typed dataclass configs: YAML files plus dotted command-line overrides.

Any (nested) ``dataclasses.dataclass`` is a config schema. Values are checked and coerced against
the field annotations (``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``X | None``,
``float | str``, ``list[X]``/``tuple[X, ...]``, ``dict``, nested dataclasses). Unknown keys are
rejected with the closest valid key::

    cfg = load_config(RunConfig, "configs/tiny.yaml", ["train.steps=20", "model.bits=2"])
    save_config(cfg, run_dir / "config.yaml")

A YAML file may name a base file with ``base: other.yaml`` (relative to itself); its keys are
merged under the file's own keys.

A schema renames a key by listing it in a ``MOVED_KEYS: ClassVar[dict[str, str]]`` class attribute
(old field name -> new dotted path below the class). User input with the old key is rejected
with an error naming the new one; files an earlier version wrote (a run's saved
``config.yaml``) are read with ``load_config(..., stored=True)``, which moves the old keys to
their new place (:func:`migrate`) with one notice.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from paretoq_jax.errors import ParetoQError

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "load_config",
    "load_yaml",
    "migrate",
    "moved_keys",
    "parse_overrides",
    "apply_overrides",
    "set_dotted",
    "save_config",
    "valid_keys",
]


class ConfigError(ParetoQError, ValueError):
    """A config value or key is invalid; the message names the key and the fix."""


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema (nested dataclasses expanded)."""
    keys = []
    for f, tp in _fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        sub = _dataclass_in(tp)
        if sub is not None:
            keys.extend(valid_keys(sub, key + "."))
    return keys


def moved_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Every renamed key of a dataclass schema and its sections: ``{old dotted key: new one}``."""
    out = {f"{prefix}{old}": f"{prefix}{new}" for old, new in _moved(cls).items()}
    for f, tp in _fields(cls):
        sub = _dataclass_in(tp)
        if sub is not None:
            out.update(moved_keys(sub, f"{prefix}{f.name}."))
    return out


def _moved(cls: type) -> Mapping[str, str]:
    return getattr(cls, "MOVED_KEYS", {})


def _old_keys(cls: type, data: Mapping) -> list[str]:
    """The keys of ``data`` that ``cls`` has moved: no longer a field, or a field that became a
    section but holds a plain value (e.g. ``distill: true`` where ``distill`` is now a section)."""
    fields = {f.name: tp for f, tp in _fields(cls)}
    return [
        k
        for k in _moved(cls)
        if k in data
        and (k not in fields or (_dataclass_in(fields[k]) and not isinstance(data[k], Mapping)))
    ]


def migrate(cls: type, data: Mapping, source: str | Path | None = None) -> dict:
    """``data`` (a nested mapping for schema ``cls``) with every key the schema has moved
    (``MOVED_KEYS``) at its new place (a copy: ``data`` is left as it is); one notice on stderr
    naming them when ``source`` (the file it came from) is given."""
    out, moved = _migrate(cls, copy.deepcopy(dict(data)), "")
    if moved and source is not None:
        print(
            f"note: {source} was written with old config keys; read as "
            + ", ".join(f"{old} -> {new}" for old, new in moved),
            file=sys.stderr,
        )
    return out


def _migrate(cls: type, data: Mapping, prefix: str) -> tuple[dict, list[tuple[str, str]]]:
    out = dict(data)
    moved = [(k, _moved(cls)[k]) for k in _old_keys(cls, out)]
    values = {new: out.pop(old) for old, new in moved}
    for new, value in values.items():
        set_dotted(out, new, value, replace=True)
    done = [(prefix + old, prefix + new) for old, new in moved]
    for f, tp in _fields(cls):
        sub = _dataclass_in(tp)
        if sub is not None and isinstance(out.get(f.name), Mapping):
            out[f.name], more = _migrate(sub, out[f.name], f"{prefix}{f.name}.")
            done += more
    return out, done


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside ``tp`` (``D`` or ``D | None``), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        subs = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return subs[0] if len(subs) == 1 else None
    return None


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _unknown_key_error(cls: type, key: str, prefix: str, root: type | None) -> ConfigError:
    full = f"{prefix}{key}"
    moved = moved_keys(root or cls)  # a slip of an old key: name the key it moved to
    close = difflib.get_close_matches(full, valid_keys(root or cls) + list(moved), n=1, cutoff=0.5)
    close = [moved.get(c, c) for c in close]
    if not close:  # try the bare name against the same level
        local = [f.name for f, _ in _fields(cls)]
        near = difflib.get_close_matches(key, local, n=1, cutoff=0.5)
        close = [prefix + near[0]] if near else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    level = [f.name for f, _ in _fields(cls)]
    return ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {', '.join(level)})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, root: type | None) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (e.g. YAML int -> float)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}' may not be null (expected {_type_name(tp)})")
        errors = []
        # Exact type matches first so that `float | str` keeps "ternary" a str and 2 a number.
        ordered = sorted(
            (a for a in args if a is not type(None)),
            key=lambda a: 0 if isinstance(a, type) and isinstance(value, a) else 1,
        )
        for arg in ordered:
            try:
                return _coerce(value, arg, key, root)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"config key '{key}': {value!r} matches none of {_type_name(tp)} ({'; '.join(errors)})"
        )
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"config key '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' is a section; give a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".", _root=root)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' needs {len(args)} items, got {value!r}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]", root)
                for i, (v, a) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads "2e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except Exception as e:
            raise ConfigError(
                f"config key '{key}': cannot make {_type_name(tp)} of {value!r}: {e}"
            ) from e
    return value


def from_dict(
    cls: type[T], data: Mapping[str, Any], prefix: str = "", _root: type | None = None
) -> T:
    """Build dataclass ``cls`` from a nested mapping, validating every key and value."""
    root = _root or cls
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    fields = dict((f.name, (f, tp)) for f, tp in _fields(cls))
    old = _old_keys(cls, data)
    if old:  # every one at once: an old config file is fixed in one go
        moves = "; ".join(f"'{prefix}{k}' moved to '{prefix}{_moved(cls)[k]}'" for k in old)
        raise ConfigError(f"config key {moves}: write the new key{'s' * (len(old) > 1)} instead")
    for key in data:
        if key not in fields:
            raise _unknown_key_error(cls, str(key), prefix, root)
    kwargs = {}
    for name, (f, tp) in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = _coerce(data[name], tp, key, root)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{key}' is required but missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config section '{prefix.rstrip('.') or '<root>'}': {e}") from e


def to_dict(cfg: Any) -> Any:
    """A dataclass config as plain YAML-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path`` (``{}`` when empty); a :class:`ConfigError` naming the file
    and the line when it is not valid YAML or not text."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (UTF-8) file") from None


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file, resolving an optional ``base:`` file it names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(load_yaml(path.parent / base), data)
    return data


def parse_overrides(items: Sequence[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.steps=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value, what=f"override '{item}'")
    return out


def set_dotted(
    data: dict, key: str, value: Any, *, replace: bool = False, what: str | None = None
) -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating missing levels. A level that
    holds something other than a mapping is replaced by one with ``replace``, else a
    ``ConfigError`` names it (``what``: how to call ``key`` in that error)."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if p not in node or (replace and not isinstance(node[p], dict)):
            node[p] = {}
        elif not isinstance(node[p], dict):
            raise ConfigError(f"{what or repr(key)} conflicts with an earlier value of '{p}'")
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(data: Mapping, items: Sequence[str]) -> dict:
    """Merge dotted overrides into a nested mapping."""
    return _merge(dict(data), parse_overrides(items))


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    stored: bool = False,
) -> T:
    """Config ``cls`` from an optional YAML file and dotted overrides (later wins).

    ``stored``: the file is one an earlier version may have written (a run's saved ``config.yaml``):
    keys renamed since are read at their new place (one notice), not rejected.
    """
    data = load_yaml(path) if path is not None else {}
    if stored:
        data = migrate(cls, data, source=path)
    return from_dict(cls, apply_overrides(data, overrides))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (it reloads with ``load_config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
