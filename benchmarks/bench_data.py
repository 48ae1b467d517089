"""Data pipeline throughput: markup stripping, tokenization, cache hits, and the batch iterator.

    python benchmarks/bench_data.py                     # SmolLM2-135M's tokenizer (from its GGUF)
    python benchmarks/bench_data.py --tokenizer tests/fixtures/tokenizer --corpus default:shakespeare
    python benchmarks/bench_data.py --prepared 1e8      # prepared-data reader on 1e8 tokens

``--prepared N`` writes a synthetic prepared dataset of N random tokens (uint16, the format of
`paretoq_jax.data.prepare`; ``--prepared-dir`` keeps it for reuse) and measures, in a fresh
process per configuration: time from opening the dataset to the first batch, batch throughput
of `BatchIterator` over `PreparedBlocks` behind a `Prefetcher` (process 0 of 1 and 3 of 8), and
the process's resident memory (VmRSS) before opening and after the batches.

Prints medians over ``--repeats`` runs. The iterator's tokens/s is to be read next to the train
step's (anchors: SmolLM2-135M QAT at 4x256 tokens/step runs ~126-350 tokens/s on this CPU), so the
iterator must be orders of magnitude faster; it is measured reading from the memory-mapped cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from paretoq_jax.data import (
    BatchIterator,
    DataConfig,
    build_splits,
    encode_documents,
    read_documents,
    resolve_source,
)
from paretoq_jax.data.corpora import _shakespeare_documents, _wikipedia_documents

TRAIN_STEP_TOK_S = {"SmolLM2-135M 2-bit QAT fp32 (reference)": 126, "our target bf16": 350}


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _tokenizer(spec: str):
    from paretoq_jax.io import load_tokenizer

    if spec == "smollm2":
        from paretoq_jax import assets

        return load_tokenizer(assets.smollm2_gguf()), "SmolLM2-135M (GGUF)"
    return load_tokenizer(spec), spec


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_prepared(
    dest: Path,
    n_tokens: int,
    *,
    vocab: int = 49152,
    seed: int = 0,
    chunk_tokens: int = 1 << 16,
    shard_chunks: int = 256,
) -> None:
    """A prepared dataset of ``n_tokens`` random training tokens (and 32 x 2048 validation),
    written shard by shard (memory: one shard)."""  # fmt: skip
    from paretoq_jax.data.prepare import create_token_array, finish_split, write_shard
    from paretoq_jax.data.prepared import FORMAT, FORMAT_VERSION, open_kvstore, store_url

    url, kv = store_url(dest), open_kvstore(dest)
    S = chunk_tokens * shard_chunks
    layout = {"chunk_tokens": chunk_tokens, "shard_chunks": shard_chunks}
    splits = {}
    for split, n in (("train", n_tokens), ("val", 32 * 2048)):
        create_token_array(url, split, n, "uint16", chunk_tokens, shard_chunks)
        crcs: list[int] = []
        for s in range(-(-n // S)):
            rng = np.random.default_rng([seed, s, split == "val"])
            data = rng.integers(0, vocab, min(S, n - s * S), dtype=np.uint16)
            crcs += write_shard(url, split, s, data, chunk_tokens, shard_chunks)
        info = finish_split(kv, url, split, crcs, np.arange(0, n + 1, max(n // 1000, 1)))
        splits[split] = {"num_tokens": n, "stream": "main", **layout, **info}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "source": "synthetic",
        "inputs": {"tokenizer": "synthetic", "dtype": "uint16", "source": {"synthetic": n_tokens}},
        "tokenizer": {"name": "synthetic", "fingerprint": "synthetic", "vocab_size": vocab},
        "splits": splits,
    }  # fmt: skip
    kv.write("manifest.json", json.dumps(manifest, indent=1).encode()).result()


def _reader_child(dest: str, seq_len: int, batch: int, batches: int, p: int, n: int) -> dict:
    """One process's reader: first-batch latency, throughput and RSS (run in a fresh process)."""
    from paretoq_jax.data import BatchIterator, Prefetcher, PreparedDataset

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    blocks = PreparedDataset(dest).blocks("train", seq_len)
    it = Prefetcher(BatchIterator(blocks, batch * n, seed=0, process_index=p, process_count=n))
    it.next()
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        it.next()
    dt = time.perf_counter() - t1
    it.close()
    return {"first_batch_s": first, "tokens_per_s": batches * batch * seq_len / dt,
            "rss_before_mb": rss0, "rss_after_mb": _rss_mb(),
            "chunks_read": len(blocks.tokens.chunks_read)}  # fmt: skip


