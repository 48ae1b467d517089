"""The quantizers against the golden vectors and an independent float64 NumPy re-computation.

The NumPy reference below is written straight from docs/quantizers.md in the (out, in) layout
with per-bit-width branches on purpose: it shares no code with paretoq_jax.quant.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paretoq_jax import quant

GOLDEN = Path(__file__).parent / "fixtures" / "quantizers.npz"
BITS = [1, 1.58, 2, 3, 4]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------- reference
def ref_forward_and_grads(W, alpha, g, bits):
    """Spec, literally: W (out, in), alpha (out,), g (out, in) -> Wq, dW, dalpha, init, codes."""
    a = np.maximum(alpha, 1e-5)[:, None]
    x = W / a
    N = W.size
    c = 0.99
    if bits == 1:
        Wq = a * np.sign(W)
        inside = (x >= -1) & (x <= 1)
        t = np.sign(W)
        s = 1 / np.sqrt(N)
        init = np.abs(W).mean(1)
        codes = np.where(W >= 0, 1, -1)
    elif bits in (1.58, 2):
        xc = np.clip(x, -c, c)
        if bits == 1.58:
            q = np.round(1.5 * xc) / 1.5
            out = 1.0
            codes = np.round(1.5 * xc)
        else:
            q = (np.round(2 * xc - 0.5) + 0.5) / 2
            out = 0.75
            codes = np.round(2 * xc - 0.5)
        Wq = a * q
        inside = (x >= -c) & (x <= c)
        t = np.where(x < -c, -out, np.where(x > c, out, q - x))
        s = 1 / np.sqrt(N)
        init = np.abs(W).max(1)
    else:
        Qn, Qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        r = np.round(x)
        Wq = a * np.clip(r, Qn, Qp)
        inside = (x >= Qn) & (x <= Qp)
        t = np.where(x < Qn, Qn, np.where(x > Qp, Qp, r - x))
        s = 1 / np.sqrt(N * Qp)
        init = np.abs(W).max(1) / Qp
        codes = np.clip(r, Qn, Qp)
    dW = g * inside
    dalpha = s * (g * t).sum(1)
    return Wq, dW, dalpha, init, codes.astype(np.int8)


def jax_all(W, alpha, g, bits, method=None, dtype=jnp.float64):
    """Our ops in the Flax layout: kernel = W.T (in, out)."""
    w = jnp.asarray(W.T, dtype)
    sc = jnp.asarray(alpha, dtype)
    gk = jnp.asarray(g.T, dtype)
    wq, vjp = jax.vjp(lambda w, s: quant.fake_quant(w, s, bits, method), w, sc)
    dw, ds = vjp(gk)
    init = quant.init_scale(w, bits, method)
    codes = quant.to_codes(w, sc, bits, method)
    return [np.asarray(v, np.float64) for v in (wq.T, dw.T, ds, init)] + [np.asarray(codes).T]


def golden_cases():
    z = np.load(GOLDEN)
    cases = sorted({tuple(k.split("_")[:2]) for k in z.files})
    return [(float(b[1:]) if "." in b else int(b[1:]), int(i)) for b, i in cases]


# ----------------------------------------------------------------------------- golden vectors
@pytest.mark.parametrize("bits,case", golden_cases())
def test_golden_float64(bits, case):
    z = np.load(GOLDEN)
    p = f"b{bits}_{case}_"
    wq, dw, ds, init, codes = jax_all(z[p + "w"], z[p + "alpha"], z[p + "g"], bits)
    np.testing.assert_allclose(wq, z[p + "wq"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(dw, z[p + "dw"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ds, z[p + "dalpha"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(init, z[p + "init"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(codes, z[p + "codes"])
    # the independent reference agrees with the golden vectors too (guards the reference itself)
    r = ref_forward_and_grads(z[p + "w"], z[p + "alpha"], z[p + "g"], bits)
    np.testing.assert_allclose(r[0], z[p + "wq"], atol=1e-12)
    np.testing.assert_allclose(r[2], z[p + "dalpha"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits,case", golden_cases())
def test_golden_float32(bits, case):
    z = np.load(GOLDEN)
    p = f"b{bits}_{case}_"
    wq, dw, ds, _, _ = jax_all(z[p + "w"], z[p + "alpha"], z[p + "g"], bits, dtype=jnp.float32)
    scale = np.abs(z[p + "wq"]).max() + 1e-30
    # f32 rounding can flip a weight sitting on a rounding boundary: allow a tiny fraction
    bad = np.abs(wq - z[p + "wq"]) > 1e-6 * scale
    assert bad.mean() <= 0.01, f"{bad.sum()} of {bad.size} f32 forward values differ"
    np.testing.assert_allclose(
        ds, z[p + "dalpha"], rtol=1e-4, atol=1e-6 * np.abs(z[p + "dalpha"]).max()
    )


# ----------------------------------------------------------------------------- fresh inputs
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(3, 5), (17, 64), (128, 33)])
def test_random_against_reference(bits, shape):
    rng = np.random.default_rng(hash((bits, shape)) % 2**32)
    out_, in_ = shape
    W = rng.standard_normal(shape) * rng.uniform(0.01, 2.0, size=(out_, 1))
    alpha = np.abs(W).mean(1) * rng.uniform(0.2, 1.5, size=out_)
    g = rng.standard_normal(shape)
    W[0, : min(3, in_)] = 0.0  # exact zeros exercise sign(0)
    mine = jax_all(W, alpha, g, bits)
    ref = ref_forward_and_grads(W, alpha, g, bits)
    for name, m, r in zip(["wq", "dw", "dalpha", "init"], mine[:4], ref[:4], strict=True):
        np.testing.assert_allclose(m, r, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(mine[4], ref[4])


@pytest.mark.parametrize("bits", BITS)
def test_codes_roundtrip_equals_forward(bits):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((48, 24)))
    s = quant.init_scale(w, bits) * 0.7
    codes = quant.to_codes(w, s, bits)
    deq = quant.from_codes(codes, s, bits, dtype=w.dtype)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(quant.fake_quant(w, s, bits)))
    spec = quant.resolve(bits)
    assert codes.dtype == jnp.int8
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax


@pytest.mark.parametrize("bits", BITS)
def test_number_of_levels(bits):
    """SEQ's clip at 0.99 gives exactly 3 (ternary) / 2^b levels; never one too many."""
    w = jnp.concatenate([jnp.linspace(-10, 10, 8000), jnp.zeros(1)])[:, None]
    s = jnp.ones((1,))
    levels = np.unique(np.asarray(quant.fake_quant(w, s, bits)))
    expected = {1: 3, 1.58: 3, 2: 4, 3: 8, 4: 16}[bits]  # 1 bit: +-1 and sign(0) = 0
    assert len(levels) == expected


