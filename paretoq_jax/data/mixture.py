"""The embedded corpora mixed into one train/validation corpus with its own small BPE tokenizer.

For from-scratch scaling studies (``configs/sweeps/scaling-*.yaml``): the Wikipedia sample, the
Shakespeare plays, the King James Bible and the Lee news corpus (`corpora.DEFAULT_CORPORA`),
every document cut at line boundaries into chunks of at most ``chunk_chars`` characters, each
chunk held out for validation when ``blake2b(f"{seed}:{source}:{doc}:{chunk}") / 2**64 <
val_fraction`` (so every source is in both splits), and a byte-level BPE of ``vocab_size``
tokens trained on the **training chunks only**. ``python -m paretoq_jax.data.mixture --out DEST``
writes::

    DEST/train.jsonl, DEST/val.jsonl   {"source", "title", "text"} per chunk, in source order
    DEST/tokenizer/                    tokenizer.json + tokenizer_config.json (HF fast tokenizer)
    DEST/manifest.json                 inputs, counts, sha256 of every file (written last)

Train with ``data.path=DEST/train.jsonl data.val_path=DEST/val.jsonl
model.tokenizer=DEST/tokenizer``. Rerunning with the same inputs is a no-op; other inputs into a
finished DEST are refused. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from paretoq_jax.cli import run_cli
from paretoq_jax.outputs import atomic_output

from .config import DataError
from .corpora import DEFAULT_CORPORA, default_corpus

__all__ = ["MIXTURE_SOURCES", "build_mixture", "chunk_text", "is_held_out", "train_bpe"]

MIXTURE_SOURCES = ("wikipedia", "shakespeare", "kjv", "news")
SPECIAL_TOKENS = ("<|endoftext|>", "<|bos|>", "<|pad|>")  # ids 0, 1, 2
FORMAT_VERSION = 1


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """``text`` cut at line ends into pieces of at most ``chunk_chars`` characters (a longer
    single line is cut mid-line); whitespace-only pieces are dropped."""
    if chunk_chars < 1:
        raise DataError(f"chunk_chars must be >= 1, got {chunk_chars}")
    out: list[str] = []
    cur = ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            if cur.strip():
                out.append(cur.strip())
            cur = ""
            out.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(cur) + len(line) > chunk_chars and cur.strip():
            out.append(cur.strip())
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur.strip())
    return [c for c in out if c.strip()]


def is_held_out(seed: int, source: str, doc: int, chunk: int, fraction: float) -> bool:
    """Whether chunk ``chunk`` of document ``doc`` of ``source`` is validation (a keyed hash)."""
    h = hashlib.blake2b(f"{seed}:{source}:{doc}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def _chunks(
    sources: Sequence[str], chunk_chars: int, cache_dir: str | Path | None
) -> Iterator[tuple[str, int, int, str, str]]:

    for source in sources:
        with open(default_corpus(cache_dir, name=source), encoding="utf-8") as f:
            for d, line in enumerate(f):
                doc = json.loads(line)
                for c, text in enumerate(chunk_text(doc["text"], chunk_chars)):
                    yield source, d, c, str(doc.get("title", "")), text


def train_bpe(texts: Sequence[str], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, specials ``<|endoftext|>`` = 0,
    ``<|bos|>`` = 1, ``<|pad|>`` = 2) on ``texts`` and save it as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[2],
        "model_max_length": 1048576,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_mixture(
    out: str | Path,
    *,
    sources: Sequence[str] = MIXTURE_SOURCES,
    val_fraction: float = 0.02,
    seed: int = 0,
    chunk_chars: int = 4000,
    vocab_size: int = 2048,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build (or find, when built with the same inputs) the mixture in ``out``; its manifest."""

    unknown = [s for s in sources if s not in DEFAULT_CORPORA]
    if unknown or not sources:
        raise DataError(f"unknown sources {unknown}; choose from {list(DEFAULT_CORPORA)}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if vocab_size < 300:
        raise DataError(f"vocab_size must be >= 300 (256 bytes + specials), got {vocab_size}")
    import tokenizers

    inputs = {
        "format": FORMAT_VERSION,
        "sources": list(sources),
        "val_fraction": val_fraction,
        "seed": seed,
        "chunk_chars": chunk_chars,
        "vocab_size": vocab_size,
        "tokenizers": tokenizers.__version__,
    }
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a new or empty folder (nothing was changed)")
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("inputs") != inputs:
            raise DataError(
                f"{out} holds a mixture built from other inputs ({manifest.get('inputs')}); "
                "choose another --out (nothing was changed)"
            )
        return manifest
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not an unfinished mixture; choose an empty --out")
    with atomic_output(out, "mixture", directory=True) as tmp:
        return _write_mixture(tmp, inputs, sources, chunk_chars, cache_dir)


def _write_mixture(
    tmp: Path,
    inputs: dict[str, Any],
    sources: Sequence[str],
    chunk_chars: int,
    cache_dir: str | Path | None,
) -> dict[str, Any]:
    """Write the mixture's splits, tokenizer and manifest into the fresh folder ``tmp``."""
    seed, val_fraction, vocab_size = inputs["seed"], inputs["val_fraction"], inputs["vocab_size"]
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
    counts: dict[str, dict[str, int]] = {}
    for source, d, c, title, text in _chunks(sources, chunk_chars, cache_dir):
        split = "val" if is_held_out(seed, source, d, c, val_fraction) else "train"
        splits[split].append({"source": source, "title": title, "text": text})
        n = counts.setdefault(source, {"train_chars": 0, "val_chars": 0})
        n[f"{split}_chars"] += len(text)
    for split, rows in splits.items():
        _write_jsonl(tmp / f"{split}.jsonl", rows)
    train_bpe([r["text"] for r in splits["train"]], vocab_size, tmp / "tokenizer")
    files = [
        "train.jsonl",
        "val.jsonl",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ]
    manifest = {
        "inputs": inputs,
        "chunks": {k: len(v) for k, v in splits.items()},
        "chars": counts,
        "sha256": {f: _sha256(tmp / f) for f in files},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m paretoq_jax.data.mixture --out DEST [options]``."""

    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m paretoq_jax.data.mixture", description=__doc__)
    p.add_argument("--out", required=True, help="destination folder (new or empty)")
    p.add_argument("--sources", default=",".join(MIXTURE_SOURCES))
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-chars", type=int, default=4000)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--cache-dir", default=None, help="corpora cache (default $PARETOQ_CACHE)")
    a = p.parse_args(argv)
    m = build_mixture(
        a.out,
        sources=[s for s in a.sources.split(",") if s],
        val_fraction=a.val_fraction,
        seed=a.seed,
        chunk_chars=a.chunk_chars,
        vocab_size=a.vocab_size,
        cache_dir=a.cache_dir,
    )
    print(json.dumps({"out": str(a.out), "chunks": m["chunks"], "chars": m["chars"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