def bench_prepared(args) -> None:
    n = int(float(args.prepared))
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(args.prepared_dir or Path(tmp) / "synthetic")
        if not (dest / "manifest.json").exists():
            t0 = time.perf_counter()
            synthetic_prepared(dest, n)
            size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
            print(f"wrote {n:,} synthetic tokens to {dest}: {size / 2**20:,.0f} MiB in "
                  f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        for p, count in ((0, 1), (3, 8)):
            cmd = [sys.executable, __file__, "--reader-child", str(dest), str(args.seq_len),
                   str(args.batch), str(args.batches), str(p), str(count)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rate = r["tokens_per_s"]
            print(f"prepared reader, process {p} of {count}, {args.batch}x{args.seq_len} rows: "
                  f"first batch {r['first_batch_s']:.2f} s, {rate / 1e6:.2f} M tokens/s, RSS "
                  f"{r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} MB "
                  f"({r['chunks_read']} chunks read)")  # fmt: skip
            for name, tps in TRAIN_STEP_TOK_S.items():
                print(f"  vs train step {name}: ~{tps} tokens/s -> {rate / tps:,.0f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader-child":
        dest, *nums = sys.argv[2:]
        print(json.dumps(_reader_child(dest, *map(int, nums))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="smollm2", help='"smollm2" or an HF tokenizer folder')
    ap.add_argument("--corpus", default="default", help="data.path to benchmark")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="global batch size (blocks)")
    ap.add_argument("--batches", type=int, default=5000, help="batches per iterator timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prepared", default=None, help="benchmark the prepared reader on N tokens")
    ap.add_argument("--prepared-dir", default=None, help="keep/reuse the synthetic dataset here")
    args = ap.parse_args()
    if args.prepared:
        bench_prepared(args)
        return

    tok, tok_name = _tokenizer(args.tokenizer)
    print(f"tokenizer: {tok_name} (vocab {len(tok)}); corpus: {args.corpus}")

    if args.corpus in ("default", "default:wikipedia", "default:shakespeare"):
        build = (
            _shakespeare_documents if args.corpus.endswith("shakespeare") else _wikipedia_documents
        )
        t, docs = _median_time(lambda: list(build()), 1)
        chars = sum(len(d["text"]) for d in docs)
        print(
            f"corpus build (read archive, strip markup): {t:.2f} s, {chars / t / 1e6:.2f} M chars/s"
        )

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(path=args.corpus, seq_len=args.seq_len, cache_dir=tmp)
        texts = read_documents(resolve_source(cfg.path, f"{tmp}/corpora"), cfg.text_field)
        n_chars = sum(len(t) for t in texts)
        t, stream = _median_time(
            lambda: encode_documents(texts, tok, separator=cfg.separator), args.repeats
        )
        n_tok = stream.tokens.size
        print(
            f"tokenization: {len(texts)} docs, {n_chars / 1e6:.2f} M chars -> {n_tok} tokens "
            f"in {t:.2f} s = {n_tok / t / 1e3:.0f} k tokens/s ({n_chars / t / 1e6:.2f} M chars/s)"
        )
        t_cold, (train, val) = _median_time(lambda: build_splits(cfg, tok), 1)
        t_hit, (train, val) = _median_time(lambda: build_splits(cfg, tok), args.repeats)
        print(
            f"build_splits: first {t_cold:.2f} s, cache hit {t_hit * 1e3:.1f} ms "
            f"({len(train)} train + {len(val)} val blocks of {args.seq_len})"
        )

        tokens_per_batch = args.batch * args.seq_len
        rates = {}
        for label, blocks, kw in [
            ("memory-mapped, 1 process", train, {}),
            ("in memory, 1 process", np.ascontiguousarray(train.array), {}),
            ("memory-mapped, process 1 of 4", train, {"process_index": 1, "process_count": 4}),
        ]:
            gbs = args.batch * kw.get("process_count", 1)

            def run(blocks=blocks, gbs=gbs, kw=kw):
                it = BatchIterator(blocks, gbs, seed=0, **kw)
                for _ in range(args.batches):
                    it.next()

            t, _ = _median_time(run, args.repeats)
            rate = rates[label] = args.batches * tokens_per_batch / t
            print(
                f"iterator ({label}), {args.batch}x{args.seq_len} per process: "
                f"{args.batches / t:,.0f} batches/s = {rate / 1e6:.1f} M tokens/s"
            )
        for name, tps in TRAIN_STEP_TOK_S.items():
            print(
                f"  vs train step {name}: ~{tps} tokens/s -> iterator is {rate / tps:,.0f}x faster"
            )


if __name__ == "__main__":
    main()
