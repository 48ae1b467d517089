"""The native CPU kernel (paretoq_jax.kernels, jax.ffi) against the XLA path, and its fallback.

Native tests are skipped where the kernel cannot be built (no C++ compiler); the fallback tests
run everywhere (they simulate a missing or failing compiler).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax import kernels, quant
from paretoq_jax.generate import generate_tokens
from paretoq_jax.models import Llama, LlamaConfig, QuantLinear, QuantRules
from paretoq_jax.models.packed import (
    Int8Embedding,
    PackedLinear,
    linear_codes,
    to_packed_model,
    use_kernel,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama"

native = pytest.mark.skipif(
    not kernels.native_available(), reason=f"native kernel unavailable: {kernels.native_error()}"
)

LAYOUTS = [(1, None, "2bit"), (1.58, None, "2bit"), (1.58, None, "base3"), (2, None, "2bit"),
           (3, None, "2bit"), (4, None, "2bit"), (2, "absmean", "2bit"), (4, "lsq", "2bit")]  # fmt: skip
# (in, out, batch): odd sizes (padded slabs, partial column blocks), batch 1..16 and beyond;
# batch 1 sums panels of columns: several per thread's range, and a ragged end
SHAPES = [(45, 24, 1), (77, 131, 3), (130, 70, 16), (5, 1, 20), (21, 9003, 1)]


@jax.jit
def _apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def run(module, x):
    return np.asarray(_apply(*nnx.split(module), x))


def packed_linear(bits, method, ternary, n_in, n_out, kernel, seed=0) -> PackedLinear:
    spec = quant.resolve(bits, method)
    lin = QuantLinear(n_in, n_out, spec=spec, rngs=nnx.Rngs(seed))
    if lin.scale is not None:  # make one channel's scale hit the 1e-5 clamp
        lin.scale[...] = lin.scale[...].at[0].set(0.0)
    codes, a = linear_codes(lin)
    return PackedLinear(
        quant.pack(codes, bits, ternary=ternary), a, spec=spec, in_features=n_in,
        ternary=ternary, kernel=kernel,
    )  # fmt: skip


@native
@pytest.mark.parametrize("bits,method,ternary", LAYOUTS)
def test_native_matches_xla(bits, method, ternary):
    for n_in, n_out, batch in SHAPES:
        lin = packed_linear(bits, method, ternary, n_in, n_out, "native")
        x = jax.random.normal(jax.random.PRNGKey(batch), (batch, n_in))
        got = run(lin, x)
        ref = run(use_kernel(lin, "xla"), x)
        assert got.shape == ref.shape == (batch, n_out)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@native
def test_native_bfloat16_and_leading_axes():
    """bf16 activations (the kernel computes in float32 and casts back), (B, S, in) inputs,
    vmap."""
    lin = packed_linear(2, None, "2bit", 72, 40, "native")
    lin.dtype = jnp.bfloat16
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 72)).astype(jnp.bfloat16)
    got = run(lin, x)
    ref = run(use_kernel(lin, "xla"), x)
    assert got.dtype == ref.dtype == jnp.bfloat16 and got.shape == (2, 3, 40)
    got, ref = got.astype(np.float32), ref.astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2 * np.abs(ref).max())
    # under vmap (the kernel runs once per mapped slice)
    lin = packed_linear(2, None, "2bit", 72, 40, "native")
    x = x.astype(jnp.float32)
    mapped = np.asarray(jax.vmap(lambda xi: lin(xi))(x))
    np.testing.assert_allclose(mapped, run(use_kernel(lin, "xla"), x), rtol=0, atol=1e-5)


@native
@pytest.mark.parametrize("bits,ternary", [(2, "2bit"), (1.58, "base3"), (3, "2bit")])
def test_native_reads_a_layer_of_stacked_codes_in_place(bits, ternary):
    """``layer=`` reads entry ``i`` of stacked codes and scales (traced inside a scan, or an
    int) exactly as the kernel does on that layer's slice; a bad index or shape is refused."""
    spec = quant.resolve(bits, None)
    n_layers, n_in, n_out = 3, 77, 45
    lins = [QuantLinear(n_in, n_out, spec=spec, rngs=nnx.Rngs(i)) for i in range(n_layers)]
    parts = [linear_codes(lin) for lin in lins]
    packed = jnp.stack([quant.pack(c, bits, ternary=ternary) for c, _ in parts])
    scale = jnp.stack([a for _, a in parts])
    fmt = quant.pack_format(bits, ternary)
    kw = dict(layout="base3" if fmt.base3 else ",".join(map(str, fmt.fields)), in_features=n_in,
              mult=fmt.mult, offset=fmt.kmin + spec.z, n=spec.n, eps=quant.SCALE_EPS)  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(0), (2, n_in))
    sliced = [np.asarray(kernels.packed_linear(x, packed[i], scale[i], **kw)) for i in range(3)]

    def step(_, i):
        return None, kernels.packed_linear(x, packed, scale, layer=i, **kw)

    _, in_place = jax.jit(lambda: jax.lax.scan(step, None, jnp.arange(n_layers)))()
    np.testing.assert_array_equal(np.asarray(in_place), np.stack(sliced))
    np.testing.assert_array_equal(
        np.asarray(kernels.packed_linear(x, packed, scale, layer=2, **kw)), sliced[2]
    )
    with pytest.raises(Exception, match="layer index out of range"):
        np.asarray(kernels.packed_linear(x, packed, scale, layer=n_layers, **kw))
    with pytest.raises(ValueError, match="stacked over layers"):
        kernels.packed_linear(x, packed[0], scale[0], layer=0, **kw)


