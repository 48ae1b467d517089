"""Data pipeline throughput: markup stripping, tokenization, cache hits, and the batch iterator.

    python benchmarks/bench_data.py                     # SmolLM2-135M's tokenizer (from its GGUF)
    python benchmarks/bench_data.py --tokenizer tests/fixtures/tokenizer --corpus default:shakespeare

Prints medians over ``--repeats`` runs. The iterator's tokens/s is to be read next to the train
step's (anchors: SmolLM2-135M QAT at 4x256 tokens/step runs ~126-350 tokens/s on this CPU), so the
iterator must be orders of magnitude faster; it is measured reading from the memory-mapped cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="smollm2", help='"smollm2" or an HF tokenizer folder')
    ap.add_argument("--corpus", default="default", help="data.path to benchmark")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="global batch size (blocks)")
    ap.add_argument("--batches", type=int, default=5000, help="batches per iterator timing")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

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
