"""build_splits: sources, tokenization against the tokenizer itself, splits, cache, clear errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from paretoq_jax import data as pdata
from paretoq_jax.data import DataConfig, DataError, build_splits

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = FIXTURES / "corpus"
FILES = sorted(CORPUS.glob("*.txt"))
SEP = "\n\n"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def doc_tokens(tok):
    """Each fixture document tokenized on its own through the tokenizer's __call__ (the
    reference the pipeline's batched backend path must reproduce)."""
    return [
        np.asarray(tok(f.read_text() + SEP, add_special_tokens=False)["input_ids"], np.int32)
        for f in FILES
    ]


def cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("path", str(CORPUS))
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("seq_len", 64)
    return DataConfig(**kw)


def _blocks_of(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def test_folder_blocks_equal_independent_tokenization(tmp_path, tok, doc_tokens):
    train, val = build_splits(cfg(tmp_path, val_blocks=0), tok)
    expected = _blocks_of(np.concatenate(doc_tokens), 64)
    assert len(val) == 0 and val.shape == (0, 64)
    assert train.array.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(train), expected)
    assert train.num_tokens == expected.size and len(train) == expected.shape[0]
    assert tok.decode(train[0]).startswith(FILES[0].read_text()[:40])


def test_tail_split_is_the_last_blocks(tmp_path, tok, doc_tokens):
    full = _blocks_of(np.concatenate(doc_tokens), 64)
    train, val = build_splits(cfg(tmp_path, val_blocks=5), tok)
    np.testing.assert_array_equal(np.asarray(val), full[-5:])
    np.testing.assert_array_equal(np.asarray(train), full[:-5])
    capped = build_splits(cfg(tmp_path, val_blocks=5, max_val_blocks=2), tok)[1]
    np.testing.assert_array_equal(np.asarray(capped), full[-5:-3])


def test_val_fraction_holds_out_whole_documents(tmp_path, tok, doc_tokens):
    train, val = build_splits(cfg(tmp_path, val_fraction=0.4, seed=1), tok)
    # exactly one choice of 2 of the 5 documents must explain the validation blocks, and the
    # other 3 the training blocks: the split is disjoint by documents
    matches = []
    for held in itertools.combinations(range(len(FILES)), 2):
        kept = [i for i in range(len(FILES)) if i not in held]
        v = _blocks_of(np.concatenate([doc_tokens[i] for i in held]), 64)
        t = _blocks_of(np.concatenate([doc_tokens[i] for i in kept]), 64)
        if np.array_equal(v, np.asarray(val)) and np.array_equal(t, np.asarray(train)):
            matches.append(held)
    assert len(matches) == 1
    other = build_splits(cfg(tmp_path, val_fraction=0.4, seed=2), tok)[1]
    assert len(other) != len(val) or not np.array_equal(np.asarray(other), np.asarray(val))


def test_val_path_and_single_document_fraction(tmp_path, tok, doc_tokens):
    i = FILES.index(CORPUS / "macbeth_gut.txt")
    train, val = build_splits(
        cfg(tmp_path, path=str(FILES[i]), val_path=str(CORPUS / "sonnets_gut.txt")), tok
    )
    np.testing.assert_array_equal(np.asarray(train), _blocks_of(doc_tokens[i], 64))
    j = FILES.index(CORPUS / "sonnets_gut.txt")
    np.testing.assert_array_equal(np.asarray(val), _blocks_of(doc_tokens[j], 64))
    # one document: val_fraction takes the tail blocks
    train, val = build_splits(cfg(tmp_path, path=str(FILES[i]), val_fraction=0.1), tok)
    full = _blocks_of(doc_tokens[i], 64)
    k = round(0.1 * len(full))
    np.testing.assert_array_equal(np.asarray(val), full[-k:])
    np.testing.assert_array_equal(np.asarray(train), full[:-k])


