"""`python -m paretoq_jax.data.prepare` and prepared-data reads: same blocks as the in-process
path, byte-identical output for any --workers, resume, refusals, damage detection, per-process
chunk reads and exact resume of the batch sequence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paretoq_jax.data import (
    BatchIterator,
    ChunkError,
    DataConfig,
    DataError,
    Prefetcher,
    PreparedDataError,
    PreparedDataset,
    TokenizerMismatchError,
    build_splits,
)
from paretoq_jax.data import prepare as prep
from paretoq_jax.data.prepare import PrepareOptions, iter_documents, prepare
from paretoq_jax.data.sources import Source

_REAL_TOKENIZE = prep._tokenize_shard

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = FIXTURES / "corpus"
# small chunks and shards so the fixture corpus (~113k tokens) spans many of each
SMALL = dict(seq_len=64, val_blocks=16, chunk_tokens=1024, shard_chunks=4, shard_docs=2)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("prep") / "ds"
    prepare(str(CORPUS), tok, out, options=PrepareOptions(**SMALL), progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _cfg(path, tmp_path, **kw) -> DataConfig:
    return DataConfig(path=str(path), seq_len=64, val_blocks=16, cache_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("train_seq_len", [None, 48])
def test_prepared_blocks_equal_build_splits(prepared, tok, tmp_path, train_seq_len):
    train, val = build_splits(_cfg(CORPUS, tmp_path, train_seq_len=train_seq_len), tok)
    ptrain, pval = build_splits(_cfg(prepared, tmp_path, train_seq_len=train_seq_len), tok)
    assert (len(ptrain), len(pval)) == (len(train), len(val)) and len(val) == 16
    np.testing.assert_array_equal(ptrain[:], np.asarray(train))
    np.testing.assert_array_equal(pval[:], np.asarray(val))
    a, b = BatchIterator(train, 8, seed=3), BatchIterator(ptrain, 8, seed=3)
    for _ in range(30):
        np.testing.assert_array_equal(a.next(), b.next())


def test_manifest_records_split_tokenizer_and_dtype(prepared, tok):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["inputs"]["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == len(tok)
    assert m["splits"]["val"]["num_tokens"] == 16 * 64
    zarr = json.loads((prepared / "train" / "tokens" / "zarr.json").read_text())
    assert zarr["data_type"] == "uint16" and zarr["shape"] == [m["splits"]["train"]["num_tokens"]]
    crcs = np.fromfile(prepared / "train" / "checksums.u32", "<u4")
    assert len(crcs) == m["splits"]["train"]["num_chunks"] > 20
    assert not (prepared / ".parts").exists()
    offs = PreparedDataset(prepared).manifest["splits"]["train"]["num_docs"]
    assert offs == 5  # the fixture's 5 documents, the last one cut by the validation tail


def test_cli_no_op_when_finished_and_refusals(prepared, tmp_path, capsys):
    args = ["--data", str(CORPUS), "--tokenizer", str(FIXTURES / "tokenizer"), "--quiet"]
    small = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    before = {p: p.stat().st_mtime_ns for p in prepared.rglob("*")}
    assert prep.main([*args, *small, "--out", str(prepared), "--workers", "1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*")} == before  # untouched
    # other inputs (a different split) into a finished dataset: refused, nothing changed
    assert prep.main([*args, *small, "--val-blocks", "8", "--out", str(prepared)]) == 2
    assert "never rewritten" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*")} == before
    # a folder with other content, and a folder inside a training run: refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert prep.main([*args, "--out", str(foreign)]) == 2
    assert "not a prepare output" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert prep.main([*args, "--out", str(run / "data")]) == 2
    assert "training run directory" in capsys.readouterr().err
    assert not (run / "data").exists()
    assert prep.main([*args, "--out", str(prepared / "inner")]) == 2
    assert "inside the prepared dataset" in capsys.readouterr().err


def test_cli_output_identical_for_any_workers(prepared, tmp_path):
    """`python -m paretoq_jax.data.prepare --workers 2` (worker processes) writes the same bytes
    as the in-process prepare (1 worker), shows progress, and reports errors plainly."""
    small = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    cmd = [sys.executable, "-m", "paretoq_jax.data.prepare", *small]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--data", str(CORPUS), "--tokenizer", str(FIXTURES / "tokenizer")]
    ok = subprocess.run([*cmd, *args, "--out", str(tmp_path / "ds"), "--workers", "2"],
                        capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "k tokens/s" in ok.stderr and "ETA" in ok.stderr and "prepared" in ok.stdout
    assert _files(tmp_path / "ds") == _files(prepared)
    bad = subprocess.run([*cmd, "--data", str(tmp_path / "nope.txt"), "--tokenizer", "x",
                          "--out", str(tmp_path / "ds2")], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not found" in bad.stderr and "Traceback" not in bad.stderr


class _Killed(Exception):
    pass


@pytest.mark.parametrize("stage", ["tokenize", "write"])
def test_resume_after_kill(prepared, tok, tmp_path, monkeypatch, stage):
    """A prepare killed mid-way continues where it stopped (finished shards are not redone) and
    gives the same bytes as an uninterrupted one."""
    out = tmp_path / "ds"
    fn = {"tokenize": "_tokenize_shard", "write": "_write_shard"}[stage]
    real, calls = getattr(prep, fn), []

    def dies_at_second(*a):
        calls.append(a)
        if len(calls) == 2:
            raise _Killed  # the process dies here: this shard's files are never written
        return real(*a)

    monkeypatch.setattr(prep, fn, dies_at_second)
    with pytest.raises(_Killed):
        prepare(str(CORPUS), tok, out, options=PrepareOptions(**SMALL), progress=False)
    monkeypatch.setattr(prep, fn, real)
    assert not (out / "manifest.json").exists() and (out / "prepare.json").exists()
    with pytest.raises(PreparedDataError, match="unfinished prepare"):
        build_splits(_cfg(out, tmp_path), tok)
    first = (
        out / ".parts" / "000000000.main.tokens"
        if stage == "tokenize"
        else out / "train/tokens/c/0"
    )
    stamp = first.stat().st_mtime_ns
    tokenized = []

    def counting(k, *a):
        tokenized.append(k)
        return _REAL_TOKENIZE(k, *a)

    monkeypatch.setattr(prep, "_tokenize_shard", counting)
    prepare(str(CORPUS), tok, out, options=PrepareOptions(**SMALL), progress=False)
    assert _files(out) == _files(prepared)
    if stage == "tokenize":
        assert tokenized and 0 not in tokenized and 1 in tokenized  # shard 0 was kept
    else:
        assert tokenized == []  # nothing re-tokenized after a kill in the write stage
        assert first.stat().st_mtime_ns == stamp  # a finished shard file is not rewritten
    # another prepare's inputs into the unfinished or finished folder: refused
    with pytest.raises(PreparedDataError):
        prepare(str(CORPUS), tok, out, options=PrepareOptions(seq_len=32), progress=False)


@pytest.mark.parametrize("process_count", [1, 2, 4, 8])
def test_processes_read_only_their_chunks(prepared, tok, tmp_path, process_count):
    """Global batches are the same for 1..8 processes, and each process fetches only the chunks
    holding its rows."""
    B, steps = 16, 6
    ref_train, _ = build_splits(_cfg(CORPUS, tmp_path), tok)
    ref = BatchIterator(ref_train, B, seed=7)
    expected = [ref.next() for _ in range(steps)]
    rows = [[] for _ in range(steps)]
    for p in range(process_count):
        train, _ = build_splits(_cfg(prepared, tmp_path), tok)
        it = BatchIterator(train, B, seed=7, process_index=p, process_count=process_count)
        peek = BatchIterator(train, B, seed=7, process_index=p, process_count=process_count)
        needed = set()
        for k in range(steps):
            for b in peek.next_indices():
                lo, hi = b * 64, (b + 1) * 64 - 1
                needed |= set(range(lo // 1024, hi // 1024 + 1))
            rows[k].append(it.next())
        assert train.tokens.chunks_read == needed
    for k in range(steps):
        np.testing.assert_array_equal(np.concatenate(rows[k]), expected[k])


def test_prefetcher_same_batches_and_exact_resume(prepared, tok, tmp_path):
    train, _ = build_splits(_cfg(prepared, tmp_path), tok)
    plain = BatchIterator(train, 8, seed=1)
    want = [plain.next() for _ in range(10)]
    pre = Prefetcher(BatchIterator(train, 8, seed=1), depth=3)
    got = [pre.next() for _ in range(4)]
    saved = pre.state.to_dict()
    assert saved == {"epoch": 0, "position": 32}  # consumed batches, not the queued ones
    pre.close()
    resumed = Prefetcher(BatchIterator(train, 8, seed=1, state=saved))
    got += [resumed.next() for _ in range(6)]
    resumed.close()
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damage_is_an_error_naming_the_chunk(prepared, tok, tmp_path):
    ds = _copy(prepared, tmp_path / "ds")
    shard = ds / "train" / "tokens" / "c" / "2"  # chunks 8..11
    raw = bytearray(shard.read_bytes())
    raw[5000] ^= 0xFF  # inside chunk 10 (the shard's data precedes its index)
    shard.write_bytes(bytes(raw))
    train, _ = build_splits(_cfg(ds, tmp_path), tok)
    np.testing.assert_array_equal(train[0], build_splits(_cfg(prepared, tmp_path), tok)[0][0])
    with pytest.raises(ChunkError, match=r"chunk 10 of split 'train'.*fails its checksum"):
        train[(10 * 1024) // 64]
    # through the prefetch thread: the same error reaches the training loop
    it = Prefetcher(BatchIterator(train, len(train), seed=0, shuffle=False))
    with pytest.raises(ChunkError, match="chunk 10 of split 'train'"):
        it.next()
    shard.unlink()
    train, _ = build_splits(_cfg(ds, tmp_path), tok)
    with pytest.raises(ChunkError, match=r"chunk 9 of split 'train'.*is missing"):
        train[(9 * 1024) // 64]
    (ds / "val" / "checksums.u32").unlink()
    with pytest.raises(ChunkError, match="checksums.u32 is missing"):
        build_splits(_cfg(ds, tmp_path), tok)


def test_tokenizer_differing_from_the_model_is_refused(prepared, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(FIXTURES / "tokenizer" / "tokenizer.json"))
    backend.add_tokens(["<extra>"])
    other = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(TokenizerMismatchError, match="prepare the corpus again"):
        build_splits(_cfg(prepared, tmp_path), other)


def test_document_holdout_and_sources(tok, tmp_path):
    """jsonl / parquet sources, a streamed dataset (`datasets` streaming over a local parquet
    folder), a file:// destination, and --val-fraction: held-out documents never train."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f.read_text() for f in sorted(CORPUS.glob("*.txt"))]
    docs = [p for t in texts for p in t.split("\n\n\n") if p.strip()][:300]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"body": docs}), tmp_path / "pq" / "train.parquet")
    hub = Source("local-parquet", hub=(str(tmp_path / "pq"), None, "train"))
    assert list(iter_documents(hub, "body")) == docs  # the streaming path
    opts = PrepareOptions(text_field="body", val_fraction=0.2, seed=5, chunk_tokens=512,
                          shard_chunks=2, shard_docs=16)  # fmt: skip
    m1 = prepare(str(tmp_path / "a.jsonl"), tok, tmp_path / "j", options=opts, progress=False)
    url = f"file://{tmp_path / 'h'}"
    m2 = prepare(hub, tok, url, options=opts, progress=False)
    assert m1["splits"] == m2["splits"]
    assert (tmp_path / "j" / "train" / "checksums.u32").read_bytes() == (
        tmp_path / "h" / "train" / "checksums.u32"
    ).read_bytes()
    val_docs = m1["splits"]["val"]["num_docs"]
    assert 0.1 * len(docs) < val_docs < 0.3 * len(docs)
    train, val = build_splits(DataConfig(path=url, seq_len=32), tok)
    # every document is in exactly one split, and the split's tokens are its documents'
    held = prep._holdout(5, 0, len(docs), 0.2)
    enc = [np.asarray(tok(d + "\n\n", add_special_tokens=False)["input_ids"]) for d in docs]
    for split, mask in (("train", ~held), ("val", held)):
        tokens = (
            PreparedDataset(url)
            .split(split)
            .read_ranges(np.array([0]), m1["splits"][split]["num_tokens"])[0]
        )
        np.testing.assert_array_equal(tokens, np.concatenate([e for e, h in zip(enc, mask,
                                      strict=True) if h]))  # fmt: skip
    assert len(val) == m1["splits"]["val"]["num_tokens"] // 32 and len(train) > len(val)


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=backend)
    words = [f"w{i}" for i in (5, 65_535, 65_536, 69_999)] * 200
    (tmp_path / "c.txt").write_text(" ".join(words))
    opts = PrepareOptions(separator="", seq_len=8, val_blocks=2, chunk_tokens=64)
    m = prepare(str(tmp_path / "c.txt"), big, tmp_path / "ds", options=opts, progress=False)
    assert m["inputs"]["dtype"] == "uint32"
    train, val = build_splits(DataConfig(path=str(tmp_path / "ds"), seq_len=8), big)
    got = np.concatenate([train[:].ravel(), val[:].ravel()])
    np.testing.assert_array_equal(got, [int(w[1:]) for w in words])


