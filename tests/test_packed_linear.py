"""packed_matmul: equals x @ from_codes(codes) without ever building the whole float weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paretoq_jax.quant import from_codes, resolve
from paretoq_jax.quant.packed_linear import packed_matmul
from paretoq_jax.quant.packing import pack

CASES = [
    (1, None, "2bit"),
    (1.58, None, "2bit"),
    (1.58, None, "base3"),
    (1.58, "lsq", "2bit"),
    (2, None, "2bit"),
    (2, "lsq", "2bit"),
    (3, None, "2bit"),
    (3, "seq", "2bit"),
    (4, None, "2bit"),
    (4, "seq", "2bit"),
]


def make(rng, bits, method, n_in, n_out):
    spec = resolve(bits, method)
    c = rng.integers(spec.qmin, spec.qmax + 1, size=(n_in, n_out))
    if bits == 1:
        c = np.where(c >= 0, 1, -1)
    scale = rng.uniform(0.05, 1.0, n_out).astype(np.float32)
    return c.astype(np.int8), scale


@pytest.mark.parametrize("bits,method,ternary", CASES)
def test_matches_float64_dense(bits, method, ternary):
    rng = np.random.default_rng(1)
    n_in, n_out = 77, 12  # odd: padding rows and a remainder tile (R = 10 or 16, tile 3)
    c, scale = make(rng, bits, method, n_in, n_out)
    x = rng.normal(size=(2, 3, n_in)).astype(np.float32)
    p = jnp.asarray(pack(c, bits, ternary=ternary))
    y = packed_matmul(
        jnp.asarray(x), p, jnp.asarray(scale), bits, n_in, method=method, ternary=ternary,
        tile_rows=3,
    )  # fmt: skip
    w = np.asarray(from_codes(jnp.asarray(c), jnp.asarray(scale), bits, method), np.float64)
    ref = x.astype(np.float64) @ w
    assert y.shape == (2, 3, n_out) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    # the default tile size gives the same result
    y2 = packed_matmul(jnp.asarray(x), p, jnp.asarray(scale), bits, n_in, method=method,
                       ternary=ternary)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y2), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_bfloat16_activations():
    rng = np.random.default_rng(2)
    c, scale = make(rng, 2, None, 64, 16)
    x = jnp.asarray(rng.normal(size=(4, 64)), jnp.bfloat16)
    y = packed_matmul(x, jnp.asarray(pack(c, 2)), jnp.asarray(scale), 2, 64)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float64) @ np.asarray(from_codes(jnp.asarray(c), scale, 2), np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=1e-2 * np.abs(ref).max())


def test_scale_clamp_and_jit_with_vmap():
    rng = np.random.default_rng(3)
    c, scale = make(rng, 4, None, 24, 5)
    scale[0] = 0.0  # clamped to 1e-5 like from_codes
    x = rng.normal(size=(24,)).astype(np.float32)
    y = packed_matmul(jnp.asarray(x), jnp.asarray(pack(c, 4)), jnp.asarray(scale), 4, 24)
    ref = x.astype(np.float64) @ np.asarray(from_codes(jnp.asarray(c), scale, 4), np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    # stacked layers through vmap
    cs = np.stack([c, -c - 1])
    ps = jnp.asarray(pack(cs, 4))
    ys = jax.vmap(lambda p, s: packed_matmul(jnp.asarray(x), p, s, 4, 24))(
        ps, jnp.asarray(np.stack([scale, scale]))
    )
    for i in range(2):
        ref = x.astype(np.float64) @ np.asarray(from_codes(jnp.asarray(cs[i]), scale, 4))
        np.testing.assert_allclose(np.asarray(ys[i]), ref, rtol=1e-5, atol=1e-5)


def _all_avals(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for param in eqn.params.values():
            subs = param if isinstance(param, tuple | list) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _all_avals(getattr(inner, "jaxpr", inner))


def test_never_materializes_the_whole_weight():
    rng = np.random.default_rng(4)
    n_in, n_out = 256, 64
    c, scale = make(rng, 3, None, n_in, n_out)
    p = jnp.asarray(pack(c, 3))
    x = jnp.ones((1, n_in), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x, p, s: packed_matmul(x, p, s, 3, n_in, tile_rows=4))(
        x, p, jnp.asarray(scale)
    )
    sizes = [int(np.prod(a.shape)) for a in _all_avals(jaxpr.jaxpr) if hasattr(a, "shape")]
    assert max(sizes) <= 8 * 4 * n_out  # one tile: 8 slabs x 4 byte rows x out
    assert max(sizes) < n_in * n_out // 4


def test_errors():
    c, scale = make(np.random.default_rng(5), 2, None, 16, 4)
    p = jnp.asarray(pack(c, 2))
    x = jnp.ones((16,))
    with pytest.raises(ValueError, match="in_features"):
        packed_matmul(x, p, jnp.asarray(scale), 2, 40)
    with pytest.raises(ValueError, match="features"):
        packed_matmul(jnp.ones((15,)), p, jnp.asarray(scale), 2, 16)
    with pytest.raises(ValueError, match="scale"):
        packed_matmul(x, p, jnp.ones((5,)), 2, 16)
    with pytest.raises(ValueError, match="not quantized"):
        packed_matmul(x, p, jnp.asarray(scale), 16, 16)
