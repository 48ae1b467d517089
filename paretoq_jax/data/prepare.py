"""Prepare a corpus once: tokenize it in parallel into a chunked, checksummed token dataset.

    python -m paretoq_jax.data.prepare --data SOURCE --tokenizer MODEL --out DEST [--workers N]

SOURCE is anything ``data.path`` accepts (file, folder, ``.txt``/``.jsonl``/``.json``/
``.parquet``, ``default``, ``default:shakespeare``) or a Hugging Face dataset (``name``,
``name:config``, ``name@split``), read in streaming mode. DEST is a local folder or a
``gs://`` / ``s3://`` / ``file://`` URL (tensorstore kvstore drivers).

Stages (each resumable; a killed run continues where it stopped when rerun with the same
arguments):

1. tokenize: documents are grouped into shards of ``--shard-docs`` documents (in source order);
   worker processes tokenize shards and write ``.parts/<k>.{main,held}.{tokens,lengths}``
   (raw little-endian arrays) and then ``.parts/<k>.json`` (its counts: marks it done).
   Shard boundaries do not depend on ``--workers``, so neither does the output.
2. split: validation = held-out documents (``--val-fraction``, by a hash of (seed, document
   index)) or the last ``--val-blocks`` blocks of ``--seq-len`` tokens (default 32 x 256, the
   trainer's default); training = the rest.
3. write: each split becomes a zarr3 token array (uint16 if the vocabulary fits, else uint32)
   written shard file by shard file (in parallel), with the crc32 of every inner chunk, plus
   document offsets; then ``manifest.json``, and the parts are deleted.

A finished dataset is never rewritten: the same command again is a no-op, other inputs are
refused. See docs/data.md.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from paretoq_jax.cli import run_cli

from .config import DataError
from .prepared import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MARKER,
    PreparedDataError,
    chunk_crc,
    is_remote,
    kvstore_spec,
    open_kvstore,
    read_json,
    store_url,
)

__all__ = ["PrepareOptions", "prepare", "main"]

_PARTS = ".parts"
_RUN_DIR_MARKERS = ("checkpoints", "metrics.jsonl")  # what a training run directory holds


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides a prepared dataset's bytes (``workers`` does not)."""

    text_field: str = "text"
    add_bos: bool = False
    add_eos: bool = False
    separator: str = "\n\n"
    seq_len: int = 256
    val_blocks: int = 32
    val_fraction: float = 0.0
    seed: int = 0
    chunk_tokens: int = 1 << 16
    shard_chunks: int = 256
    shard_docs: int = 1024

    def __post_init__(self) -> None:
        for name in ("seq_len", "chunk_tokens", "shard_chunks", "shard_docs"):
            if getattr(self, name) < 1:
                raise PreparedDataError(f"--{name.replace('_', '-')} must be >= 1")
        if self.val_blocks < 0:
            raise PreparedDataError("--val-blocks must be >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PreparedDataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


# ---------------------------------------------------------------- documents (streamed)


def _iter_file(path: Path, field: str) -> Iterator[str]:
    from .sources import _read_json, _text_of

    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                    yield _text_of(record, field, f"{path}:{i}")
    elif suffix == ".json":
        yield from _read_json(path, field)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        from .sources import _field_error

        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise _field_error(str(path), field, sorted(pf.schema_arrow.names))
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for v in batch.column(0).to_pylist():
                yield _text_of({field: v}, field, f"{path} row {row}")
                row += 1


def _iter_hub(hub: tuple[str, str | None, str], field: str) -> Iterator[str]:
    """Rows of a Hugging Face dataset in streaming mode (nothing downloaded up front)."""
    from .sources import _text_of

    name, config, split = hub
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise DataError(
            f"{name!r} is not a local file or folder, and streaming it as a Hugging Face "
            f"dataset (config={config!r}, split={split!r}) failed: {type(e).__name__}: {e}"
        ) from e
    for i, row in enumerate(ds):
        yield _text_of(row, field, f"{name} row {i}")


def iter_documents(source: Any, field: str) -> Iterator[str]:
    """Every document of a `sources.Source` in order (empty ones included: shard boundaries
    count raw documents), one file or stream batch in memory at a time."""
    if source.hub is not None:
        yield from _iter_hub(source.hub, field)
    else:
        for f in source.files:
            yield from _iter_file(f, field)


def _source_bytes(source: Any) -> int | None:
    """Input size for the progress ETA (file sizes; unknown for a hub stream)."""
    if source.hub is not None:
        return None
    return sum(f.stat().st_size for f in source.files)


# ---------------------------------------------------------------- tokenizer identity


@dataclasses.dataclass
class _TokenizerSpec:
    """What a worker needs to tokenize exactly like ``tokenizer`` (picklable, cheap to load)."""

    backend_json: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    fallback: Any = None  # a slow (Python) tokenizer, pickled whole

    def build(self) -> Any:
        if self.backend_json is None:
            return self.fallback
        from tokenizers import Tokenizer

        return _FastTokenizer(
            Tokenizer.from_str(self.backend_json), self.bos_token_id, self.eos_token_id
        )


@dataclasses.dataclass
class _FastTokenizer:
    backend_tokenizer: Any
    bos_token_id: int | None
    eos_token_id: int | None


def _vocab_size(tokenizer: Any) -> int:
    from .tokenize import _backend

    backend = _backend(tokenizer)
    sizes = [backend.get_vocab_size(with_added_tokens=True)] if backend is not None else []
    if hasattr(tokenizer, "__len__"):
        sizes.append(len(tokenizer))
    if hasattr(tokenizer, "get_vocab"):
        sizes.append(max(tokenizer.get_vocab().values()) + 1)
    if not sizes:
        raise PreparedDataError(f"cannot tell the vocabulary size of {type(tokenizer).__name__}")
    return max(sizes)


# ---------------------------------------------------------------- the on-disk arrays


def create_token_array(
    dest: str, split: str, n: int, dtype: str, chunk_tokens: int, shard_chunks: int
) -> None:
    """Create (or open, when resuming) ``<dest><split>/tokens/``: a zarr3 array of ``n`` tokens
    in shard files of ``shard_chunks`` inner chunks of ``chunk_tokens`` (its index crc32c'd)."""
    import tensorstore as ts

    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [chunk_tokens],
            "codecs": [bytes_codec],
            "index_codecs": [bytes_codec, {"name": "crc32c"}],
        },
    }
    grid = {"name": "regular", "configuration": {"chunk_shape": [chunk_tokens * shard_chunks]}}
    ts.open(
        {
            "driver": "zarr3",
            "kvstore": kvstore_spec(f"{dest}{split}/tokens/"),
            "metadata": {
                "shape": [n],
                "data_type": dtype,
                "chunk_grid": grid,
                "codecs": [sharding],
            },  # fmt: skip
            "create": True,
            "open": True,
        }
    ).result()


