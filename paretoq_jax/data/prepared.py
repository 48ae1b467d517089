"""Read a prepared token dataset (made by ``python -m paretoq_jax.data.prepare``).

A prepared dataset is a folder or bucket prefix (``/local/path``, ``file://``, ``gs://``,
``s3://``) holding, per split (``train``, ``val``), a 1-D zarr3 token array in shards of
``shard_chunks`` inner chunks of ``chunk_tokens`` tokens, the crc32 of every inner chunk, the
document offsets, and one ``manifest.json`` (see docs/data.md for the format).

`PreparedBlocks` is a lazy ``(n_blocks, block_len)`` view of one split: indexing it reads only
the chunks that hold the requested blocks (tensorstore: local files, memory-cheap, or byte-range
reads of a bucket), checks each chunk's crc32 and keeps a few recent chunks. `BatchIterator`
over it therefore reads, on each process, only the chunks of that process's rows, and
`Prefetcher` runs it on a background thread. Damaged data raises `ChunkError` naming the chunk.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig, DataError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PreparedDataError",
    "ChunkError",
    "TokenizerMismatchError",
    "PreparedDataset",
    "PreparedBlocks",
    "Prefetcher",
    "is_prepared",
    "prepared_splits",
    "store_url",
    "kvstore_spec",
]

FORMAT = "paretoq_jax.prepared_tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MARKER = "prepare.json"  # written first by prepare: the folder is a prepare's own
SPLITS = ("train", "val")
REMOTE_SCHEMES = ("gs://", "s3://")


class PreparedDataError(DataError):
    """A prepared dataset that cannot be read or written as asked."""


class ChunkError(PreparedDataError):
    """A token chunk that is missing or whose checksum does not match the manifest's."""


class TokenizerMismatchError(PreparedDataError):
    """The dataset was tokenized with another tokenizer than the model's."""


def store_url(path: str | Path) -> str:
    """A tensorstore kvstore URL with a trailing ``/`` for a local path or a bucket URL."""
    s = str(path)
    if not s.startswith((*REMOTE_SCHEMES, "file://")):
        s = "file://" + str(Path(s).expanduser().resolve())
    return s.rstrip("/") + "/"