@native
def test_decoder_hands_packed_codes_whole_to_the_kernel():
    """Inside the decoder's scan the native kernel gets the stacked ``(L, P, R, out)`` codes
    (read in place at the layer index), never a per-layer slice: a slice would be copied."""
    cfg = dataclasses.replace(LlamaConfig.from_json(TINY), hidden_size=64, intermediate_size=96,
                              num_hidden_layers=3)  # fmt: skip
    model = use_kernel(to_packed_model(Llama(cfg, quant=QuantRules.paretoq(2), rngs=nnx.Rngs(0))),
                       "native")  # fmt: skip
    graphdef, state = nnx.split(model)
    ids = jnp.ones((1, 4), jnp.int32)
    hlo = jax.jit(lambda s: nnx.merge(graphdef, s)(ids)).lower(state).as_text()
    calls = [ln for ln in hlo.splitlines() if kernels.TARGET in ln and "custom_call" in ln]
    assert len(calls) == 7  # the 7 projections of the one scanned layer body
    stacked = f"tensor<{cfg.num_hidden_layers}x2x"  # 2-bit: two byte planes, stacked over L
    assert all(stacked in ln for ln in calls), calls[0]
    got = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state))
    ref = np.asarray(_apply(*nnx.split(use_kernel(nnx.clone(model), "xla")), ids))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    unrolled = nnx.clone(model)  # layers unrolled in Python: a static index into the stack
    unrolled.scan_layers = False
    np.testing.assert_allclose(run(unrolled, ids), got, rtol=0, atol=1e-5 * np.abs(ref).max())


@native
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_native_int8_lm_head(batch):
    table = jax.random.normal(jax.random.PRNGKey(0), (203, 72))
    emb = use_kernel(Int8Embedding.quantize(table), "native")
    h = jax.random.normal(jax.random.PRNGKey(1), (batch, 72))
    attend = jax.jit(lambda g, s, h: nnx.merge(g, s).attend(h))
    got = np.asarray(attend(*nnx.split(emb), h))
    ref = np.asarray(attend(*nnx.split(use_kernel(emb, "xla")), h))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    exact = np.asarray(h, np.float64) @ np.asarray(emb.weight(), np.float64).T
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