def write_shard(
    dest: str, split: str, s: int, data: np.ndarray, chunk_tokens: int, shard_chunks: int
) -> list[int]:
    """Write shard file ``s`` (tokens ``[s*S, s*S + len(data))``, ``S = chunk_tokens *
    shard_chunks``) in one write, so its bytes do not depend on who writes it; returns the
    crc32 of its inner chunks."""
    import tensorstore as ts

    S = chunk_tokens * shard_chunks
    arr = ts.open({"driver": "zarr3", "kvstore": kvstore_spec(f"{dest}{split}/tokens/")}, open=True,
                  write=True).result()  # fmt: skip
    arr[s * S : s * S + data.size].write(data).result()
    return [chunk_crc(data[i : i + chunk_tokens]) for i in range(0, data.size, chunk_tokens)]


def finish_split(kv: Any, dest: str, split: str, crcs: list[int], offsets: np.ndarray) -> dict:
    """Write a split's ``checksums.u32`` and ``doc_offsets``; returns their manifest entries."""
    import tensorstore as ts

    raw = np.asarray(crcs, "<u4").tobytes()
    kv.write(f"{split}/checksums.u32", raw).result()
    grid = {"name": "regular", "configuration": {"chunk_shape": [min(offsets.size, 1 << 20)]}}
    arr = ts.open(
        {
            "driver": "zarr3",
            "kvstore": kvstore_spec(f"{dest}{split}/doc_offsets/"),
            "metadata": {"shape": [offsets.size], "data_type": "int64", "chunk_grid": grid,
                         "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]},
            "create": True,
            "open": True,
        }
    ).result()  # fmt: skip
    arr.write(offsets).result()
    return {
        "num_docs": int(offsets.size - 1),
        "num_chunks": len(crcs),
        "checksums_sha256": hashlib.sha256(raw).hexdigest(),
    }


# ---------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(tok_spec: _TokenizerSpec, dest: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["tok"] = tok_spec.build()
    _WORKER["kv"] = open_kvstore(dest)


def _holdout(seed: int, first_doc: int, n: int, fraction: float) -> np.ndarray:
    """Whether each document ``first_doc + i`` is held out for validation: a hash of
    (seed, document index) below ``fraction``; independent of sharding and workers."""
    if fraction <= 0:
        return np.zeros(n, bool)
    keys = np.empty(n, np.uint64)
    for i in range(n):
        h = hashlib.blake2b(f"{seed}:{first_doc + i}".encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(h, "little")
    return keys < np.uint64(int(fraction * 2.0**64))


def _tokenize_shard(k: int, first_doc: int, texts: list[str], opts: PrepareOptions, dtype: str):
    """Tokenize shard ``k`` and write its part files; returns its counts."""
    from .tokenize import encode_documents

    tok, kv = _WORKER["tok"], _WORKER["kv"]
    held = _holdout(opts.seed, first_doc, len(texts), opts.val_fraction)
    keep = [i for i, t in enumerate(texts) if t.strip()]  # empty documents are skipped
    stream = encode_documents(
        [texts[i] for i in keep], tok, add_bos=opts.add_bos, add_eos=opts.add_eos,
        separator=opts.separator,
    )  # fmt: skip
    limit = np.iinfo(dtype).max
    if stream.tokens.size and int(stream.tokens.max()) > limit:
        raise PreparedDataError(f"token id {int(stream.tokens.max())} does not fit {dtype}")
    lengths = np.diff(stream.doc_offsets)
    is_held = held[keep] if keep else np.zeros(0, bool)
    counts = {"shard": k, "chars": sum(len(t) for t in texts)}
    for name, mask in (("main", ~is_held), ("held", is_held)):
        docs = np.flatnonzero(mask)
        toks = [stream.tokens[stream.doc_offsets[d] : stream.doc_offsets[d + 1]] for d in docs]
        tokens = np.concatenate(toks) if toks else np.zeros(0, np.int32)
        le = np.dtype(dtype).newbyteorder("<")
        kv.write(_part_key(k, name, "tokens"), tokens.astype(le).tobytes()).result()
        kv.write(_part_key(k, name, "lengths"), lengths[docs].astype("<i8").tobytes()).result()
        counts[f"{name}_tokens"] = int(tokens.size)
        counts[f"{name}_docs"] = int(docs.size)
    kv.write(f"{_PARTS}/{k:09d}.json", json.dumps(counts).encode()).result()  # marks it done
    return counts


def _part_key(k: int, stream: str, kind: str) -> str:
    """A part file: raw little-endian ``tokens`` (the dataset dtype) or ``lengths`` (int64)."""
    return f"{_PARTS}/{k:09d}.{stream}.{kind}"


def _load_part(kv: Any, k: int, stream: str, kind: str, dtype: str) -> np.ndarray:
    r = kv.read(_part_key(k, stream, kind)).result()
    if r.state != "value":
        raise PreparedDataError(f"part {_part_key(k, stream, kind)} vanished; rerun to redo it")
    return np.frombuffer(bytes(r.value), np.dtype(dtype).newbyteorder("<"))


def _write_shard(
    split: str, s: int, pieces: list[tuple[int, int, int]], stream: str, layout: dict
) -> list[int]:
    """Write shard file ``s`` of ``split`` from part ranges ``(part, lo, hi)`` of ``stream``;
    returns the crc32 of its inner chunks (also recorded, so a resumed run skips it)."""
    kv = _WORKER["kv"]
    done = read_json(kv, f"{_PARTS}/done-{split}-{s:09d}.json")
    if done is not None:
        return done["crcs"]
    dtype = layout["dtype"]
    data = np.concatenate(
        [_load_part(kv, k, stream, "tokens", dtype)[lo:hi] for k, lo, hi in pieces]
    )
    crcs = write_shard(
        _WORKER["dest"], split, s, data, layout["chunk_tokens"], layout["shard_chunks"]
    )
    kv.write(f"{_PARTS}/done-{split}-{s:09d}.json", json.dumps({"crcs": crcs}).encode()).result()
    return crcs


def _init_writer(tok_spec: _TokenizerSpec, dest: str) -> None:
    _init_worker(tok_spec, dest)
    _WORKER["dest"] = dest


class _Inline:
    """`concurrent.futures`-like executor running in this process (``--workers 1``)."""

    def submit(self, fn, *args):
        f: cf.Future = cf.Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, *a, **k) -> None:
        pass


def _executor(workers: int, tok_spec: _TokenizerSpec, dest: str):
    if workers <= 1:
        _init_writer(tok_spec, dest)
        return _Inline()
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    return cf.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_pool_worker,
        initargs=(tok_spec, dest, os.getpid()),
    )  # fmt: skip


