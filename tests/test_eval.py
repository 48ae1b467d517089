"""Perplexity, multiple choice, model loading and the eval CLI (paretoq_jax.eval).

References are independent: float64 log-softmax of ``model(ids)`` logits computed here, window
by window, with tokenization done directly with the tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax.eval import (
    evaluate_mc,
    load_mc,
    load_model,
    perplexity,
    score_windows,
    strided_windows,
)
from paretoq_jax.eval.__main__ import main as eval_main
from paretoq_jax.models import Llama, LlamaConfig, QuantRules

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MC = FIXTURES / "mc" / "tiny.jsonl"
PAD = 64  # reference forwards are right-padded to this length (one compilation)


def tiny(vocab: int = 512, bits=None, seed: int = 0) -> Llama:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=0,
    )  # fmt: skip
    quant = None if bits is None else QuantRules.paretoq(bits)
    return Llama(config, quant=quant, rngs=nnx.Rngs(seed), scan_layers=False)


@nnx.jit
def _forward(model, ids):
    return model(ids)


def ref_logprobs(model: Llama, tokens) -> np.ndarray:
    """float64 log-softmax ``(len-1, V)`` predicting ``tokens[1:]`` (one sequence)."""
    padded = np.zeros((1, PAD), np.int32)
    padded[0, : len(tokens)] = tokens
    z = np.asarray(_forward(model, jnp.asarray(padded))[0, : len(tokens) - 1], np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_nll(model: Llama, tokens, score_from: int = 1) -> tuple[float, int]:
    lp = ref_logprobs(model, tokens)
    t = np.arange(score_from, len(tokens))
    return float(-lp[t - 1, np.asarray(tokens)[t]].sum()), len(t)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))


@pytest.fixture(scope="module")
def model(tok) -> Llama:
    return tiny(vocab=len(tok))


@pytest.fixture(scope="module")
def stream(tok) -> np.ndarray:
    text = (FIXTURES / "corpus" / "sonnets_gut.txt").read_text()[:4000]
    return np.asarray(tok(text)["input_ids"], np.int32)


def test_perplexity_blocks_matches_float64_reference(model, stream):
    tokens = stream[: 7 * 32 + 5]  # 7 blocks + a dropped remainder; batches of 3 pad the last
    out = perplexity(model, tokens, batch_size=3, seq_len=32)
    nll = [ref_nll(model, tokens[i * 32 : (i + 1) * 32]) for i in range(7)]
    total, count = sum(n for n, _ in nll), sum(c for _, c in nll)
    assert out["tokens"] == count == 7 * 31 and out["windows"] == 7
    np.testing.assert_allclose(out["loss"], total / count, rtol=1e-5)
    np.testing.assert_allclose(out["perplexity"], np.exp(total / count), rtol=1e-5)
    # 2-D blocks give the same numbers; so does any batch size
    again = perplexity(model, tokens[: 7 * 32].reshape(7, 32), batch_size=8)
    np.testing.assert_allclose(again["loss"], out["loss"], rtol=1e-6)


@pytest.mark.parametrize("n,seq,stride", [(100, 32, 8), (64, 32, 32), (33, 32, 5), (31, 32, 7)])
def test_strided_windows_score_each_token_once(n, seq, stride):
    tokens = np.arange(n)
    scored = []
    for toks, start in strided_windows(tokens, seq, stride):
        assert len(toks) <= seq
        assert start >= min(seq - stride, len(toks) - 1) or toks[0] == 0
        scored += list(toks[start:])
    expected = list(range(1, n)) if stride < seq else [t for t in range(n) if t % seq]
    assert sorted(scored) == expected


def test_perplexity_strided_matches_reference(model, stream):
    tokens = stream[:150]
    out = perplexity(model, tokens, batch_size=4, seq_len=48, stride=16)
    ref = [ref_nll(model, t, s) for t, s in strided_windows(tokens, 48, 16)]
    assert out["tokens"] == 149 == sum(c for _, c in ref)
    np.testing.assert_allclose(out["loss"], sum(n for n, _ in ref) / 149, rtol=1e-5)
    blocks = perplexity(model, tokens[:144], seq_len=48)
    same = perplexity(model, tokens[:144], seq_len=48, stride=48)  # stride = seq_len: blocks
    np.testing.assert_allclose(same["loss"], blocks["loss"], rtol=1e-6)
    assert same["tokens"] == blocks["tokens"] == 3 * 47


def test_score_windows_greedy_flag(model, stream):
    toks = list(stream[:20])
    lp = ref_logprobs(model, toks + [0])  # lp[t] predicts the token after position t
    greedy_next = int(lp[19].argmax())
    _, count, greedy = score_windows(model, [(toks + [greedy_next], 20), (toks, 19)])
    assert list(count) == [1, 1]
    assert greedy[0] and greedy[1] == (int(lp[18].argmax()) == toks[19])


def test_perplexity_bad_input(model, stream):
    with pytest.raises(ValueError, match="int token blocks"):
        perplexity(model, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="seq_len=16"):
        perplexity(model, stream[:64].reshape(2, 32), seq_len=16)
    with pytest.raises(ValueError, match="no window"):
        perplexity(model, stream[:10], seq_len=32)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, stream[:100], seq_len=32, stride=40)
    with pytest.raises(ValueError, match="model's context"):
        perplexity(model, stream[:600], seq_len=300)


def test_multiple_choice_scores_and_accuracies(model, tok):
    examples = load_mc(MC)
    out = evaluate_mc(model, tok, examples, batch_size=4, return_scores=True)
    assert out["n"] == len(examples) == 8
    hits = {"acc": 0, "acc_norm": 0, "acc_norm_token": 0}
    for ex, scores in zip(examples, out["scores"], strict=True):
        ctx = (
            tok(ex["context"], add_special_tokens=False)["input_ids"]
            if ex["context"]
            else [tok.bos_token_id]
        )
        ll, n_tok = [], []
        for choice in ex["choices"]:
            whole = tok(ex["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            if ex["context"]:
                assert whole[: len(ctx)] == ctx
                cont = whole[len(ctx) :]
            else:
                cont = whole
            nll, _ = ref_nll(model, ctx + cont, len(ctx))
            ll.append(-nll)
            n_tok.append(len(cont))
        np.testing.assert_allclose(scores, ll, rtol=1e-5, atol=1e-4)
        chars = np.array([len(c) for c in ex["choices"]], float)
        hits["acc"] += int(np.argmax(ll) == ex["label"])
        hits["acc_norm"] += int(np.argmax(np.array(ll) / chars) == ex["label"])
        hits["acc_norm_token"] += int(np.argmax(np.array(ll) / n_tok) == ex["label"])
    for k, v in hits.items():
        assert out[k] == v / 8, k


def test_load_mc_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for line, msg in [
        ('{"context": "a", "choices": ["x", "y"]}', "needs"),
        ('{"context": "a", "choices": ["x", "y"], "label": 2}', "label must be"),
        ('{"context": "a", "choices": ["x"], "label": 0}', "at least 2"),
        ("{not json", "not valid JSON"),
    ]:
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=msg):
            load_mc(bad)
    with pytest.raises(FileNotFoundError):
        load_mc(tmp_path / "missing.jsonl")


def test_cli_on_hf_folder(tmp_path, monkeypatch, model, tok):
    from paretoq_jax.io import save_pretrained

    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    folder = save_pretrained(model, tmp_path / "hf", tokenizer=tok)
    loaded, loaded_tok = load_model(folder)
    ids = jnp.asarray([[5, 9, 40, 7, 300, 2]])
    np.testing.assert_allclose(loaded(ids), model(ids), atol=1e-6)
    corpus = FIXTURES / "corpus" / "sonnets_gut.txt"
    out = tmp_path / "res.json"
    argv = ["--model", str(folder), "--data", str(corpus), "--seq-len", "64",
            "--max-windows", "3", "--batch-size", "2", "--mc", str(MC), "--out", str(out)]  # fmt: skip
    assert eval_main(argv) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "HF folder" and res["bits"] == 16 and res["seq_len"] == 64
    assert res["tokens"] == 3 * 63 and res["protocol"] == "blocks" and res["stride"] is None
    stream = loaded_tok(corpus.read_text() + "\n\n", add_special_tokens=False)["input_ids"]
    stream = np.asarray(stream, np.int32)
    direct = perplexity(model, stream[: 3 * 64], seq_len=64)
    np.testing.assert_allclose(res["loss"], direct["loss"], rtol=1e-5)
    assert res["mc"]["tiny"]["n"] == 8 and 0 <= res["mc"]["tiny"]["acc"] <= 1
    with pytest.raises(FileNotFoundError, match="cannot load a model"):
        load_model(tmp_path / "nothing-here")


def test_load_model_packed_export(tmp_path, tok):
    from paretoq_jax.io.packed import save_packed

    quantized = tiny(vocab=len(tok), bits=2)
    folder = save_packed(quantized, tmp_path / "packed", tokenizer=tok)
    loaded, loaded_tok = load_model(folder)
    ids = jnp.asarray([[5, 9, 40, 7, 300, 2]])
    np.testing.assert_allclose(loaded(ids), quantized(ids), atol=1e-5)
    assert len(loaded_tok) == len(tok)
    with pytest.raises(ValueError, match="packed export"):
        load_model(folder, bits=4)


EIGHT_DEVICES = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_eval import tiny
from paretoq_jax.eval import perplexity
from paretoq_jax.sharding import make_mesh, shard_model
import jax
assert jax.device_count() == 8
model = tiny()
mesh = make_mesh(data=8)
shard_model(model, mesh)
tokens = np.load({tokens!r})
print(json.dumps(perplexity(model, tokens, batch_size=3, seq_len=32, mesh=mesh)))
"""


