"""Tokenize documents into one token stream, cached on disk so a second run does not re-tokenize.

The stream is every document's tokens back to back (``[BOS] text+separator [EOS]``, BOS/EOS
optional) as int32, with ``doc_offsets`` (int64, ``n_docs + 1``) marking where each document
starts. A cache entry is a folder ``<cache>/<key>/`` with ``tokens.npy``, ``doc_offsets.npy`` and
``meta.json``; the key hashes the source's files (path, size, mtime), the text field, the
tokenizer's full definition and the options, so any change makes a new entry. Entries are
written to a temporary folder and renamed into place, so a killed run never leaves a partial one.
Every load checks the arrays' sizes against ``meta.json`` and the files' sha256 digests stored
there, so an entry damaged later (bit rot, a copy cut short) is reported and rebuilt rather than
silently training on wrong tokens. See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataError

__all__ = ["TokenStream", "tokenizer_fingerprint", "encode_documents", "cached_token_stream"]

_CACHE_FORMAT = 2  # 2: meta.json holds the files' sha256 digests
_FILES = ("tokens.npy", "doc_offsets.npy")


class _DamagedEntry(Exception):
    """A cache entry whose files disagree with its meta.json."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _load_entry(entry: Path) -> TokenStream:
    """The entry's stream, after checking sizes and digests; raises `_DamagedEntry`."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        for name in _FILES:
            if _digest(entry / name) != meta["sha256"][name]:
                raise _DamagedEntry(f"{name} does not match its sha256 in meta.json")
        tokens = np.load(entry / "tokens.npy", mmap_mode="r")
        offsets = np.load(entry / "doc_offsets.npy")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _DamagedEntry(f"{type(e).__name__}: {e}") from e
    n, docs = meta.get("num_tokens"), meta.get("num_docs")
    if tokens.dtype != np.int32 or tokens.shape != (n,) or offsets.shape != (docs + 1,):
        raise _DamagedEntry(
            f"arrays {tokens.dtype}{tokens.shape} / {offsets.shape} disagree with meta.json "
            f"({n} tokens, {docs} documents)"
        )
    if docs and (offsets[0] != 0 or offsets[-1] != n):
        raise _DamagedEntry("doc_offsets do not span the tokens")
    return TokenStream(tokens, offsets)


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Concatenated tokens of a corpus and the start offset of each document."""

    tokens: np.ndarray  # int32 (n_tokens,), memory-mapped when loaded from the cache
    doc_offsets: np.ndarray  # int64 (n_docs + 1,)

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1


def _backend(tokenizer: Any):
    """The `tokenizers.Tokenizer` behind an HF fast tokenizer (or the object itself), or None."""
    import tokenizers

    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, tokenizers.Tokenizer) else None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides the tokenizer's output (its full JSON definition and
    BOS/EOS ids; for a slow tokenizer, its class, name and vocabulary)."""
    h = hashlib.sha256()
    backend = _backend(tokenizer)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(type(tokenizer).__qualname__.encode())
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        raise DataError(
            f"cannot use a {type(tokenizer).__name__} as tokenizer; pass a Hugging Face "
            "tokenizer (transformers.AutoTokenizer) or a tokenizers.Tokenizer"
        )
    for attr in ("bos_token_id", "eos_token_id"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)}".encode())
    return h.hexdigest()


def _special_id(tokenizer: Any, which: str) -> int:
    tid = getattr(tokenizer, f"{which}_token_id", None)
    if tid is None:
        raise DataError(
            f"data.add_{which}=true but the tokenizer has no {which.upper()} token; "
            f"set data.add_{which}=false or use a tokenizer that defines one"
        )
    return int(tid)


def encode_documents(
    texts: list[str],
    tokenizer: Any,
    *,
    add_bos: bool = False,
    add_eos: bool = False,
    separator: str = "",
    batch_size: int = 512,
) -> TokenStream:
    """Tokenize ``texts`` in batches (the fast tokenizer runs a batch on all cores) and
    concatenate them: each document is ``[BOS] tokens(text + separator) [EOS]``."""
    bos = [_special_id(tokenizer, "bos")] if add_bos else []
    eos = [_special_id(tokenizer, "eos")] if add_eos else []
    backend = _backend(tokenizer)
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())  # a private copy without them
        backend.no_truncation()
        backend.no_padding()
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        batch = [t + separator for t in texts[start : start + batch_size]]
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
        else:
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for j, doc in enumerate(ids):
            arr = np.asarray(bos + list(doc) + eos, dtype=np.int64)
            lengths[start + j] = arr.size
            pieces.append(arr)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
        raise DataError("token ids do not fit in int32")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenStream(tokens.astype(np.int32), offsets)


def default_cache_dir() -> Path:
    """``$PARETOQ_CACHE/tokens`` (default ``~/.cache/paretoq_jax/tokens``)."""
    from .. import assets

    return assets.cache_dir() / "tokens"


def cached_token_stream(
    source: Any,
    tokenizer: Any,
    *,
    text_field: str = "text",
    add_bos: bool = False,
    add_eos: bool = False,
    separator: str = "",
    cache_dir: str | Path | None = None,
) -> TokenStream:
    """The token stream of a `sources.Source`, from the cache when present (memory-mapped, no
    tokenizer call), else read + tokenized + stored. Raises `DataError` for unusable corpora."""
    from .sources import read_documents

    key_data = {
        "format": _CACHE_FORMAT,
        "source": source.fingerprint(),
        "text_field": text_field,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "add_bos": add_bos,
        "add_eos": add_eos,
        "separator": separator,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:24]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.spec).name or source.spec)[:40]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / f"{label}-{key}"
    if (entry / "meta.json").exists():
        try:
            return _load_entry(entry)
        except _DamagedEntry as e:
            print(f"[data] token cache entry {entry} is damaged ({e}); rebuilding it")
            shutil.rmtree(entry, ignore_errors=True)  # derived data: tokenized again below
    t0 = time.perf_counter()
    docs = read_documents(source, text_field)
    stream = encode_documents(
        docs, tokenizer, add_bos=add_bos, add_eos=add_eos, separator=separator
    )
    seconds = time.perf_counter() - t0
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "tokens.npy", stream.tokens)
    np.save(tmp / "doc_offsets.npy", stream.doc_offsets)
    meta = {
        "sha256": {name: _digest(tmp / name) for name in _FILES},
        **key_data,
        "spec": source.spec,
        "tokenizer_name": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "num_tokens": int(stream.tokens.size),
        "num_docs": stream.num_docs,
        "num_chars": int(sum(len(d) for d in docs)),
        "tokenize_seconds": round(seconds, 3),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if entry.exists() and not (entry / "meta.json").exists():
        shutil.rmtree(entry, ignore_errors=True)  # a foreign, incomplete folder
    try:
        os.rename(tmp, entry)
    except OSError:  # another process finished the same entry first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_entry(entry)