def _init_pool_worker(tok_spec: _TokenizerSpec, dest: str, parent: int) -> None:
    """A worker process: exits when its prepare process is gone (killed), not orphaned."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    _init_writer(tok_spec, dest)


# ---------------------------------------------------------------- progress


class _Progress:
    def __init__(self, total_bytes: int | None, enabled: bool) -> None:
        self.total, self.enabled = total_bytes, enabled
        self.t0 = self.t_print = time.perf_counter()
        self.tokens = self.new_tokens = self.chars = 0

    def update(self, counts: dict, new: bool, force: bool = False) -> None:
        n = counts["main_tokens"] + counts["held_tokens"]
        self.tokens += n
        self.new_tokens += n if new else 0
        self.chars += counts["chars"]
        now = time.perf_counter()
        if not self.enabled or (now - self.t_print < 1.0 and not force):
            return
        self.t_print = now
        rate = self.new_tokens / max(now - self.t0, 1e-9)
        line = f"prepare: {self.tokens / 1e6:,.2f} M tokens, {rate / 1e3:,.1f} k tokens/s"
        if self.total:
            frac = min(self.chars / self.total, 1.0)
            eta = (self.total - self.chars) / max(self.chars, 1) * (now - self.t0)
            line += f", {100 * frac:.1f}% of input, ETA {_fmt_s(eta if frac < 1 else 0)}"
        print("\r" + line, end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _fmt_s(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------- destination safety


def _check_destination(dest: str) -> None:
    """Refuse a DEST inside a training run or another prepared dataset, or a file."""
    if is_remote(dest):
        return
    p = Path(dest.removeprefix("file://")).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise PreparedDataError(f"--out {p} is a file; give a folder")
    for parent in [p, *p.parents]:
        if parent.is_dir() and any((parent / m).exists() for m in _RUN_DIR_MARKERS):
            raise PreparedDataError(
                f"--out {p} is inside the training run directory {parent}; prepare writes only "
                "into an empty folder or its own earlier output, pick a folder outside runs"
            )
        if parent != p and ((parent / MARKER).exists() or (parent / MANIFEST).exists()):
            raise PreparedDataError(f"--out {p} is inside the prepared dataset {parent}")


def _any_key(kv: Any) -> bool:
    import tensorstore as ts

    return bool(kv.list(ts.KvStore.KeyRange()).result())


# ---------------------------------------------------------------- the pipeline


def prepare(
    data: str | Any,
    tokenizer: Any,
    out: str | Path,
    *,
    options: PrepareOptions | None = None,
    workers: int = 1,
    corpus_cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Prepare ``data`` (a ``data.path`` string or a `sources.Source`) into ``out`` (see the
    module docstring); returns the manifest."""
    from .sources import Source, resolve_source
    from .tokenize import _backend, tokenizer_fingerprint

    opts = options or PrepareOptions()
    dest = store_url(out)
    _check_destination(str(out))
    source = data if isinstance(data, Source) else resolve_source(data, corpus_cache)
    vocab = _vocab_size(tokenizer)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    backend = _backend(tokenizer)
    inputs = {
        "source": source.fingerprint(),  # resolved paths: the spec's spelling does not count
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": dtype,
        "options": dataclasses.asdict(opts),
    }
    marker = {"format": FORMAT, "version": FORMAT_VERSION, "inputs": inputs}
    kv = open_kvstore(out)

    manifest = read_json(kv, MANIFEST)
    if manifest is not None:
        if manifest.get("inputs") == inputs:
            if progress:
                print(f"prepare: {out} is already prepared from these inputs; nothing to do")
            return manifest
        raise PreparedDataError(
            f"{out} holds a finished prepared dataset made from other inputs; it is never "
            "rewritten: use another --out (or delete that folder yourself)"
        )
    old = read_json(kv, MARKER)
    if old is not None and old != marker:
        raise PreparedDataError(
            f"{out} holds an unfinished prepare of other inputs ({MARKER} differs); rerun "
            "that command to finish it, or use another --out"
        )
    if old is None:
        if _any_key(kv):
            raise PreparedDataError(
                f"{out} exists and is not empty, and it is not a prepare output (no {MARKER}); "
                "prepare writes only into an empty or new folder"
            )
        kv.write(MARKER, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode()).result()
    elif progress:
        print(f"prepare: resuming the unfinished prepare in {out}", file=sys.stderr)

    tok_spec = _TokenizerSpec(
        backend.to_str() if backend is not None else None,
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        None if backend is not None else tokenizer,
    )
    pool = _executor(workers, tok_spec, dest)
    try:
        counts = _tokenize_all(source, opts, dtype, kv, pool, max(workers, 1), progress)
        manifest = _write_splits(counts, opts, dtype, kv, pool, dest, progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    manifest.update(
        format=FORMAT,
        version=FORMAT_VERSION,
        source=source.spec,
        inputs=inputs,
        tokenizer={
            "name": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
            "fingerprint": inputs["tokenizer"],
            "vocab_size": vocab,
            "bos_token_id": tok_spec.bos_token_id,
            "eos_token_id": tok_spec.eos_token_id,
        },
    )
    if backend is not None:
        kv.write("tokenizer.json", backend.to_str().encode()).result()
    kv.write(MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()).result()
    import tensorstore as ts

    kv.delete_range(ts.KvStore.KeyRange(f"{_PARTS}/", f"{_PARTS}0")).result()
    if not is_remote(str(out)):  # the file driver leaves the emptied folder behind
        parts = Path(dest.removeprefix("file://")) / _PARTS
        for d in sorted(parts.rglob("*"), reverse=True) + [parts]:
            if d.is_dir():
                d.rmdir()
    return manifest


def _tokenize_all(source, opts, dtype, kv, pool, workers, progress) -> list[dict]:
    """Stage 1: every shard's counts, tokenizing the shards that have no part yet."""
    bar = _Progress(_source_bytes(source), progress)
    counts: list[dict] = []
    inflight: collections.deque = collections.deque()

    def drain(limit: int) -> None:
        while len(inflight) > limit:
            c = inflight.popleft().result()
            counts.append(c)
            bar.update(c, new=True)

    docs = iter_documents(source, opts.text_field)
    k = 0
    while True:
        texts = [t for _, t in zip(range(opts.shard_docs), docs, strict=False)]
        if not texts:
            break
        done = read_json(kv, f"{_PARTS}/{k:09d}.json")
        if done is not None:  # resumed: this shard was tokenized before the kill
            drain(0)
            counts.append(done)
            bar.update(done, new=False)
        else:
            inflight.append(
                pool.submit(_tokenize_shard, k, k * opts.shard_docs, texts, opts, dtype)
            )
            drain(2 * workers)
        k += 1
    drain(0)
    if counts:
        bar.update({"main_tokens": 0, "held_tokens": 0, "chars": 0}, new=False, force=True)
    bar.done()
    if not any(c["main_tokens"] + c["held_tokens"] for c in counts):
        raise DataError(f"corpus {source.spec!r} is empty: no document with text")
    return counts


def _split_ranges(counts: list[dict], opts: PrepareOptions) -> dict[str, tuple[str, int, int]]:
    """Stage 2: each split as (part stream, first token, end token)."""
    n_main = sum(c["main_tokens"] for c in counts)
    n_held = sum(c["held_tokens"] for c in counts)
    if opts.val_fraction > 0:
        if n_held == 0:
            raise DataError(
                f"--val-fraction {opts.val_fraction} held out no document (of "
                f"{sum(c['main_docs'] for c in counts)}); raise it or use --val-blocks"
            )
        return {"train": ("main", 0, n_main), "val": ("held", 0, n_held)}
    L, n_val = opts.seq_len, opts.val_blocks
    n_blocks = n_main // L
    if n_blocks <= n_val:
        raise DataError(
            f"the corpus has {n_main} tokens = {n_blocks} blocks of {L}; --val-blocks {n_val} "
            "needs at least one more to train on. Use a longer corpus or fewer validation blocks"
        )
    if n_val == 0:
        return {"train": ("main", 0, n_main), "val": ("main", 0, 0)}
    cut = (n_blocks - n_val) * L
    return {"train": ("main", 0, cut), "val": ("main", cut, n_blocks * L)}


def _doc_offsets(counts: list[dict], kv: Any, stream: str, lo: int, hi: int) -> np.ndarray:
    """Offsets (relative to ``lo``) of the documents of ``stream`` within ``[lo, hi)``; the
    first and last document may be cut by the split."""
    lengths = [np.zeros(0, np.int64)]
    for c in counts:
        if c[f"{stream}_docs"]:
            lengths.append(_load_part(kv, c["shard"], stream, "lengths", "int64"))
    starts = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
    inner = starts[(starts > lo) & (starts < hi)]
    return np.concatenate([[lo], inner, [hi]]).astype(np.int64) - lo


def _write_splits(counts, opts, dtype, kv, pool, dest, progress) -> dict:
    """Stage 3: the zarr3 arrays, checksums and document offsets of each split."""
    layout = {"chunk_tokens": opts.chunk_tokens, "shard_chunks": opts.shard_chunks}
    S = opts.chunk_tokens * opts.shard_chunks
    splits = {}
    for split, (stream, lo, hi) in _split_ranges(counts, opts).items():
        n = hi - lo
        info = {"num_tokens": n, "stream": stream, **layout}
        splits[split] = info
        if n == 0:
            info.update(num_docs=0, num_chunks=0)
            continue
        create_token_array(dest, split, n, dtype, opts.chunk_tokens, opts.shard_chunks)
        # which part ranges make up each shard file of this split
        ends = np.cumsum([c[f"{stream}_tokens"] for c in counts])
        starts = ends - np.asarray([c[f"{stream}_tokens"] for c in counts])
        futures = []
        for s in range(-(-n // S)):
            a, b = lo + s * S, lo + min((s + 1) * S, n)
            pieces = [
                (c["shard"], int(max(a, st) - st), int(min(b, en) - st))
                for c, st, en in zip(counts, starts, ends, strict=True)
                if st < b and en > a
            ]
            futures.append(
                pool.submit(_write_shard, split, s, pieces, stream, {**layout, "dtype": dtype})
            )
        crcs = []
        for i, f in enumerate(futures):
            crcs += f.result()
            if progress:
                print(f"\rprepare: writing {split}: shard {i + 1}/{len(futures)}", end="",
                      file=sys.stderr, flush=True)  # fmt: skip
        info.update(finish_split(kv, dest, split, crcs, _doc_offsets(counts, kv, stream, lo, hi)))
        if progress:
            print(f"\rprepare: {split}: {n:,} tokens, {len(crcs)} chunks", file=sys.stderr)
    return {"splits": splits}


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    d = PrepareOptions()
    ap = argparse.ArgumentParser(
        prog="python -m paretoq_jax.data.prepare",
        description="Tokenize a corpus once into a chunked, checksummed token dataset.",
    )
    ap.add_argument("--data", required=True, help="SOURCE: file, folder, default[:name], HF name")
    ap.add_argument("--tokenizer", required=True, help="model folder, GGUF or tokenizer folder")
    ap.add_argument("--out", required=True, help="DEST: empty/new folder, or gs://, s3:// URL")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="tokenizer processes (default: all cores); the output does not depend "
                    "on it")  # fmt: skip
    ap.add_argument("--text-field", default=d.text_field)
    ap.add_argument("--add-bos", action="store_true")
    ap.add_argument("--add-eos", action="store_true")
    ap.add_argument("--separator", default=d.separator,
                    help=r'text after each document; \n and \t are decoded (default "\n\n")')  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help="block length of --val-blocks")
    ap.add_argument("--val-blocks", type=int, default=d.val_blocks, help="tail validation blocks")
    ap.add_argument(
        "--val-fraction", type=float, default=d.val_fraction, help="held-out document fraction"
    )
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the document hold-out")
    ap.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens)
    ap.add_argument("--shard-chunks", type=int, default=d.shard_chunks)
    ap.add_argument("--shard-docs", type=int, default=d.shard_docs)
    ap.add_argument("--cache-dir", default=None, help="where embedded corpora are built")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def main(argv: list[str] | None = None) -> int:
    """The CLI under the common error boundary (``docs/cli.md``)."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        separator = args.separator.replace("\\n", "\n").replace("\\t", "\t")
        opts = PrepareOptions(
            text_field=args.text_field, add_bos=args.add_bos, add_eos=args.add_eos,
            separator=separator, seq_len=args.seq_len, val_blocks=args.val_blocks,
            val_fraction=args.val_fraction, seed=args.seed, chunk_tokens=args.chunk_tokens,
            shard_chunks=args.shard_chunks, shard_docs=args.shard_docs,
        )  # fmt: skip
        from .sources import resolve_source

        cache = None if args.cache_dir is None else f"{args.cache_dir}/corpora"
        source = resolve_source(args.data, cache)  # bad SOURCE / DEST fail before the slow
        _check_destination(args.out)  # tokenizer import
        from paretoq_jax.io import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as e:
            raise PreparedDataError(f"cannot load --tokenizer {args.tokenizer}: {e}") from e
        t0 = time.perf_counter()
        m = prepare(
            source, tokenizer, args.out, options=opts, workers=args.workers,
            progress=not args.quiet,
        )  # fmt: skip
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume into {args.out}", file=sys.stderr)
        return 130
    if not args.quiet:
        sp = m["splits"]
        print(
            f"prepared {args.out}: train {sp['train']['num_tokens']:,} tokens, val "
            f"{sp['val']['num_tokens']:,} tokens ({time.perf_counter() - t0:.1f} s)"
        )
    return 0


if __name__ == "__main__":  # the imported module's functions, so worker processes find them
    from paretoq_jax.data.prepare import main as prepare_main

    sys.exit(prepare_main())
