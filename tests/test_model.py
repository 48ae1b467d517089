"""The Llama-family model against transformers' logits (tiny fixtures made by torch), and its
quantized linears, rules, layer modes and config handling."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.io import load_pretrained
from paretoq_jax.models import Llama, LlamaConfig, QuantLinear, QuantRules

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["tiny_llama_gqa", "tiny_llama_tied_llama3", "tiny_llama_qwen2", "tiny_llama_mistral"]
TINY = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


@nnx.jit
def forward(model, ids):
    return model(ids)


@nnx.jit
def loss_grad(model, ids):
    return nnx.grad(lambda m: m(ids).mean())(model)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def fixture(name):
    d = FIXTURES / name
    return d, jnp.asarray(np.load(d / "input_ids.npy")), np.load(d / "logits.npy")


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    """GQA/MQA, tied/untied, llama3 rope scaling, Qwen2 q/k/v bias, Mistral sliding window."""
    d, ids, ref = fixture(name)
    model = load_pretrained(d)
    assert rel_err(forward(model, ids), ref) < 1e-4


def test_llama3_rope_scaling_matters():
    """Dropping llama3 scaling from the fixture's config must break the match (the test can fail)."""
    d, ids, ref = fixture("tiny_llama_tied_llama3")
    model = load_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 500000.0
    plain_def = nnx.graphdef(
        nnx.eval_shape(lambda: Llama(LlamaConfig.from_hf(cfg), rngs=nnx.Rngs(0)))
    )
    plain = nnx.merge(plain_def, nnx.state(model))
    assert rel_err(forward(plain, ids), ref) > 1e-3


def test_layer_modes_agree():
    """Scanned, unrolled and rematerialized layers: same logits and gradients (2-bit QAT)."""
    d, ids, ref = fixture("tiny_llama_gqa")
    base = load_pretrained(d, bits=2, scan_layers=True, remat=False)
    out, g_base = forward(base, ids), loss_grad(base, ids)
    for scan_layers, remat in [(False, False), (True, True)]:
        model = load_pretrained(d, bits=2, scan_layers=scan_layers, remat=remat)
        np.testing.assert_allclose(forward(model, ids), out, rtol=1e-5, atol=1e-5)
        grads = loss_grad(model, ids)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_base), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_hidden_and_lm_logits():
    d, ids, ref = fixture("tiny_llama_qwen2")
    model = load_pretrained(d)
    hidden = nnx.jit(lambda m, x: m(x, return_hidden=True))(model, ids)
    assert hidden.shape == (*ids.shape, 32)
    logits = nnx.jit(lambda m, h: m.lm_logits(h))(model, hidden)
    np.testing.assert_allclose(logits, forward(model, ids), rtol=1e-6, atol=1e-6)
    assert logits.dtype == jnp.float32