# ----------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", [None, "absmean", "minmax"])
def test_finite_gradients_zero_row_and_tiny_scale(bits, method):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4)))
    w = w.at[:, 0].set(0.0)  # an all-zero output channel
    s = jnp.asarray([1e-9, 0.0, 1e-6, 0.5])  # below the 1e-5 clamp

    def loss(w, s):
        return jnp.sum(quant.fake_quant(w, s, bits, method) ** 2) + jnp.sum(
            quant.fake_quant(w, s, bits, method)
        )

    dw, ds = jax.grad(loss, argnums=(0, 1))(w, s)
    assert np.isfinite(np.asarray(dw)).all() and np.isfinite(np.asarray(ds)).all()
    assert np.isfinite(np.asarray(quant.fake_quant(w, s, bits, method))).all()


def test_scale_gradient_passes_through_clamp():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((8, 2)))
    s = jnp.asarray([1e-7, 1e-7])
    ds = jax.grad(lambda s: jnp.sum(quant.fake_quant(w, s, 4)))(s)
    assert np.all(np.asarray(ds) != 0)


@pytest.mark.parametrize("bits", BITS)
def test_jit_vmap_stacked_and_bf16(bits):
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((3, 32, 8)), jnp.float32)  # 3 stacked layers
    s = jax.vmap(lambda w: quant.init_scale(w, bits))(w)

    def f(w, s):
        return jnp.sum(jnp.tanh(quant.fake_quant(w, s, bits)))

    g_stacked = jax.jit(jax.grad(f, argnums=(0, 1)))(w, s)
    g_vmap = jax.vmap(jax.grad(f, argnums=(0, 1)))(w, s)
    g_loop = [jax.grad(f, argnums=(0, 1))(w[i], s[i]) for i in range(3)]
    for i in range(3):
        for a, b, c in zip(g_vmap, g_stacked, g_loop[i], strict=True):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(c), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(c), rtol=1e-6, atol=1e-7)
    wb = w.astype(jnp.bfloat16)
    out = quant.fake_quant(wb, s, bits)
    assert out.dtype == jnp.bfloat16 and out.shape == wb.shape
    dwb = jax.grad(lambda w: jnp.sum(quant.fake_quant(w, s, bits).astype(jnp.float32)))(wb)
    assert dwb.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- API surface
