"""pack / unpack: exact round trips, real densities, and the documented byte layout."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paretoq_jax.quant.packing import pack, pack_format, packed_shape, unpack

# (bits, ternary layout, code range, bits per code)
FORMATS = [
    (1, "2bit", (-1, 1), 1.0),
    (1.58, "2bit", (-1, 1), 2.0),
    (1.58, "base3", (-1, 1), 1.6),
    (2, "2bit", (-2, 1), 2.0),
    (3, "2bit", (-4, 3), 3.0),
    (4, "2bit", (-8, 7), 4.0),
]
IDS = [f"{b}-{t}" for b, t, _, _ in FORMATS]


def random_codes(rng, bits, shape):
    lo, hi = pack_format(bits).kmin, pack_format(bits).kmax
    c = rng.integers(lo, hi + 1, size=shape)
    if bits == 1:
        c = np.where(c >= 0, 1, -1)
    return c.astype(np.int8)


def reference_unpack(packed: np.ndarray, bits, n: int, ternary: str = "2bit") -> np.ndarray:
    """Scalar re-implementation of docs/packed-format.md for packed (planes, R, cols)."""
    fields = {1: (1,), 1.58: (2,), 2: (2,), 3: (2, 1), 4: (4,)}[bits]
    kmin = {1: -1, 1.58: -1, 2: -2, 3: -4, 4: -8}[bits]
    mult = 2 if bits == 1 else 1
    rows = packed.shape[1]
    out = np.zeros((n, packed.shape[2]), np.int64)
    for i in range(n):
        t, r = divmod(i, rows)  # slab t, byte row r
        for col in range(packed.shape[2]):
            if bits == 1.58 and ternary == "base3":
                u = (int(packed[0, r, col]) // 3**t) % 3
            else:
                u, plane, shift = 0, 0, 0
                for w in fields:
                    g, j = divmod(t, 8 // w)
                    u |= ((int(packed[plane + g, r, col]) >> (w * j)) & ((1 << w) - 1)) << shift
                    plane, shift = plane + w, shift + w
            out[i, col] = mult * u + kmin
    return out


@pytest.mark.parametrize("bits,ternary,rng_range,bpc", FORMATS, ids=IDS)
@pytest.mark.parametrize("shape", [(1,), (13, 7), (41, 3), (3, 21, 5)])
def test_round_trip_numpy_and_jax(bits, ternary, rng_range, bpc, shape):
    rng = np.random.default_rng(zlib.crc32(repr((bits, ternary, shape)).encode()))
    c = random_codes(rng, bits, shape)
    p = pack(c, bits, ternary=ternary)
    assert isinstance(p, np.ndarray) and p.dtype == np.uint8
    assert p.shape == packed_shape(shape, bits, ternary=ternary)
    back = unpack(p, bits, shape, ternary=ternary)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, c)
    pj = pack(jnp.asarray(c), bits, ternary=ternary)
    assert isinstance(pj, jax.Array)
    np.testing.assert_array_equal(np.asarray(pj), p)
    uj = jax.jit(lambda q: unpack(q, bits, shape, ternary=ternary))(pj)
    assert uj.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(uj), c)


@pytest.mark.parametrize("bits,ternary,rng_range,bpc", FORMATS, ids=IDS)
def test_layout_matches_documented_reference(bits, ternary, rng_range, bpc):
    rng = np.random.default_rng(7)
    n, cols = 29, 4
    c = random_codes(rng, bits, (n, cols))
    p = pack(c, bits, ternary=ternary)
    np.testing.assert_array_equal(reference_unpack(p, bits, n, ternary), c)


@pytest.mark.parametrize("bits,ternary,rng_range,bpc", FORMATS, ids=IDS)
def test_density(bits, ternary, rng_range, bpc):
    # 4096 x 40: 4096 rows is a multiple of neither 5 nor 8 * 5, so check with the padding rule
    for n in (4096, 4000, 14336, 1001):
        p = pack(np.full((n, 40), 1, np.int8), bits, ternary=ternary)
        slabs = 5 if ternary == "base3" and bits == 1.58 else 8
        assert p.size == -(-n // slabs) * slabs * 40 * bpc / 8
    p = pack(np.ones((4000, 16), np.int8), bits, ternary=ternary)  # 4000 = 8 * 5 * 100
    assert p.nbytes * 8 == pytest.approx(4000 * 16 * bpc)


def test_hand_computed_bytes():
    # 1 bit, 8 codes, R = 1: byte bit t holds slab t -> u = [1,0,0,0,0,0,0,1] -> 0b10000001
    np.testing.assert_array_equal(pack(np.array([1, -1, -1, -1, -1, -1, -1, 1]), 1), [[0x81]])
    # 4 bit, 2 codes: u = [0, 15] in the two nibbles of plane 0; planes 1..3 hold padding (u = 0)
    np.testing.assert_array_equal(pack(np.array([-8, 7]), 4), [[0xF0], [0], [0], [0]])
    # 3 bit, 8 codes of 7 (u = 7): low 2-bit field planes full of ones, 1-bit plane 0xFF
    np.testing.assert_array_equal(pack(np.full(8, 3), 3), [[0xFF], [0xFF], [0xFF]])
    # base 3: u = [2, 1, 0, 0, 0] -> 2 + 1 * 3 = 5
    np.testing.assert_array_equal(pack(np.array([1, 0, -1, -1, -1]), 1.58, ternary="base3"), [[5]])


def test_axis_and_stacked_layers():
    rng = np.random.default_rng(3)
    c = random_codes(rng, 3, (4, 19, 6))  # (L, in, out)
    p = pack(c, 3)
    assert p.shape == (4, 3, 3, 6)
    for layer in range(4):  # stacked packing == per-layer packing
        np.testing.assert_array_equal(p[layer], pack(c[layer], 3))
    p0 = pack(c, 3, axis=0)
    np.testing.assert_array_equal(unpack(p0, 3, c.shape, axis=0), c)


def test_bits_aliases_and_float_codes():
    c = np.array([[1.0, -1.0], [0.0, 1.0]], np.float32)
    np.testing.assert_array_equal(pack(c, "ternary"), pack(c.astype(np.int8), 1.58))
    np.testing.assert_array_equal(pack(c, "1.58"), pack(c, 1.58))


@pytest.mark.parametrize("bits", [16, 32, 5, 0.5, "int8", True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(np.zeros((8, 2), np.int8), bits)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="-8..7"):
        pack(np.array([[8]]), 4)
    with pytest.raises(ValueError, match="-1 or \\+1"):
        pack(np.array([[0]]), 1)
    with pytest.raises(ValueError, match="integers"):
        pack(np.array([[0.5]]), 4)
    with pytest.raises(ValueError, match="ternary"):
        pack(np.zeros((8, 2), np.int8), 1.58, ternary="base4")
    with pytest.raises(ValueError, match="shape"):
        unpack(np.zeros((2, 3, 4), np.uint8), 2, (30, 4))
    with pytest.raises(ValueError, match="0-d"):
        pack(np.int8(1), 2)


def test_to_codes_round_trip_through_packing():
    from paretoq_jax.quant import from_codes, init_scale, to_codes

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(37, 11)).astype(np.float32))
    for bits in (1, 1.58, 2, 3, 4):
        s = init_scale(w, bits)
        c = to_codes(w, s, bits)
        back = unpack(pack(c, bits), bits, c.shape)
        np.testing.assert_array_equal(np.asarray(back), np.asarray(c))
        np.testing.assert_array_equal(
            np.asarray(from_codes(back, s, bits)), np.asarray(from_codes(c, s, bits))
        )


def test_doc_reference_unpacker():
    """The numpy reference unpacker printed in docs/packed-format.md decodes pack's output."""
    doc = (Path(__file__).parents[1] / "docs" / "packed-format.md").read_text()
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", doc, re.S).group(1), namespace)
    rng = np.random.default_rng(11)
    for bits, ternary, _, _ in FORMATS:
        c = random_codes(rng, bits, (37, 5))
        p = pack(c, bits, ternary=ternary)
        got = namespace["unpack_ref"](p, bits, 37, base3=ternary == "base3" and bits == 1.58)
        np.testing.assert_array_equal(got, c)


