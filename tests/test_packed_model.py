"""Inference from packed codes: PackedLinear vs the fake-quant dense product, whole-model
surgery (logits, no float kernel kept), and KV-cache generation from a packed model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.models import Llama, LlamaConfig, QuantLinear, QuantRules
from paretoq_jax.models.packed import PackedLinear, linear_codes, packed_linears, to_packed_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny-llama"


def small_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    return dataclasses.replace(LlamaConfig.from_json(TINY), **{**base, **kw})


@jax.jit
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def logits(model, ids):
    return _forward(*nnx.split(model), ids)


@pytest.mark.parametrize(
    "bits,method,ternary",
    [(1, None, "2bit"), (1.58, None, "2bit"), (1.58, None, "base3"), (2, None, "2bit"),
     (3, None, "2bit"), (4, None, "2bit"), (2, "absmean", "2bit")],
)  # fmt: skip
def test_packed_linear_matches_float64_product(bits, method, ternary):
    spec = quant.resolve(bits, method)
    lin = QuantLinear(45, 24, spec=spec, use_bias=True, rngs=nnx.Rngs(1))
    lin.bias[...] = jnp.linspace(-1, 1, 24)
    codes, a = linear_codes(lin)
    packed = PackedLinear(
        quant.pack(codes, bits, ternary=ternary), a, spec=spec, in_features=45, ternary=ternary,
        bias=lin.bias[...],
    )  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 45))
    # independent reference: the dense fake-quant weight, product in float64
    # (jitted like linear_codes: an absmean scale is a mean whose rounding depends on the shape)
    fq = jax.jit(quant.fake_quant, static_argnums=2)
    w = np.asarray(fq(lin.kernel[...], None if lin.scale is None else lin.scale[...], spec))
    w = w.astype(np.float64)
    ref = np.asarray(x, np.float64) @ w + np.asarray(lin.bias[...], np.float64)
    got = np.asarray(packed(x), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(np.asarray(packed.weight()), w.astype(np.float32))
    # the attention projections' head forms (as QuantLinear's): the same product, reshaped
    np.testing.assert_array_equal(packed(x, out_heads=6), packed(x).reshape(3, 5, 6, 4))
    np.testing.assert_array_equal(packed(x.reshape(3, 5, 9, 5), in_heads=True), packed(x))


def test_packed_linear_rejects_wrong_shapes():
    spec = quant.resolve(2)
    with pytest.raises(ValueError, match="expected"):
        PackedLinear(jnp.zeros((2, 3, 8), jnp.uint8), jnp.ones(8), spec=spec, in_features=64)
    with pytest.raises(ValueError, match="scale"):
        PackedLinear(jnp.zeros((2, 8, 8), jnp.uint8), jnp.ones(7), spec=spec, in_features=64)


def test_to_packed_model_logits_and_memory():
    cfg = small_config()
    model = Llama(cfg, quant=QuantRules.paretoq(2), rngs=nnx.Rngs(0))
    packed = to_packed_model(model)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)), jnp.int32)
    ref, got = logits(model, ids), logits(packed, ids)
    assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 1e-5
    # every decoder projection is packed: no float kernel is kept for it
    assert set(packed_linears(packed)) == {
        f"layers.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj")
    }  # fmt: skip
    kernels = [p for p, _ in nnx.to_flat_state(nnx.state(packed)) if p[-1] == "kernel"]
    assert kernels == []
    q = packed.layers.mlp.up_proj
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (2, 2, 8, 96)  # 2 bits: 2 planes
    # the original model is untouched
    assert isinstance(model.layers.mlp.up_proj, QuantLinear)


def test_to_packed_model_refuses_float_model():
    model = Llama(small_config(), quant=QuantRules(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no quantized linear"):
        to_packed_model(model)


def test_generation_from_packed_model():
    from paretoq_jax.generate import generate_tokens

    cfg = small_config()
    model = Llama(cfg, quant=QuantRules.paretoq(1.58), rngs=nnx.Rngs(3))
    packed = to_packed_model(model, ternary="base3")
    prompts = [[5, 17, 99], [42]]
    ref, ref_logits = generate_tokens(model, prompts, 6, return_logits=True)
    got, got_logits = generate_tokens(packed, prompts, 6, return_logits=True, materialize=False)
    assert got == ref and all(len(r) == 6 for r in got)
    np.testing.assert_allclose(got_logits, ref_logits, rtol=0, atol=1e-4 * np.abs(ref_logits).max())