def test_train_seq_len_changes_training_blocks_only(tmp_path, tok, doc_tokens):
    """data.train_seq_len: training blocks of its length; validation blocks stay the same."""
    stream = np.concatenate(doc_tokens)
    full = _blocks_of(stream, 64)
    ref_val = build_splits(cfg(tmp_path, val_blocks=5), tok)[1]
    for t_len in (16, 40, 64, 100):
        train, val = build_splits(cfg(tmp_path, val_blocks=5, train_seq_len=t_len), tok)
        np.testing.assert_array_equal(np.asarray(val), np.asarray(ref_val))
        np.testing.assert_array_equal(np.asarray(val), full[-5:])
        # training: the tokens before the validation blocks, cut into blocks of t_len
        before = stream[: (len(full) - 5) * 64]
        np.testing.assert_array_equal(np.asarray(train), _blocks_of(before, t_len))
        assert train.seq_len == t_len and val.seq_len == 64
    # document hold-out and a separate validation corpus: the same rule
    ref_t, ref_v = build_splits(cfg(tmp_path, val_fraction=0.4, seed=1), tok)
    t, v = build_splits(cfg(tmp_path, val_fraction=0.4, seed=1, train_seq_len=32), tok)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_v))
    np.testing.assert_array_equal(np.asarray(t), _blocks_of(np.asarray(ref_t).ravel(), 32))
    i = FILES.index(CORPUS / "macbeth_gut.txt")
    vp = str(CORPUS / "sonnets_gut.txt")
    t, v = build_splits(cfg(tmp_path, path=str(FILES[i]), val_path=vp, train_seq_len=48), tok)
    np.testing.assert_array_equal(np.asarray(t), _blocks_of(doc_tokens[i], 48))
    assert v.seq_len == 64
    with pytest.raises(DataError, match="train_seq_len"):
        cfg(tmp_path, train_seq_len=0)


def test_bos_eos_and_separator(tmp_path, tok):
    f = CORPUS / "phoenix_and_the_turtle_gut.txt"
    train, _ = build_splits(
        cfg(tmp_path, path=str(f), seq_len=8, val_blocks=0, add_bos=True, add_eos=True), tok
    )
    ids = tok(f.read_text() + SEP, add_special_tokens=False)["input_ids"]
    stream = [tok.bos_token_id, *ids, tok.eos_token_id]
    np.testing.assert_array_equal(np.asarray(train), _blocks_of(np.asarray(stream, np.int32), 8))
    raw, _ = build_splits(cfg(tmp_path, path=str(f), seq_len=8, val_blocks=0, separator=""), tok)
    ids = tok(f.read_text(), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray(raw), _blocks_of(np.asarray(ids, np.int32), 8))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_columns", "parquet"])
def test_structured_files_match_the_text_folder(tmp_path, tok, fmt):
    texts = [f.read_text() for f in FILES]
    out = tmp_path / "corpus"
    out.mkdir()
    rows = [{"id": i, "content": t} for i, t in enumerate(texts)]
    if fmt == "jsonl":
        path = out / "a.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = out / "a.json"
        path.write_text(json.dumps(rows))
    elif fmt == "json_columns":
        path = out / "a.json"
        path.write_text(json.dumps({"content": texts, "id": list(range(len(texts)))}))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = out / "a.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "content": texts}), path)
    ref = build_splits(cfg(tmp_path, val_blocks=3), tok)
    got = build_splits(cfg(tmp_path, path=str(path), text_field="content", val_blocks=3), tok)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(DataError, match=r"no text field 'text'.*\['content', 'id'\]"):
        build_splits(cfg(tmp_path, path=str(path)), tok)


def test_second_build_hits_the_cache(tmp_path, tok, monkeypatch):
    calls = []
    real = pdata.tokenize.encode_documents

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pdata.tokenize, "encode_documents", counting)
    first = build_splits(cfg(tmp_path, val_blocks=2), tok)
    assert len(calls) == 1

    def refuse(*a, **k):
        raise AssertionError("the tokenizer ran on a cache hit")

    monkeypatch.setattr(pdata.tokenize, "encode_documents", refuse)
    monkeypatch.setattr(type(tok), "__call__", refuse)
    second = build_splits(cfg(tmp_path, val_blocks=2, seq_len=64), tok)
    assert isinstance(second[0].array.base, np.memmap) or isinstance(second[0].array, np.memmap)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # another seq_len reuses the token stream too
    build_splits(cfg(tmp_path, val_blocks=2, seq_len=32), tok)
    monkeypatch.setattr(pdata.tokenize, "encode_documents", counting)
    # options that change the tokens are a different entry
    build_splits(cfg(tmp_path, val_blocks=2, add_eos=True), tok)
    assert len(calls) == 2
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["num_docs"] == len(FILES)