def is_remote(path: str | Path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def kvstore_spec(url: str) -> Any:
    """tensorstore's kvstore spec for a `store_url` URL. For ``s3://``, an S3-compatible
    endpoint (MinIO, R2, a local test server) is taken from ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` (the AWS SDKs' variables, which tensorstore does not read itself)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not (url.startswith("s3://") and endpoint):
        return url
    bucket, _, key = url[len("s3://") :].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key, "endpoint": endpoint}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return {**spec, "aws_region": region} if region else spec


def open_kvstore(path: str | Path):
    """The tensorstore `KvStore` rooted at ``path`` (local folder or bucket prefix)."""
    import tensorstore as ts

    return ts.KvStore.open(kvstore_spec(store_url(path))).result()


def read_json(kv: Any, key: str) -> dict | None:
    """``key``'s JSON content in ``kv``, or None when absent."""
    r = kv.read(key).result()
    if r.state != "value":
        return None
    return json.loads(bytes(r.value).decode())


def is_prepared(path: str | Path | None) -> bool:
    """Whether ``data.path`` names a prepared dataset (a folder or bucket prefix with a manifest
    or a prepare marker). A bucket URL always counts: no other source reads from a bucket."""
    if path is None:
        return False
    s = str(path)
    if is_remote(s):
        return True
    if s.startswith("file://"):
        s = s[len("file://") :]
    p = Path(s).expanduser()
    return p.is_dir() and ((p / MANIFEST).is_file() or (p / MARKER).is_file())


def chunk_crc(tokens: np.ndarray) -> int:
    """crc32 of a chunk's tokens as little-endian bytes of the stored dtype."""
    return zlib.crc32(np.ascontiguousarray(tokens.astype(tokens.dtype.newbyteorder("<"))))


class SplitTokens:
    """One split's token array: chunked, checksummed reads with a small LRU chunk cache."""

    def __init__(self, root: str, kv: Any, name: str, info: dict, cache_chunks: int) -> None:
        import tensorstore as ts

        self.name, self.root = name, root
        self.num_tokens = int(info["num_tokens"])
        self.chunk_tokens = int(info["chunk_tokens"])
        self.shard_chunks = int(info["shard_chunks"])
        self.num_chunks = -(-self.num_tokens // self.chunk_tokens)
        raw = kv.read(f"{name}/checksums.u32").result()
        if raw.state != "value":
            raise ChunkError(f"{root}{name}/checksums.u32 is missing; re-run prepare")
        self.crcs = np.frombuffer(bytes(raw.value), "<u4")
        if len(self.crcs) != self.num_chunks:
            raise ChunkError(
                f"{root}{name}/checksums.u32 has {len(self.crcs)} entries for {self.num_chunks} "
                "chunks; the dataset is damaged, re-run prepare into a new folder"
            )
        self._kv = kv
        self._array = ts.open(
            {"driver": "zarr3", "kvstore": kvstore_spec(f"{root}{name}/tokens/")},
            open=True,
            read=True,
        ).result()
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_chunks = max(1, cache_chunks)
        self.chunks_read: set[int] = set()  # every chunk fetched (tests and benchmarks)

    def _describe(self, c: int) -> str:
        return (
            f"chunk {c} of split {self.name!r} (tokens [{c * self.chunk_tokens}, "
            f"{min((c + 1) * self.chunk_tokens, self.num_tokens)}), shard file "
            f"{self.root}{self.name}/tokens/c/{c // self.shard_chunks})"
        )

    def _verify(self, c: int, data: np.ndarray) -> None:
        if chunk_crc(data) == int(self.crcs[c]):
            return
        shard = self._kv.read(f"{self.name}/tokens/c/{c // self.shard_chunks}").result()
        what = "is missing" if shard.state != "value" else "fails its checksum"
        raise ChunkError(
            f"{self._describe(c)} {what} (crc32 {chunk_crc(data):08x}, manifest "
            f"{int(self.crcs[c]):08x}); the prepared data is damaged: re-run prepare into a "
            "new folder or restore the file"
        )

    def _chunks(self, ids: list[int]) -> dict[int, np.ndarray]:
        out, pending = {}, {}
        for c in ids:
            if c in self._cache:
                self._cache.move_to_end(c)
                out[c] = self._cache[c]
            elif c not in pending:
                lo = c * self.chunk_tokens
                hi = min(lo + self.chunk_tokens, self.num_tokens)
                pending[c] = self._array[lo:hi].read()  # all reads in flight at once
        for c, fut in pending.items():
            try:
                data = fut.result()
            except Exception as e:  # tensorstore: unreadable / undecodable shard
                raise ChunkError(f"{self._describe(c)} cannot be read: {e}") from e
            self._verify(c, data)
            self.chunks_read.add(c)
            out[c] = self._cache[c] = data
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return out

    def read_ranges(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32 ``(len(starts), length)``: tokens ``[s, s + length)`` for each start."""
        out = np.empty((len(starts), length), np.int32)
        C = self.chunk_tokens
        need = sorted({c for s in starts for c in range(s // C, (s + length - 1) // C + 1)})
        chunks = self._chunks(need) if len(need) <= self._cache_chunks else None
        for i, s in enumerate(starts):
            s, pos = int(s), 0
            while pos < length:
                c, off = divmod(s + pos, C)
                data = chunks[c] if chunks is not None else self._chunks([c])[c]
                k = min(length - pos, len(data) - off)
                out[i, pos : pos + k] = data[off : off + k]
                pos += k
        return out


class PreparedBlocks:
    """``(n_blocks, block_len)`` blocks of a split's tokens ``[start, start + n*block_len)``,
    read on demand; indexing (int, slice, index array) returns int32 numpy arrays."""

    def __init__(self, tokens: SplitTokens, block_len: int, start: int = 0, n: int | None = None):
        self.tokens, self.block_len, self.start = tokens, int(block_len), int(start)
        avail = (tokens.num_tokens - self.start) // self.block_len
        self.n_blocks = avail if n is None else min(int(n), avail)

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_blocks, self.block_len)

    @property
    def seq_len(self) -> int:
        return self.block_len

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int32)

    @property
    def num_tokens(self) -> int:
        return self.n_blocks * self.block_len

    def __repr__(self) -> str:
        return f"PreparedBlocks({self.tokens.name!r}, n_blocks={self.n_blocks}, seq_len={self.block_len})"

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            return self[np.arange(self.n_blocks)[idx]]
        arr = np.asarray(idx)
        if arr.ndim == 0:
            return self[arr.reshape(1)][0]
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < -self.n_blocks or arr.max() >= self.n_blocks):
            raise IndexError(f"block index out of range for {self.n_blocks} blocks")
        arr = np.where(arr < 0, arr + self.n_blocks, arr)
        return self.tokens.read_ranges(self.start + arr * self.block_len, self.block_len)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)


class PreparedDataset:
    """A prepared dataset: its manifest, tokenizer identity and splits."""

    def __init__(self, path: str | Path, *, cache_chunks: int = 64) -> None:
        self.root = store_url(path)
        self._kv = open_kvstore(path)
        manifest = read_json(self._kv, MANIFEST)
        if manifest is None:
            if read_json(self._kv, MARKER) is not None:
                raise PreparedDataError(
                    f"{path} is an unfinished prepare (no {MANIFEST}); rerun the same "
                    "`python -m paretoq_jax.data.prepare` command to finish it"
                )
            raise PreparedDataError(f"{path} is not a prepared dataset (no {MANIFEST})")
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise PreparedDataError(
                f"{path}/{MANIFEST} is format {manifest.get('format')!r} version "
                f"{manifest.get('version')!r}; this reader reads {FORMAT!r} {FORMAT_VERSION}"
            )
        self.path, self.manifest = str(path), manifest
        self._cache_chunks = cache_chunks
        self._splits: dict[str, SplitTokens] = {}

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["inputs"]["tokenizer"]

    def check_tokenizer(self, tokenizer: Any) -> None:
        """`TokenizerMismatchError` unless ``tokenizer`` is the one the data was tokenized with."""
        from .tokenize import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.tokenizer_fingerprint:
            name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
            raise TokenizerMismatchError(
                f"{self.path} was tokenized with {self.manifest['tokenizer']['name']!r} "
                f"(fingerprint {self.tokenizer_fingerprint[:16]}), but the model's tokenizer "
                f"{name!r} differs (fingerprint {fp[:16]}); prepare the corpus again with "
                "the model's tokenizer (--tokenizer MODEL)"
            )

    def split(self, name: str) -> SplitTokens:
        if name not in self._splits:
            info = self.manifest["splits"].get(name)
            if info is None or not info["num_tokens"]:
                raise PreparedDataError(f"{self.path} has no {name!r} split")
            self._splits[name] = SplitTokens(self.root, self._kv, name, info, self._cache_chunks)
        return self._splits[name]

    def num_tokens(self, name: str) -> int:
        info = self.manifest["splits"].get(name)
        return int(info["num_tokens"]) if info else 0

    def blocks(self, name: str, block_len: int, limit: int | None = None) -> PreparedBlocks:
        return PreparedBlocks(self.split(name), block_len, 0, limit)


class _EmptyBlocks(PreparedBlocks):
    def __init__(self, block_len: int) -> None:  # noqa: D107 (no split behind it)
        self.tokens, self.block_len, self.start, self.n_blocks = None, block_len, 0, 0

    def __getitem__(self, idx: Any) -> np.ndarray:
        return np.zeros((0, self.block_len), np.int32)


def prepared_splits(cfg: DataConfig, tokenizer: Any) -> tuple[PreparedBlocks, PreparedBlocks]:
    """``(train, val)`` blocks of the prepared dataset ``cfg.path`` (its recorded split; the
    tokenizer must be the dataset's). `build_splits` calls this when ``is_prepared(cfg.path)``."""
    if cfg.val_path:
        raise PreparedDataError(
            f"data.val_path is not used with a prepared dataset ({cfg.path}); its validation "
            "split is chosen when preparing (python -m paretoq_jax.data.prepare --val-...)"
        )
    ds = PreparedDataset(cfg.path)
    ds.check_tokenizer(tokenizer)
    train = ds.blocks("train", cfg.train_len)
    if len(train) == 0:
        raise PreparedDataError(
            f"{cfg.path}: the train split has {ds.num_tokens('train')} tokens, fewer than one "
            f"block of {cfg.train_len}"
        )
    if ds.num_tokens("val"):
        val = ds.blocks("val", cfg.seq_len, cfg.max_val_blocks)
    else:
        val = _EmptyBlocks(cfg.seq_len)
    return train, val


class Prefetcher:
    """Runs a `BatchIterator` on a background thread, ``depth`` batches ahead.

    ``next()`` returns the same batches in the same order; ``state`` is the iterator's state
    after the last batch *returned* (not the ones queued), so checkpoints resume exactly.
    """

    def __init__(self, iterator: Any, depth: int = 2) -> None:
        self._it = iterator
        self._state = iterator.state
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="data-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = (self._it.next(), self._it.state, None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer on its next call
            self._queue.put((None, None, e))

    @property
    def state(self) -> Any:
        return self._state

    def next(self) -> np.ndarray:
        batch, state, err = self._queue.get()
        if err is not None:
            self._stop.set()
            raise err
        self._state = state
        return batch

    __next__ = next

    def __iter__(self) -> Prefetcher:
        return self

    def close(self) -> None:
        """Stop the background thread (batches already queued are dropped)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