@pytest.mark.parametrize("bits,ternary,rng_range,bpc", FORMATS, ids=IDS)
def test_tpu_unpack_kernel_matches_unpack(bits, ternary, rng_range, bpc):
    """The Pallas TPU kernel that unpacks gathered codes (``kernels.unpack_tpu``), interpreted:
    the codes of every format, over several row and lane tiles and blocks, in stored order."""
    from paretoq_jax.kernels.unpack_tpu import unpack_blocks

    fmt = pack_format(bits, ternary)
    rows = 320  # byte rows: 2 row tiles of 160; 1,024 columns: 2 lane tiles of 512
    codes = random_codes(np.random.default_rng(7), bits, (3, fmt.n_slabs * rows - 3, 1024))
    packed = pack(codes, bits, ternary=ternary, axis=-2)
    got = unpack_blocks(
        jnp.asarray(packed), fields=fmt.fields, base3=fmt.base3, kmin=fmt.kmin, mult=fmt.mult,
        interpret=True,
    )  # fmt: skip
    assert got.dtype == jnp.int8 and got.shape == (3, fmt.n_slabs, rows, 1024)
    got = np.asarray(got).reshape(3, -1, 1024)[:, : codes.shape[1]]
    np.testing.assert_array_equal(got, codes)
    with pytest.raises(ValueError, match="byte planes"):
        unpack_blocks(jnp.asarray(packed[:, :1] if fmt.n_planes > 1 else np.concatenate(
            [packed, packed], axis=1)), fields=fmt.fields, base3=fmt.base3, kmin=fmt.kmin,
            mult=fmt.mult, interpret=True)  # fmt: skip
