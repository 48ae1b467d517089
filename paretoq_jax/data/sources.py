"""Corpus sources: resolve a ``data.path`` string and read its documents as plain strings.

A source is a local file, a local folder (every supported file below it, in sorted path order),
an embedded default corpus (``"default"``, ``"default:<name>"``) or a Hugging Face dataset
(``name``, ``name:config``, ``name@split``; loaded with `datasets.load_dataset` where a hub is
reachable). Documents: a ``.txt`` file is one document; each ``.jsonl`` line, ``.json`` record,
``.parquet`` row or dataset row is one document (its ``text_field``). Empty documents are skipped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import DataError

__all__ = ["SUPPORTED_EXTENSIONS", "Source", "resolve_source", "read_documents"]

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved corpus: local ``files``, or a hub dataset ``(name, config, split)``."""

    spec: str
    files: tuple[Path, ...] = ()
    hub: tuple[str, str | None, str] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this source's content for the token cache: each file's resolved
        path, size and modification time, or the hub dataset's name, config and split."""
        if self.hub is not None:
            return {"hub": list(self.hub)}
        out = []
        for f in self.files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return {"files": out}


def _looks_local(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in SUPPORTED_EXTENSIONS
    )


def resolve_source(spec: str | None, corpus_cache: str | Path | None = None) -> Source:
    """Turn a ``data.path`` / ``data.val_path`` string into a `Source` (no reading yet)."""
    from .corpora import DEFAULT_CORPORA, default_corpus

    spec = "default" if spec is None else str(spec).strip()
    if not spec:
        raise DataError('data.path is empty; give a file, folder, dataset name or "default"')
    if spec == "default" or spec.startswith("default:"):
        name = spec.partition(":")[2] or "wikipedia"
        if name not in DEFAULT_CORPORA:
            raise DataError(
                f"unknown default corpus {spec!r}; use one of "
                + ", ".join(f'"default:{n}"' for n in DEFAULT_CORPORA)
            )
        return Source(spec, files=(default_corpus(corpus_cache, name=name),))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"unsupported file type {path.suffix!r} for {path}; supported: "
                f"{', '.join(SUPPORTED_EXTENSIONS)} (convert it, or point at a folder of those)"
            )
        return Source(spec, files=(path,))
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUPPORTED_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            found = sorted({p.suffix or p.name for p in path.rglob("*") if p.is_file()})
            raise DataError(
                f"folder {path} holds no corpus files ({', '.join(SUPPORTED_EXTENSIONS)}); "
                f"found: {found or 'nothing'}"
            )
        return Source(spec, files=tuple(files))
    if _looks_local(spec):
        raise DataError(f"corpus file or folder not found: {path} (data.path={spec!r})")
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return Source(spec, hub=(name, config or None, split or "train"))


def _field_error(where: str, field: str, available: list[str]) -> DataError:
    return DataError(
        f"{where} has no text field {field!r}; available fields: {available}. "
        f"Set data.text_field to the one holding the text."
    )


def _text_of(record: Any, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with a {field!r} field, got {record!r:.80}")
    if field not in record:
        raise _field_error(where, field, sorted(record))
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            docs.append(_text_of(record, field, f"{path}:{i}"))
    return docs


def _read_json(path: Path, field: str) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, list):
        return [_text_of(r, field, f"{path}[{i}]") for i, r in enumerate(data)]
    if isinstance(data, dict):  # columnar: {"text": [...], ...}
        if field not in data:
            raise _field_error(str(path), field, sorted(data))
        column = data[field]
        if not isinstance(column, list):
            raise DataError(
                f"{path}: {field!r} must be a list of texts, got {type(column).__name__}"
            )
        return [
            _text_of({field: v}, field, f"{path}[{field!r}][{i}]") for i, v in enumerate(column)
        ]
    raise DataError(f"{path}: expected a list of records or a dict of columns")


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    names = pq.read_schema(path).names
    if field not in names:
        raise _field_error(str(path), field, sorted(names))
    column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    return [_text_of({field: v}, field, f"{path} row {i}") for i, v in enumerate(column)]


def _read_hub(hub: tuple[str, str | None, str], field: str) -> list[str]:
    name, config, split = hub
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # no hub, unknown name, ...: say what was tried
        raise DataError(
            f"{name!r} is not a local file or folder, and loading it as a Hugging Face dataset "
            f"(config={config!r}, split={split!r}) failed: {type(e).__name__}: {e}"
        ) from e
    if field not in ds.column_names:
        raise _field_error(f"dataset {name!r}", field, sorted(ds.column_names))
    return [_text_of({field: v}, field, f"{name} row {i}") for i, v in enumerate(ds[field])]


_READERS = {".txt": None, ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def read_documents(source: Source, text_field: str = "text") -> list[str]:
    """All non-empty documents of ``source`` in order; `DataError` if there are none."""
    if source.hub is not None:
        raw = _read_hub(source.hub, text_field)
    else:
        raw = []
        for f in source.files:
            suffix = f.suffix.lower()
            if suffix == ".txt":
                raw.append(f.read_text(encoding="utf-8", errors="replace"))
            else:
                raw.extend(_READERS[suffix](f, text_field))
    docs = [d for d in raw if d.strip()]
    if not docs:
        raise DataError(
            f"corpus {source.spec!r} is empty: {len(raw)} documents, none with text"
            + (f" (files: {[str(f) for f in source.files][:5]})" if source.files else "")
        )
    return docs
