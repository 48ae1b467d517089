"""KV-cache decoding (paretoq_jax.models.decode) and generation (paretoq_jax.generate).

The reference is greedy decoding by full recomputation: ``model(ids)`` on the whole sequence,
one new token at a time, for each prompt alone (no padding, no cache).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax.generate import SamplingConfig, generate, generate_tokens, sample_logits
from paretoq_jax.models import Llama, LlamaConfig, QuantRules
from paretoq_jax.models.decode import forward_cached, init_cache, materialize_quantized

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 40))]
STEPS = 10


def tiny(vocab=97, bits=None, window=None, scan=True, seed=0, tie=False) -> Llama:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=window, tie_word_embeddings=tie,
    )  # fmt: skip
    quant = None if bits is None else QuantRules.paretoq(bits)
    return Llama(config, quant=quant, rngs=nnx.Rngs(seed), scan_layers=scan)


@nnx.jit
def _forward(model, ids):
    return model(ids)


def greedy_by_recomputation(model: Llama, prompt: list[int], steps: int, pad_to: int = 64):
    """Full forward of the whole sequence for every new token (right-padded to one length, which
    a causal model ignores, so one compilation serves every step)."""
    ids, tokens, logits = list(prompt), [], []
    for _ in range(steps):
        padded = np.zeros((1, pad_to), np.int32)
        padded[0, : len(ids)] = ids
        last = np.asarray(_forward(model, jnp.asarray(padded))[0, len(ids) - 1])
        logits.append(last)
        tokens.append(int(last.argmax()))
        ids.append(tokens[-1])
    return tokens, np.stack(logits)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # GQA (4 heads, 2 K/V heads), float, scanned layers
        dict(bits=2, scan=False, window=8),  # 2-bit ParetoQ, unrolled, sliding window < prompt
    ],
    ids=["gqa-float", "2bit-window"],
)
def test_greedy_kv_cache_equals_full_recomputation(kw):
    model = tiny(**kw)
    out, logits = generate_tokens(model, PROMPTS, STEPS, return_logits=True)
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = greedy_by_recomputation(model, prompt, STEPS)
        assert out[i] == ref_tokens
        np.testing.assert_allclose(logits[i], ref_logits, atol=1e-5, rtol=0)


def test_prefill_logits_match_forward_with_left_padding():
    """Every prompt position (not just the last) matches model(ids) despite left padding."""
    model = tiny(scan=False)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9]
    ids = jnp.asarray([a, [0, 0, 0] + b], jnp.int32)
    cache = init_cache(model, 2, 16, start=np.array([0, 3]))
    run = nnx.jit(forward_cached)
    logits, cache = run(model, ids, cache)
    np.testing.assert_allclose(logits[0], _forward(model, jnp.asarray([a]))[0], atol=1e-5)
    np.testing.assert_allclose(logits[1, 3:], _forward(model, jnp.asarray([b]))[0], atol=1e-5)
    assert int(cache["length"]) == 6
    # one more token: the cache extends the sequence
    step, _ = run(model, jnp.asarray([[11], [12]], jnp.int32), cache)
    np.testing.assert_allclose(step[0, 0], _forward(model, jnp.asarray([a + [11]]))[0, -1],
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(step[1, 0], _forward(model, jnp.asarray([b + [12, 0, 0]]))[0, 3],
                               atol=1e-5)  # fmt: skip


def test_materialize_quantized_is_exact_and_float():
    model = tiny(bits=1.58)
    frozen = materialize_quantized(model)
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(frozen(ids)), np.asarray(model(ids)))
    assert frozen.layers.self_attn.q_proj.spec is None
    assert model.layers.self_attn.q_proj.spec is not None  # the original is untouched


def test_sample_logits_rules():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.5, -1.0]] * 64)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    assert np.all(np.asarray(sample_logits(logits, keys[0], SamplingConfig())) == 1)
    top1 = sample_logits(logits, keys[0], SamplingConfig(temperature=1.0, top_k=1))
    assert np.all(np.asarray(top1) == 1)
    top2 = np.asarray(sample_logits(logits, keys[1], SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top2) == {1, 3}
    # p(1) = 0.53..., so top_p=0.5 keeps only token 1; top_p=0.8 keeps {1, 3}
    p = np.asarray(jax.nn.softmax(logits[0]))
    assert p[1] > 0.5 and p[1] + p[3] > 0.8
    nucleus = sample_logits(logits, keys[2], SamplingConfig(temperature=1.0, top_p=0.5))
    assert np.all(np.asarray(nucleus) == 1)
    wider = np.asarray(sample_logits(logits, keys[2], SamplingConfig(temperature=1.0, top_p=0.8)))
    assert set(wider) == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)


def test_sampling_seeded_and_greedy_limits():
    model = tiny()
    hot = SamplingConfig(temperature=5.0)
    a = generate_tokens(model, PROMPTS[:2], 8, sampling=hot, seed=1)
    b = generate_tokens(model, PROMPTS[:2], 8, sampling=hot, seed=1)
    c = generate_tokens(model, PROMPTS[:2], 8, sampling=hot, seed=2)
    assert a == b and a != c
    greedy = generate_tokens(model, PROMPTS[:2], 8)
    assert generate_tokens(model, PROMPTS[:2], 8, sampling=SamplingConfig(1.0, top_k=1)) == greedy


def test_generate_text_stops_at_eos_and_stop_strings():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer"))
    model = tiny(vocab=len(tok), seed=3)
    prompt = "Shall I compare thee"
    full = generate(model, tok, [prompt], 24, stop_at_eos=False)[0]
    ids = generate_tokens(model, [[tok.bos_token_id] + tok(prompt)["input_ids"]], 24)[0]
    assert full == tok.decode(ids, skip_special_tokens=True)
    assert len(full.strip()) > 4
    stop = full.strip()[2:4]
    cut = generate(model, tok, [prompt], 24, stop=[stop], stop_at_eos=False)[0]
    assert cut == full[: full.find(stop)]
    # EOS: a generation that stops at the first EOS is a prefix of the unstopped one
    eos = ids[3]
    stopped = generate_tokens(model, [[tok.bos_token_id] + tok(prompt)["input_ids"]], 24,
                              eos_ids=[eos])[0]  # fmt: skip
    assert stopped == ids[: ids.index(eos) + 1]


def test_generate_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(model, [[1]], 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        init_cache(model, 1, 1000)


def test_eos_inside_the_compiled_loop_stops_only_its_row():
    """The decode loop runs on device; a row that emits an EOS id ends there (EOS kept), the
    others decode on, and stop callbacks (checked between chunks) cut at the right token."""
    model = tiny()
    ref = generate_tokens(model, PROMPTS, STEPS)
    eos = ref[0][3]
    got = generate_tokens(model, PROMPTS, STEPS, eos_ids=[eos])
    for r, g in zip(ref, got, strict=True):
        assert g == (r[: r.index(eos) + 1] if eos in r else r)
    cut = generate_tokens(model, PROMPTS, STEPS, should_stop=lambda row, new: len(new) == 2 + row)
    assert cut == [r[: 2 + i] for i, r in enumerate(ref)]


@pytest.mark.parametrize("embed", ["float", "int8"])
def test_generate_loads_packed_exports_as_packed(embed, tmp_path):
    """``python -m paretoq_jax.generate`` on a packed export computes from the packed codes
    (``--dequantize`` for float weights); both generate the same greedy tokens, also with the
    int8 embedding / tied LM head."""
    from paretoq_jax.generate import load_for_generation
    from paretoq_jax.io import load_tokenizer
    from paretoq_jax.io.packed import save_packed
    from paretoq_jax.models.packed import packed_linears

    model = tiny(vocab=len(load_tokenizer(FIXTURES / "tokenizer")), bits=2, tie=True)
    save_packed(
        model, tmp_path / "p", tokenizer=load_tokenizer(FIXTURES / "tokenizer"), embed=embed
    )
    packed, _ = load_for_generation(str(tmp_path / "p"))
    floats, _ = load_for_generation(str(tmp_path / "p"), dequantize=True)
    assert packed_linears(packed) and not packed_linears(floats)
    assert generate_tokens(packed, PROMPTS, 6) == generate_tokens(floats, PROMPTS, 6)
    with pytest.raises(ValueError, match="drop --bits"):
        load_for_generation(str(tmp_path / "p"), bits=2)