@native
@pytest.mark.parametrize("bits,embed", [(2, "float"), (3, "int8")])
def test_greedy_decode_native_equals_xla(bits, embed):
    """The tiny model's greedy tokens are the same by either kernel, inside the compiled
    decode loop (scan over layers, while_loop over tokens); logits agree to float rounding."""
    cfg = dataclasses.replace(LlamaConfig.from_json(TINY), hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, tie_word_embeddings=True)  # fmt: skip
    model = to_packed_model(Llama(cfg, quant=QuantRules.paretoq(bits), rngs=nnx.Rngs(2)),
                            embed=embed)  # fmt: skip
    prompts = [[5, 17, 99, 3], list(range(10, 30))]
    out = {
        k: generate_tokens(model, prompts, 6, return_logits=True, kernel=k)
        for k in ("native", "xla")
    }
    assert out["native"][0] == out["xla"][0]
    ref = out["xla"][1]
    np.testing.assert_allclose(out["native"][1], ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_resolve_names_and_env(monkeypatch):
    assert kernels.resolve("xla") == "xla"
    with pytest.raises(ValueError, match="choose one of"):
        kernels.resolve("fast")
    monkeypatch.setenv("PARETOQ_KERNEL", "xla")
    assert kernels.resolve(None) == "xla"
    monkeypatch.setenv("PARETOQ_KERNEL", "bogus")
    with pytest.raises(ValueError, match=r"\$PARETOQ_KERNEL"):
        kernels.resolve(None)
    with pytest.raises(ValueError, match="choose one of"):
        use_kernel(packed_linear(2, None, "2bit", 16, 8, None), "gpu")


def test_auto_leaves_long_products_to_xla():
    """``auto`` keeps the native kernel to decode-sized products (a prefill is a GEMM)."""
    assert kernels.resolve("xla", rows=1) == "xla"
    assert kernels.resolve("auto", rows=kernels.AUTO_MAX_ROWS + 1) == "xla"
    if kernels.native_available():
        assert kernels.resolve("auto", rows=kernels.AUTO_MAX_ROWS) == "native"
        assert kernels.resolve("native", rows=10_000) == "native"


def test_fallback_without_compiler(monkeypatch, capsys):
    """No compiler: auto runs XLA (one notice, once), native is a clear error, and a packed
    linear still computes (by XLA)."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    assert kernels.resolve("auto") == "xla"
    assert kernels.resolve("auto") == "xla"
    notice = capsys.readouterr().err
    assert notice.count("using the XLA path") == 1 and "no C++ compiler" in notice
    with pytest.raises(kernels.NativeUnavailable, match="no C\\+\\+ compiler"):
        kernels.resolve("native")
    lin = packed_linear(2, None, "2bit", 45, 24, "auto")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 45))
    np.testing.assert_array_equal(run(lin, x), run(use_kernel(lin, "xla"), x))


def test_failed_build_leaves_no_file(monkeypatch, tmp_path):
    """A compiler that fails: the error names the command and its message, the cache holds no
    library (nor a half-written one), and auto falls back."""
    cxx = tmp_path / "broken-cxx"
    cxx.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'boom: no luck' >&2\n"
                   "exit 1\n")  # fmt: skip
    cxx.chmod(0o755)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("PARETOQ_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(kernels.NativeUnavailable, match="boom: no luck"):
        kernels.resolve("native")
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert left == [".lock"], left
    assert kernels.resolve("auto") == "xla"


@native
@pytest.mark.slow
def test_build_into_a_fresh_cache(monkeypatch, tmp_path):
    """A build into an empty cache directory yields a loadable library; a second build finds
    it (same file, not rebuilt)."""
    monkeypatch.setenv("PARETOQ_KERNEL_CACHE", str(tmp_path))
    lib = kernels._build(kernels._compiler())
    assert lib.is_file() and lib.parent.parent == tmp_path
    mtime = os.stat(lib).st_mtime_ns
    assert kernels._build(kernels._compiler()) == lib and os.stat(lib).st_mtime_ns == mtime


def test_generate_cli_kernel_option(tmp_path, capsys):
    """``python -m paretoq_jax.generate --kernel`` on a packed export: xla (and native where it
    builds) print the same greedy text; an unknown name is a usage error."""
    from paretoq_jax.generate import main
    from paretoq_jax.io import load_tokenizer
    from paretoq_jax.io.packed import save_packed

    tok = load_tokenizer(Path(__file__).parent / "fixtures" / "tokenizer")
    cfg = dataclasses.replace(LlamaConfig.from_json(TINY), vocab_size=len(tok), hidden_size=32,
                              intermediate_size=48, num_hidden_layers=1, tie_word_embeddings=True)  # fmt: skip
    save_packed(Llama(cfg, quant=QuantRules.paretoq(2), rngs=nnx.Rngs(0)), tmp_path / "p",
                tokenizer=tok)  # fmt: skip
    args = ["--model", str(tmp_path / "p"), "--prompt", "the cat", "--max-new-tokens", "4"]
    texts = {}
    for k in ["xla", "native"] if kernels.native_available() else ["xla"]:
        assert main([*args, "--kernel", k]) == 0
        texts[k] = capsys.readouterr().out
    assert texts["xla"].startswith("the cat") and len(set(texts.values())) == 1
    with pytest.raises(SystemExit) as e:
        main([*args, "--kernel", "gpu"])
    assert e.value.code == 2