def test_same_perplexity_on_one_and_eight_devices(tmp_path, stream):
    tokens = stream[: 11 * 32]
    np.save(tmp_path / "tokens.npy", tokens)
    one = perplexity(tiny(), tokens, batch_size=3, seq_len=32)
    script = EIGHT_DEVICES.format(tests=str(ROOT / "tests"), tokens=str(tmp_path / "tokens.npy"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = json.loads(proc.stdout.strip().splitlines()[-1])
    assert eight["tokens"] == one["tokens"] == 11 * 31
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-6)


def test_load_run_dir_restores_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    from paretoq_jax.config import load_config
    from paretoq_jax.eval import load_run
    from paretoq_jax.train import RunConfig, train

    over = [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
            "train.steps=2", "checkpoint.every=2", "train.logging.quant_stats_every=0"]  # fmt: skip
    cfg = load_config(RunConfig, ROOT / "configs" / "tiny.yaml", over)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the tiny config's paths are relative to the repository
    try:
        train(cfg, progress=False)
        model, _ = load_run(tmp_path / "run")
        saved = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "2" / "state")
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        kernel = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"])
        ref = np.asarray(saved["params"]["layers"]["self_attn"]["q_proj"]["kernel"])
        np.testing.assert_array_equal(kernel, ref)
        assert model.layers.self_attn.q_proj.spec.bits == 2
        res = tmp_path / "res.json"
        argv = ["--model", str(tmp_path / "run"), "--data", "tests/fixtures/corpus",
                "--seq-len", "64", "--split", "val", "--val-blocks", "16", "--out", str(res)]  # fmt: skip
        assert eval_main(argv) == 0
        out = json.loads(res.read_text())
        assert out["kind"] == "training run directory" and out["bits"] == 2 and out["step"] == 2
        assert out["tokens"] == 16 * 63 and np.isfinite(out["perplexity"])
    finally:
        os.chdir(cwd)
