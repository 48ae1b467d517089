"""The lm-evaluation-harness model ``paretoq_jax`` (optional dependency: skipped without lm_eval).

Request-level checks against independent float64 references; an end-to-end
``lm_eval.simple_evaluate`` over tasks defined on local jsonl files (no network), marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from paretoq_jax.eval import evaluate_mc  # noqa: E402
from paretoq_jax.eval.lm_eval_adapter import ParetoQLM  # noqa: E402
from paretoq_jax.generate import generate  # noqa: E402
from paretoq_jax.models import Llama, LlamaConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MC = FIXTURES / "mc" / "tiny.jsonl"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))


@pytest.fixture(scope="module")
def model(tok) -> Llama:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=0,
    )  # fmt: skip
    return Llama(config, rngs=nnx.Rngs(7), scan_layers=False)


@pytest.fixture(scope="module")
def lm(model, tok) -> ParetoQLM:
    return ParetoQLM(model=model, tokenizer=tok, batch_size=4)


def ref_loglik(model: Llama, tokens: list[int], score_from: int) -> float:
    z = np.asarray(model(jnp.asarray([tokens], jnp.int32))[0], np.float64)
    z = z - z.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    t = np.arange(score_from, len(tokens))
    return float(lp[t - 1, np.asarray(tokens)[t]].sum())


def req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_matches_reference(lm, model, tok):
    pairs = [("The king wore a golden", " crown"), ("Shall I compare thee", " to a summer's day")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        np.testing.assert_allclose(ll, ref_loglik(model, whole, len(c)), rtol=1e-5)


def test_loglikelihood_rolling_short_and_long(lm, model, tok):
    short = "Shall I compare thee to a summer's day?"
    ids = tok(short, add_special_tokens=False)["input_ids"]
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", short)])
    np.testing.assert_allclose(got, ref_loglik(model, [tok.bos_token_id] + ids, 1), rtol=1e-5)
    text = (FIXTURES / "corpus" / "sonnets_gut.txt").read_text()[:1500]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 * lm.max_length  # several windows
    (long,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    np.testing.assert_allclose(long, ref_rolling(model, ids, tok.bos_token_id, lm.max_length),
                               rtol=1e-5)  # fmt: skip


def ref_rolling(model: Llama, ids: list[int], prefix: int, max_length: int) -> float:
    """float64 rolling log-likelihood, written from lm-eval's definition: the text after a
    prefix token, every token scored once, each window at most ``max_length`` tokens; the first
    scores its ``max_length - 1`` tokens from the prefix on, each later one is the full
    ``max_length`` tokens ending at its last scored token and scores the next ``max_length - 1``
    (or fewer, at the end)."""
    seq = [prefix, *ids]  # seq[j + 1] is ids[j]
    first = min(max_length - 1, len(ids))
    total, done = ref_loglik(model, seq[: first + 1], 1), first
    while done < len(ids):
        end = min(done + max_length - 1, len(ids))  # score ids[done:end]
        window = seq[max(end + 1 - max_length, 0) : end + 1]
        total += ref_loglik(model, window, len(window) - (end - done))
        done = end
    return total


def test_generate_until_is_greedy_generation_cut_at_until(lm, model, tok):
    ctx = "Shall I compare thee"
    (got,) = lm.generate_until([req("generate_until", ctx, {"until": ["e"], "max_gen_toks": 12})])
    full = generate(model, tok, [ctx], 12, add_bos=False, stop_at_eos=False)[0]
    assert got == full.split("e")[0]


def _write_tasks(folder: Path) -> None:
    corpus = folder / "corpus.jsonl"
    text = (FIXTURES / "corpus" / "sonnets_gut.txt").read_text()
    with open(corpus, "w") as f:
        for k in range(3):
            f.write(json.dumps({"text": text[k * 300 : (k + 1) * 300]}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {MC}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {corpus}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {MC}\n"
        "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{choices[label]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.mark.slow
def test_simple_evaluate_on_local_tasks(tmp_path, monkeypatch, model, tok):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from paretoq_jax.io import save_pretrained

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    folder = save_pretrained(model, tmp_path / "hf", tokenizer=tok)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    out = lm_eval.simple_evaluate(
        model="paretoq_jax",  # registered by importing paretoq_jax.eval.lm_eval_adapter
        model_args=f"path={folder},batch_size=4",
        tasks=["tiny_mc", "tiny_ppl", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=False,
    )
    res = out["results"]
    mine = evaluate_mc(model, tok, MC)
    assert res["tiny_mc"]["acc,none"] == pytest.approx(mine["acc"])
    assert res["tiny_mc"]["acc_norm,none"] == pytest.approx(mine["acc_norm"])
    assert np.isfinite(res["tiny_ppl"]["word_perplexity,none"])
    assert res["tiny_ppl"]["bits_per_byte,none"] > 0
    assert 0.0 <= res["tiny_gen"]["exact_match,none"] <= 1.0


def test_registered_and_model_args_win_over_cli_defaults(model, tok):
    from lm_eval.api.registry import get_model

    assert get_model("paretoq_jax") is ParetoQLM
    lm = ParetoQLM.create_from_arg_obj(
        {"model": model, "tokenizer": tok, "batch_size": 4}, {"batch_size": 1, "device": None}
    )
    assert lm.batch_size == 4 and lm.max_length == 64