def _garble(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-7] ^= 0x5A  # a token id near the end: the array still loads, with a wrong value
    p.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: _garble(e / "tokens.npy"),
        lambda e: (e / "tokens.npy").write_bytes((e / "tokens.npy").read_bytes()[:-40]),
        lambda e: _garble(e / "doc_offsets.npy"),
        lambda e: (e / "doc_offsets.npy").unlink(),
        lambda e: (e / "meta.json").write_text("{"),
    ],
    ids=["garbled-tokens", "truncated-tokens", "garbled-offsets", "missing-offsets", "bad-meta"],
)
def test_damaged_cache_entry_is_detected_and_rebuilt(tmp_path, tok, capsys, damage):
    first = build_splits(cfg(tmp_path, val_blocks=2), tok)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    damage(entry)
    second = build_splits(cfg(tmp_path, val_blocks=2), tok)
    assert "is damaged" in capsys.readouterr().out
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = json.loads((entry / "meta.json").read_text())
    assert set(meta["sha256"]) == {"tokens.npy", "doc_offsets.npy"}


def test_changed_file_invalidates_the_cache(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text("one two three four five six seven eight nine ten " * 20)
    a = build_splits(cfg(tmp_path, path=str(f), seq_len=16, val_blocks=0), tok)[0]
    f.write_text("ten nine eight seven six five four three two one! " * 20)
    b = build_splits(cfg(tmp_path, path=str(f), seq_len=16, val_blocks=0), tok)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    ids = tok(f.read_text() + SEP, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray(b), _blocks_of(np.asarray(ids, np.int32), 16))


def test_errors_are_clear_and_early(tmp_path, tok):
    def err(match, **kw):
        with pytest.raises(DataError, match=match):
            build_splits(cfg(tmp_path, **kw), tok)

    err("not found", path=str(tmp_path / "missing.jsonl"))
    err("not found", path=str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "a.csv").write_text("text\nhello\n")
    err(r"unsupported file type '\.csv'", path=str(tmp_path / "a.csv"))
    empty_dir = tmp_path / "csvs"
    empty_dir.mkdir()
    (empty_dir / "b.csv").write_text("x")
    err(r"holds no corpus files.*\.csv", path=str(empty_dir))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    err("is empty", path=str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    err("is empty", path=str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("Too short for a block.")
    err(r"blocks of seq_len=1024, needs at least 1", path=str(tmp_path / "short.txt"), seq_len=1024)
    small = CORPUS / "phoenix_and_the_turtle_gut.txt"  # ~700 tokens: 10 blocks of 64
    err(r"needs at least 33.*32 held out", path=str(small), val_blocks=32)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    err(r"no text field 'text'; available fields: \['body'\]", path=str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "x"\n')
    err(r"broken.jsonl:1: not valid JSON", path=str(tmp_path / "broken.jsonl"))
    err("unknown default corpus", path="default:klingon")
    with pytest.raises(DataError, match="val_fraction"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(DataError, match="seq_len"):
        DataConfig(seq_len=0)
    with pytest.raises(DataError, match="add_bos=true but the tokenizer has no BOS"):
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(FIXTURES / "tokenizer" / "tokenizer.json"))
        build_splits(cfg(tmp_path, add_bos=True), raw)


def test_hub_name_without_a_hub_fails_clearly(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local file or folder, and loading it as a Hugging"):
        build_splits(cfg(tmp_path, path="someone/no-such-dataset-xyz"), tok)


def test_raw_tokenizers_object_gives_the_same_blocks(tmp_path, tok):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(FIXTURES / "tokenizer" / "tokenizer.json"))
    a = build_splits(cfg(tmp_path, val_blocks=4), tok)
    b = build_splits(cfg(tmp_path, val_blocks=4), raw)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_loop_usage(tmp_path, tok):
    """What the trainer does: build, iterate, checkpoint the state, resume."""
    train, val = build_splits(cfg(tmp_path, val_blocks=4), tok)
    it = pdata.BatchIterator(train, 4, seed=0)
    for _ in range(3):
        batch = it.next()
    assert batch.shape == (4, 64) and batch.dtype == np.int32
    assert batch.max() < len(tok)
    state = it.state.to_dict()
    want = it.next()
    again = pdata.BatchIterator(train, 4, seed=0, state=state).next()
    np.testing.assert_array_equal(want, again)
    # validation blocks never appear in training
    val_rows = {r.tobytes() for r in np.asarray(val)}
    assert not any(r.tobytes() in val_rows for r in np.asarray(train))
