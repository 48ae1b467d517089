"""paretoq_jax.analysis: Pareto frontier, model size in bits, learning-transition numbers."""

import math

import numpy as np
import pytest

from paretoq_jax.analysis import (
    bits_per_weight,
    code_change_fraction,
    model_size,
    model_size_bits,
    pareto_frontier,
    relative_l1,
    transition_stats,
)
from paretoq_jax.quant import resolve


def _brute_frontier(sizes, values, minimize=True):
    """O(n^2) definition: i is on the frontier iff no j is <= in both and < in one."""
    sgn = 1 if minimize else -1
    out = []
    for i, (s, v) in enumerate(zip(sizes, values, strict=True)):
        if not (math.isfinite(s) and math.isfinite(v)):
            continue
        dominated = any(
            (s2 <= s and sgn * v2 <= sgn * v and (s2 < s or sgn * v2 < sgn * v))
            or (s2 == s and v2 == v and j < i)
            for j, (s2, v2) in enumerate(zip(sizes, values, strict=True))
            if j != i and math.isfinite(s2) and math.isfinite(v2)
        )
        if not dominated:
            out.append(i)
    return sorted(out, key=lambda i: sizes[i])


def test_pareto_frontier_hand_made():
    # size, perplexity: (1, 100) (2, 50) (2, 60 dominated) (3, 55 dominated) (4, 20) (5, 20 dom.)
    sizes = [1, 2, 2, 3, 4, 5]
    ppl = [100, 50, 60, 55, 20, 20]
    assert pareto_frontier(sizes, ppl) == [0, 1, 4]
    # accuracy: higher is better
    acc = [0.3, 0.5, 0.4, 0.6, 0.6, 0.7]
    assert pareto_frontier(sizes, acc, minimize=False) == [0, 1, 3, 5]


def test_pareto_frontier_skips_nonfinite_and_matches_brute_force():
    assert pareto_frontier([1, 2, 3], [float("nan"), float("inf"), 5.0]) == [2]
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        s = rng.integers(0, 5, n).astype(float).tolist()
        v = rng.integers(0, 5, n).astype(float).tolist()
        for minimize in (True, False):
            assert pareto_frontier(s, v, minimize=minimize) == _brute_frontier(s, v, minimize)
    with pytest.raises(ValueError, match="differ in length"):
        pareto_frontier([1, 2], [1])


def test_bits_per_weight():
    assert bits_per_weight(resolve(2, "seq")) == 2
    assert bits_per_weight(resolve(4, "lsq")) == 4
    assert bits_per_weight(resolve(1, "elastic")) == 1
    assert bits_per_weight(resolve(1.58, "seq")) == pytest.approx(1.5849625, abs=1e-6)
    assert bits_per_weight(resolve(1.58, "seq"), ternary="2bit") == 2
    assert bits_per_weight(resolve(1.58, "seq"), ternary="base3") == 1.6
    assert bits_per_weight(None) == 16
    with pytest.raises(ValueError, match="ternary"):
        bits_per_weight(resolve(2), ternary="3bit")


def test_model_size_arithmetic():
    spec3, tern = resolve(3, "lsq"), resolve(1.58, "seq")
    size = model_size_bits([(1000, 10, spec3), (600, 20, tern)], float_params=500)
    float_part = 16 * (500 + 30)
    assert size.quantized_weights == 1600 and size.scales == 30 and size.float_params == 500
    assert size.bits == pytest.approx(1000 * 3 + 600 * math.log2(3) + float_part)
    assert size.bits_stored == 1000 * 3 + 600 * 2 + float_part
    assert size.total_params == 2100


def test_model_size_of_tiny_llama_by_hand():
    """configs/models/tiny-llama: d=64, 2 layers, 4 heads of 16 (2 kv), ffn 176, vocab 512, tied."""
    import jax.numpy as jnp
    from flax import nnx

    from paretoq_jax.models import Llama, LlamaConfig, QuantRules

    cfg = LlamaConfig.from_json("configs/models/tiny-llama")
    d, f, kv, L, V = 64, 176, 32, 2, 512
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * f
    channels = d + 2 * kv + d + 2 * f + d
    floats = V * d + L * 2 * d + d
    for bits, method in ((2, "seq"), (1.58, "seq"), (4, "minmax"), (16, None)):
        model = Llama(cfg, quant=QuantRules.paretoq(bits, method) if bits != 16 else QuantRules(),
                      dtype=jnp.float32, rngs=nnx.Rngs(0), scan_layers=False)  # fmt: skip
        size = model_size(model)
        if bits == 16:
            assert size.quantized_weights == 0 and size.bits == 16 * (L * per_layer + floats)
            continue
        b = math.log2(3) if bits == 1.58 else bits
        assert size.quantized_weights == L * per_layer
        assert size.float_params == floats
        assert size.bits == pytest.approx(L * per_layer * b + 16 * (floats + L * channels))


def test_relative_l1_and_code_change():
    w0 = np.array([1.0, -2.0, 3.0, 0.0])
    w1 = np.array([1.5, -2.0, 2.0, 0.5])
    assert relative_l1(w0, w1) == pytest.approx((0.5 + 0 + 1 + 0.5) / 6)
    assert relative_l1(np.zeros(3), np.zeros(3)) == 0.0
    assert code_change_fraction(np.array([1, 0, -1, 1]), np.array([1, 1, -1, 0])) == 0.5
    with pytest.raises(ValueError, match="shape"):
        relative_l1(np.zeros(3), np.zeros(4))


def test_transition_stats_weights_all_kernels_equally():
    rng = np.random.default_rng(1)
    a0, b0 = rng.normal(size=(4, 8)), rng.normal(size=(2, 3, 5))
    a1, b1 = a0 + 0.1 * rng.normal(size=a0.shape), b0 * 1.5
    ka0, kb0 = np.sign(a0), np.sign(b0)
    ka1, kb1 = np.sign(a1), -np.sign(b1)
    st = transition_stats([("a", a0, a1, ka0, ka1), ("b", b0, b1, kb0, kb1)])
    num = np.abs(a1 - a0).sum() + np.abs(b1 - b0).sum()
    assert st.relative_l1 == pytest.approx(num / (np.abs(a0).sum() + np.abs(b0).sum()))
    changed = (ka0 != ka1).sum() + (kb0 != kb1).sum()
    assert st.codes_changed == pytest.approx(changed / (a0.size + b0.size))
    assert st.per_kernel["b"]["codes_changed"] == 1.0
    assert st.per_kernel["b"]["relative_l1"] == pytest.approx(0.5)