@pytest.mark.slow  # ~30 s each: builds the corpus, tokenizes 2.8 M characters twice
@pytest.mark.parametrize("tokenizer", ["fixture", "smollm2"])
def test_embedded_corpus_same_blocks_as_today(tok, tmp_path, tokenizer):
    """`default` (the embedded Wikipedia sample) through prepare + prepared reads: the same
    training and validation blocks (hence the same perplexities) as build_splits."""
    if tokenizer == "smollm2":
        from paretoq_jax import assets
        from paretoq_jax.io import load_tokenizer

        tok = load_tokenizer(assets.smollm2_gguf())
    cfg = DataConfig(path="default", seq_len=256, cache_dir=str(tmp_path / "cache"))
    train, val = build_splits(cfg, tok)
    prepare("default", tok, tmp_path / "ds", corpus_cache=tmp_path / "cache" / "corpora",
            workers=2, progress=False)  # fmt: skip
    ptrain, pval = build_splits(DataConfig(path=str(tmp_path / "ds"), seq_len=256), tok)
    assert len(pval) == len(val) == 32
    np.testing.assert_array_equal(pval[:], np.asarray(val))
    np.testing.assert_array_equal(ptrain[:], np.asarray(train))


@pytest.fixture
def s3_bucket(monkeypatch):
    """A local S3 server (moto) with bucket ``prep``; ``AWS_ENDPOINT_URL`` points at it."""
    pytest.importorskip("moto", reason="moto (a local S3 server) is not installed")
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket="prep")
    yield client
    server.stop()