def test_paretoq_rules_quantize_projections_only():
    model = nnx.eval_shape(lambda: Llama(TINY, quant=QuantRules.paretoq(2), rngs=nnx.Rngs(0)))
    linears = {
        ".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, QuantLinear)
    }
    quantized = {p for p, m in linears.items() if m.spec is not None}
    assert quantized == {
        f"layers.{s}" for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert linears["lm_head"].spec is None and linears["lm_head"].scale is None
    q = model.layers.self_attn.q_proj
    assert q.scale.shape == (3, 32) and q.spec == quant.resolve(2)
    d, ids, _ = fixture("tiny_llama_gqa")  # loading float weights initializes scales (init_scale)
    q = load_pretrained(d, bits=2).layers.self_attn.q_proj
    np.testing.assert_allclose(q.scale[...], quant.init_scale(q.kernel[...], 2), rtol=1e-6)


def test_rules_first_match_wins_and_errors():
    rules = QuantRules(((r"layers\.\d+\.mlp\.down_proj", 4, None), (r"layers\..*", 2, None)))
    assert rules.spec_for("layers.0.mlp.down_proj").bits == 4
    assert rules.spec_for("layers.0.self_attn.q_proj").bits == 2
    assert rules.spec_for("lm_head") is None
    model = nnx.eval_shape(lambda: Llama(TINY, quant=rules, rngs=nnx.Rngs(0)))
    assert model.layers.mlp.down_proj.spec.method == "lsq"
    assert model.layers.mlp.up_proj.spec.method == "seq"
    with pytest.raises(ValueError, match="different settings across layers"):
        nnx.eval_shape(lambda: Llama(TINY, quant=QuantRules(((r"layers\.0\..*", 2, None),)),
                                     rngs=nnx.Rngs(0)))  # fmt: skip
    with pytest.raises(ValueError, match="bits"):
        QuantRules.paretoq(5)
    with pytest.raises(ValueError, match="bad regex"):
        QuantRules((("layers.(", 2, None),))


def test_quant_linear_forward_is_x_times_fake_quant():
    lin = QuantLinear(16, 8, spec=quant.resolve(2), use_bias=True, rngs=nnx.Rngs(1))
    lin.bias[...] = jnp.arange(8.0)
    x = jax.random.normal(jax.random.key(2), (3, 16))
    wq = quant.fake_quant(lin.kernel[...], lin.scale[...], 2)
    y = nnx.jit(lambda m, x: m(x))(lin, x)
    np.testing.assert_allclose(y, x @ wq + jnp.arange(8.0), rtol=1e-5, atol=1e-6)
    levels = np.unique(np.round(np.asarray(nnx.jit(lambda m: m.weight())(lin) / lin.scale[...]), 5))
    np.testing.assert_allclose(levels, [-0.75, -0.25, 0.25, 0.75])
    g = nnx.jit(nnx.grad(lambda m: m(x).sum()))(lin)
    assert float(jnp.abs(g["scale"][...]).sum()) > 0


@pytest.mark.parametrize("bits", [2, 16])
def test_quant_linear_head_forms_are_the_plain_product(bits):
    """``out_heads`` / ``in_heads`` (the attention projections, written on the kernel reshaped
    into heads so that XLA need not copy q, k, v into attention's layout) give the plain
    ``x @ W + b`` reshaped, bias included, and the same gradients."""
    spec = quant.resolve(bits) if bits < 16 else None
    lin = QuantLinear(12, 8, spec=spec, use_bias=True, rngs=nnx.Rngs(1))
    lin.bias[...] = jnp.arange(8.0)
    x = jax.random.normal(jax.random.key(2), (2, 3, 12))
    w = np.asarray(nnx.jit(lambda m: m.weight())(lin), np.float64)
    ref = np.asarray(x, np.float64) @ w + np.arange(8.0)
    got = nnx.jit(lambda m, x: m(x, out_heads=4))(lin, x)
    assert got.shape == (2, 3, 4, 2)
    np.testing.assert_allclose(got.reshape(2, 3, 8), ref, rtol=1e-5, atol=1e-5)
    xh = jax.random.normal(jax.random.key(3), (2, 3, 4, 3))  # (..., heads, head_dim) of 12
    lin_o = QuantLinear(12, 8, spec=spec, use_bias=True, rngs=nnx.Rngs(4))
    wo = np.asarray(nnx.jit(lambda m: m.weight())(lin_o), np.float64)
    ref_o = np.asarray(xh, np.float64).reshape(2, 3, 12) @ wo + np.asarray(lin_o.bias[...])
    got_o = nnx.jit(lambda m, x: m(x, in_heads=True))(lin_o, xh)
    np.testing.assert_allclose(got_o, ref_o, rtol=1e-5, atol=1e-5)
    g_heads = nnx.jit(nnx.grad(lambda m: (m(x, out_heads=4) ** 2).sum()))(lin)
    g_plain = nnx.jit(nnx.grad(lambda m: (m(x) ** 2).sum()))(lin)
    for a, b in zip(jax.tree.leaves(g_heads), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute():
    d, ids, ref = fixture("tiny_llama_gqa")
    model = load_pretrained(d, dtype=jnp.bfloat16)
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    out = forward(model, ids)
    assert out.dtype == jnp.float32 and rel_err(out, ref) < 5e-2


def test_config_round_trip_and_errors():
    cfg = json.loads((FIXTURES / "tiny_llama_tied_llama3" / "config.json").read_text())
    c = LlamaConfig.from_hf(cfg)
    assert c.rope_type == "llama3" and c.tie_word_embeddings and c.num_key_value_heads == 1
    assert LlamaConfig.from_hf(c.to_hf()) == c
    q = LlamaConfig.from_json(FIXTURES / "tiny_llama_qwen2")
    assert q.attention_bias and not q.attention_out_bias
    assert LlamaConfig.from_hf(q.to_hf()) == q
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LlamaConfig.from_hf({**cfg, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_hf({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="multiple"):
        LlamaConfig.from_hf({**cfg, "num_attention_heads": 3, "num_key_value_heads": 2})


def test_graphdef_hashable_with_rope_scaling():
    """jit caches on the graphdef: a config holding a rope_scaling dict must still hash."""
    d, _, _ = fixture("tiny_llama_tied_llama3")
    g1, g2 = nnx.graphdef(load_pretrained(d)), nnx.graphdef(load_pretrained(d))
    assert hash(g1) == hash(g2) and g1 == g2