@pytest.mark.parametrize("bad", [0, 5, 8, 1.5001, "two", None, True])
def test_bad_bits_lists_valid_values(bad):
    with pytest.raises(ValueError, match=r"1, 1\.58 .*2, 3, 4"):
        quant.resolve(bad)


@pytest.mark.parametrize("good", ["ternary", "1.58", 1.58, "2", 2.0, 4])
def test_bits_aliases(good):
    assert quant.resolve(good).bits in (1.58, 2, 4)


@pytest.mark.parametrize("b", [16, 32, "16"])
def test_float_bits_is_identity(b):
    w = jnp.ones((4, 3))
    assert quant.resolve(b) is None
    assert quant.fake_quant(w, None, b) is w


def test_default_methods_and_invalid_combinations():
    assert [quant.resolve(b).method for b in BITS] == ["elastic", "seq", "seq", "lsq", "lsq"]
    with pytest.raises(ValueError, match="not defined at 1 bits"):
        quant.resolve(1, "lsq")
    with pytest.raises(ValueError, match="unknown quantization method"):
        quant.resolve(2, "gptq")
    with pytest.raises(ValueError, match="does not match kernel"):
        quant.fake_quant(jnp.ones((4, 3)), jnp.ones((4,)), 2)


# ----------------------------------------------------------------------------- alternatives
@pytest.mark.parametrize("bits", [1.58, 2, 3, 4])
def test_lsq_and_seq_everywhere_they_are_defined(bits):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 40))
    for method in ("lsq", "seq"):
        spec = quant.resolve(bits, method)
        w = jnp.asarray(W.T)
        s = quant.init_scale(w, bits, method)
        wq = np.asarray(quant.fake_quant(w, s, bits, method))
        levels = {1.58: 3, 2: 4, 3: 8, 4: 16}[bits]
        assert len(np.unique(np.round(wq / np.asarray(s), 9))) <= levels
        codes = quant.to_codes(w, s, bits, method)
        assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
        np.testing.assert_array_equal(
            np.asarray(quant.from_codes(codes, s, bits, method, w.dtype)), wq
        )


@pytest.mark.parametrize("bits", BITS)
def test_statistics_methods_are_not_learned(bits):
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((64, 6)))
    W = np.asarray(w).T
    for method, stat in (
        ("absmean", np.abs(W).mean(1) * quant.resolve(bits, "absmean").kappa),
        ("minmax", np.abs(W).max(1) / quant.resolve(bits, "minmax").init_div
         if bits != 1 else np.abs(W).mean(1)),
    ):  # fmt: skip
        s_eff = quant.effective_scale(w, None, bits, method)
        np.testing.assert_allclose(np.asarray(s_eff), stat, rtol=1e-12)
        ds = jax.grad(lambda s, m=method: jnp.sum(quant.fake_quant(w, s, bits, m) ** 2))(
            jnp.ones(6)
        )
        assert np.all(np.asarray(ds) == 0)
        # absmean ternary is BitNet b1.58: RoundClip(W / mean|W|, -1, 1) * mean|W|
        if method == "absmean" and bits == 1.58:
            g = np.abs(W).mean(1, keepdims=True)
            ref = np.clip(np.round(W / g), -1, 1) * g
            np.testing.assert_allclose(np.asarray(quant.fake_quant(w, None, bits, method)).T, ref)