def test_s3_destination_same_bytes_and_reads(prepared, tok, tmp_path, s3_bucket):
    """prepare to ``s3://`` (a local S3-compatible server) writes the same objects as the local
    prepare, and training reads it as ``data.path=s3://...``."""
    prepare(str(CORPUS), tok, "s3://prep/ds", options=PrepareOptions(**SMALL), progress=False)
    listed = s3_bucket.list_objects_v2(Bucket="prep", Prefix="ds/")["Contents"]
    objects = {
        o["Key"][len("ds/") :]: s3_bucket.get_object(Bucket="prep", Key=o["Key"])["Body"].read()
        for o in listed
    }
    assert objects == _files(prepared)
    train, val = build_splits(_cfg("s3://prep/ds", tmp_path), tok)
    ltrain, lval = build_splits(_cfg(prepared, tmp_path), tok)
    np.testing.assert_array_equal(val[:], lval[:])
    np.testing.assert_array_equal(train[[5, 900, 17]], ltrain[[5, 900, 17]])
    with pytest.raises(PreparedDataError, match="never rewritten"):
        prepare(str(CORPUS), tok, "s3://prep/ds", options=PrepareOptions(seq_len=32))


def test_unusable_inputs_are_clear_errors(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Shall I compare thee to a summer's day? " * 40)
    with pytest.raises(DataError, match=r"--val-blocks 32 needs at least one more"):
        prepare(str(short), tok, tmp_path / "a", options=PrepareOptions(seq_len=64),
                progress=False)  # fmt: skip
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    with pytest.raises(DataError, match="is empty"):
        prepare(str(tmp_path / "empty.jsonl"), tok, tmp_path / "b", progress=False)
    with pytest.raises(DataError, match="no text field 'body'"):
        prepare(str(tmp_path / "empty.jsonl"), tok, tmp_path / "c",
                options=PrepareOptions(text_field="body"), progress=False)  # fmt: skip
    with pytest.raises(PreparedDataError, match="val-fraction"):
        PrepareOptions(val_fraction=1.5)
    with pytest.raises(PreparedDataError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)
