"""GGUF block encoders: gguf's own dequantizer reproduces the QAT weights up to fp16 scales."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from paretoq_jax.io.gguf_quants import DEFAULT_QTYPE, encode_tensor
from paretoq_jax.quant import from_codes, resolve

BLOCK_QTYPES = (Q.TQ1_0, Q.TQ2_0, Q.Q2_K, Q.Q4_0, Q.Q8_0)
# (bits, method, qtypes that hold the grid exactly)
GRIDS = [
    (1, None, (Q.TQ1_0, Q.TQ2_0, Q.Q2_K, Q.Q4_0, Q.Q8_0)),
    (1.58, None, (Q.TQ1_0, Q.TQ2_0, Q.Q2_K, Q.Q4_0, Q.Q8_0)),
    (1.58, "lsq", (Q.TQ1_0, Q.TQ2_0, Q.Q2_K, Q.Q4_0, Q.Q8_0)),
    (2, None, (Q.Q2_K, Q.Q4_0, Q.Q8_0)),
    (2, "lsq", (Q.Q2_K, Q.Q4_0, Q.Q8_0)),
    (2, "absmean", (Q.Q2_K, Q.Q4_0, Q.Q8_0)),
    (3, None, (Q.Q4_0, Q.Q8_0)),
    (3, "seq", (Q.Q4_0, Q.Q8_0)),
    (4, None, (Q.Q4_0, Q.Q8_0)),
    (4, "minmax", (Q.Q4_0, Q.Q8_0)),
    (4, "seq", (Q.Q8_0,)),
]


def make(rng, bits, method, n_in=512, n_out=6):
    spec = resolve(bits, method)
    c = rng.integers(spec.qmin, spec.qmax + 1, size=(n_in, n_out))
    if bits == 1:
        c = np.where(c >= 0, 1, -1)
    scale = rng.uniform(1e-3, 3.0, n_out).astype(np.float32)
    return c.astype(np.int8), scale


@pytest.mark.parametrize("bits,method,exact", GRIDS, ids=[f"{b}-{m}" for b, m, _ in GRIDS])
def test_dequantize_reproduces_qat_weights(bits, method, exact):
    spec = resolve(bits, method)
    rng = np.random.default_rng(int(bits * 100))
    c, scale = make(rng, bits, method)
    w = np.asarray(from_codes(jnp.asarray(c), jnp.asarray(scale), bits, method), np.float64).T
    # independent statement of the spec: W = a * (k + z) / n, fp16-rounded unit a / (n * den)
    den = 2 if spec.z == 0.5 else 1
    unit16 = (scale.astype(np.float64) / (spec.n * den)).astype(np.float16).astype(np.float32)
    expected = unit16[:, None] * (den * (c.T.astype(np.float32) + spec.z))
    for qtype in BLOCK_QTYPES:
        if qtype not in exact:
            with pytest.raises(ValueError, match="cannot hold"):
                encode_tensor(c, scale, bits, qtype, method=method)
            continue
        data, got_type = encode_tensor(c, scale, bits, qtype, method=method)
        assert got_type == qtype and data.dtype == np.uint8
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        assert data.shape == (c.shape[1], c.shape[0] // block * type_size)
        deq = gguf.quants.dequantize(data, qtype)
        assert deq.shape == (c.shape[1], c.shape[0])
        np.testing.assert_array_equal(deq, expected)  # bit-exact given the fp16 unit
        tol = 2.0**-11 * np.abs(w).max(axis=1, keepdims=True)  # fp16 rounding of the scale
        assert np.all(np.abs(deq - w) <= tol)


def test_default_types_and_block_scales():
    rng = np.random.default_rng(0)
    expected_d = {1: 1.0, 1.58: 2 / 3, 2: 1 / 4, 3: 1.0, 4: 1.0}  # d / a (quantizers.md)
    for bits, qtype in DEFAULT_QTYPE.items():
        c, scale = make(rng, bits, None, n_in=256, n_out=3)
        data, got = encode_tensor(c, scale, bits)
        assert got == qtype
        d_want = (scale * expected_d[bits]).astype(np.float16)
        if qtype == Q.TQ2_0:
            d = data[:, 64:66].copy().view(np.float16)[:, 0]
        elif qtype == Q.Q2_K:
            assert np.all(data[:, :16] == 2 | (3 << 4))  # sub-block scale 2, min 3
            d = data[:, 80:82].copy().view(np.float16)[:, 0]
            dmin = data[:, 82:84].copy().view(np.float16)[:, 0]
            np.testing.assert_array_equal(dmin, d_want)
        else:  # Q4_0: d first in every 18-byte block
            d = data[:, :2].copy().view(np.float16)[:, 0]
        np.testing.assert_array_equal(d, d_want)
    assert DEFAULT_QTYPE == {1: Q.TQ2_0, 1.58: Q.TQ2_0, 2: Q.Q2_K, 3: Q.Q4_0, 4: Q.Q4_0}


def test_fallbacks_and_f16():
    rng = np.random.default_rng(1)
    c, scale = make(rng, 1.58, None, n_in=96, n_out=4)  # 96: multiple of 32, not of 256
    data, qtype = encode_tensor(c, scale, 1.58)
    assert qtype == Q.Q4_0
    w = np.asarray(from_codes(jnp.asarray(c), jnp.asarray(scale), 1.58)).T
    np.testing.assert_allclose(gguf.quants.dequantize(data, qtype), w, rtol=2.0**-11)
    c, scale = make(rng, 4, "seq", n_in=96, n_out=4)
    assert encode_tensor(c, scale, 4, method="seq")[1] == Q.Q8_0
    c, scale = make(rng, 2, None, n_in=40, n_out=4)
    with pytest.raises(ValueError, match="F16"):
        encode_tensor(c, scale, 2)
    with pytest.raises(ValueError, match="block size 256"):
        encode_tensor(c[:32], scale, 2, Q.Q2_K)
    w16, qtype = encode_tensor(c, scale, 2, Q.F16)
    assert qtype == Q.F16 and w16.dtype == np.float16 and w16.shape == (4, 40)
    w = np.asarray(from_codes(jnp.asarray(c), jnp.asarray(scale), 2)).T
    np.testing.assert_allclose(w16.astype(np.float32), w, rtol=2.0**-11)


def test_bad_input():
    c, scale = make(np.random.default_rng(2), 2, None, n_in=256, n_out=3)
    with pytest.raises(ValueError, match="-2..1"):
        encode_tensor(c + 2, scale, 2)
    with pytest.raises(ValueError, match="scale"):
        encode_tensor(c, scale[:2], 2)
    with pytest.raises(ValueError, match="not quantized"):
        encode_tensor(c, scale, 16)
    with pytest.raises(ValueError, match="not supported"):
        encode_tensor(c, scale, 2, Q.Q3_K)


def test_written_file_reads_back(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    want = {}
    for name, bits, qtype in [("a", 1, None), ("b", 1.58, Q.TQ1_0), ("c", 2, None), ("d", 4, None)]:
        c, scale = make(rng, bits, None, n_in=256, n_out=5)
        data, qt = encode_tensor(c, scale, bits, qtype)
        writer.add_tensor(name, data, raw_dtype=qt)
        want[name] = (qt, gguf.quants.dequantize(data, qt))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        qt, deq = want[t.name]
        assert t.tensor_type == qt
        assert [int(x) for x in t.shape] == [256, 5]  # ggml ne = [in, out]
        np.testing.assert_array_equal(gguf.quants.dequantize(t.data, qt), deq)
