"""Export of QAT models: packed codes (bit-identical reload, documented unpacker, size vs
theory), GGUF (tensor types, dequantized weights, reload through io's GGUF loader), HF, the CLI
on a real training run, and the errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.export import ExportError, export_model, load_run
from paretoq_jax.export.__main__ import main as export_main
from paretoq_jax.export.reference_unpack import unpack_export
from paretoq_jax.io import load_pretrained, load_tokenizer
from paretoq_jax.io.packed import is_packed_export, load_packed, save_packed
from paretoq_jax.models import Llama, LlamaConfig, QuantRules

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny-llama"
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def make_model(bits, method=None, seed=0, **kw) -> Llama:
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                tie_word_embeddings=False)  # fmt: skip
    cfg = dataclasses.replace(LlamaConfig.from_json(TINY), **{**base, **kw})
    return Llama(cfg, quant=QuantRules.paretoq(bits, method), rngs=nnx.Rngs(seed))


@jax.jit
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def logits(model, ids=None):
    if ids is None:
        ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 11))
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids, jnp.int32)))


def fake_quant_weights(model) -> dict[str, np.ndarray]:
    """HF name -> the fake-quant forward's weight (HF layout (out, in)), one layer at a time."""
    fq = jax.jit(quant.fake_quant, static_argnums=2)
    out = {}
    for proj in PROJ:
        lin = model.layers
        for part in proj.split("."):
            lin = getattr(lin, part)
        for i in range(model.config.num_hidden_layers):
            scale = None if lin.scale is None else lin.scale[i]
            w = np.asarray(fq(lin.kernel[i], scale, lin.spec))
            out[f"model.layers.{i}.{proj}.weight"] = w.T
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


CASES = [(1, None, "2bit"), (1.58, None, "2bit"), (1.58, None, "base3"), (2, None, "2bit"),
         (3, None, "2bit"), (4, None, "2bit"), (2, "absmean", "2bit")]  # fmt: skip


@pytest.mark.parametrize("bits,method,ternary", CASES)
def test_packed_export_reloads_to_identical_logits(bits, method, ternary, tmp_path, tokenizer):
    model = make_model(bits, method)
    out = export_model(model, "packed", tmp_path / "pk", tokenizer=tokenizer, ternary=ternary)
    assert is_packed_export(out) and (out / "tokenizer.json").exists()
    ref = logits(model)
    loaded = load_packed(out)
    np.testing.assert_array_equal(logits(loaded), ref)  # dequantize-on-load: bit-identical
    # the documented numpy unpacker gives exactly the fake-quant weights
    unpacked = unpack_export(out)
    for name, w in fake_quant_weights(model).items():
        np.testing.assert_array_equal(unpacked[name], w, err_msg=name)
    np.testing.assert_array_equal(unpacked["lm_head.weight"], np.asarray(model.lm_head.kernel).T)
    if ternary == "base3":  # straight from the packed codes (all bit-widths: test_packed_model)
        got = logits(load_packed(out, mode="packed"))
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5


def test_packed_metadata(tmp_path):
    model = make_model(3, tie_word_embeddings=True)
    out = save_packed(model, tmp_path / "pk")
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc["format"] == "paretoq-packed" and qc["layout_version"] == quant.LAYOUT_VERSION
    assert qc["quant_rules"] == model.rules.to_list() and qc["float_dtype"] == "float32"
    e = qc["weights"]["model.layers.1.mlp.down_proj"]
    assert (e["bits"], e["method"], e["in_features"], e["out_features"]) == (3, "lsq", 96, 64)
    assert e["packed_shape"] == [3, 12, 64]
    from safetensors import safe_open

    f = safe_open(str(out / "model.safetensors"), framework="numpy")
    assert json.loads(f.metadata()["quant_config"]) == qc
    names = set(f.keys())
    assert "lm_head.weight" not in names  # tied
    assert f.get_tensor("model.layers.1.mlp.down_proj.weight_packed").dtype == np.uint8
    assert f.get_tensor("model.layers.1.mlp.down_proj.weight_scale").dtype == np.float32
    assert "model.layers.0.mlp.down_proj.weight" not in names


def _theory_bytes(model, ternary: str) -> tuple[int, int]:
    """(bytes of the codes at their nominal bit-width, bytes of everything else)."""
    codes = other = 0
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[-1] == "kernel" and p[0] == "layers":
            spec = model.rules.spec_for(f"layers.0.{'.'.join(map(str, p[1:-1]))}")
            codes += v.size * quant.pack_format(spec.bits, ternary).bits_per_code / 8
        else:
            other += v.size * v.dtype.itemsize  # float parts and the f32 scales
    return int(codes), other


@pytest.mark.parametrize("bits,ternary", [(1, "2bit"), (1.58, "2bit"), (1.58, "base3"),
                                          (2, "2bit"), (3, "2bit"), (4, "2bit")])  # fmt: skip
def test_packed_size_within_3_percent_of_theory(bits, ternary, tmp_path):
    model = make_model(bits, hidden_size=256, intermediate_size=768, head_dim=64,
                       tie_word_embeddings=True)  # fmt: skip
    out = save_packed(model, tmp_path / "pk", ternary=ternary)
    codes, other = _theory_bytes(model, ternary)
    size = (out / "model.safetensors").stat().st_size
    assert abs(size / (codes + other) - 1) < 0.03, (size, codes, other)
    from safetensors import safe_open

    f = safe_open(str(out / "model.safetensors"), framework="numpy")
    packed = sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith(".weight_packed"))
    assert abs(packed / codes - 1) < 0.03, (packed, codes)


GGUF_CASES = [(1, None, "TQ2_0"), (1.58, None, "TQ2_0"), (1.58, "TQ1_0", "TQ1_0"),
              (2, None, "Q2_K"), (2, "Q4_0", "Q4_0"), (3, None, "Q4_0"), (4, None, "Q4_0")]  # fmt: skip


@pytest.mark.parametrize("bits,qtype,expect", GGUF_CASES)
def test_gguf_tensors_dequantize_to_qat_weights(bits, qtype, expect, tmp_path, tokenizer):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from paretoq_jax.io.gguf import unpermute_qk

    model = make_model(bits, hidden_size=256, intermediate_size=512, head_dim=64,
                       num_hidden_layers=1)  # fmt: skip
    path = export_model(model, "gguf", tmp_path / "m.gguf", tokenizer=tokenizer, gguf_qtype=qtype)
    r = GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items()}
    c = model.config
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 1
    assert f["llama.embedding_length"] == 256 and f["llama.feed_forward_length"] == 512
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.context_length"] == c.max_position_embeddings
    assert f["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == c.vocab_size and f["tokenizer.ggml.merges"]
    assert f["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "F32" and types["output.weight"] == "F32"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    ref = fake_quant_weights(model)
    gproj = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
    for t in r.tensors:
        g = t.name.split(".")
        if len(g) < 3 or g[2] not in gproj:
            continue
        assert t.tensor_type.name == expect, t.name
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(t.shape[::-1])
        if g[2] in ("attn_q", "attn_k"):
            w = unpermute_qk(w, 4 if g[2] == "attn_q" else 2)
        want = ref[f"model.layers.0.{gproj[g[2]]}.weight"]
        # exact up to the fp16 rounding of the block scale: |err| <= 2^-11 |w| per element
        np.testing.assert_allclose(w, want, rtol=2**-11, atol=1e-7, err_msg=t.name)


def test_gguf_reloads_through_io_with_close_logits(tmp_path, tokenizer):
    model = make_model(2, hidden_size=256, intermediate_size=512, head_dim=64)
    path = export_model(model, "gguf", tmp_path / "m.gguf", tokenizer=tokenizer)
    loaded = load_pretrained(path)
    ref, got = logits(model), logits(loaded)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 2e-3
    tok = load_tokenizer(path)
    text = "To be, or not to be: that is the question."
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_gguf_falls_back_when_blocks_do_not_divide(tmp_path, tokenizer):
    from gguf import GGUFReader

    model = make_model(1.58, num_hidden_layers=1)  # in = 64 and 96: no 256-blocks
    path = export_model(model, "gguf", tmp_path / "m.gguf", tokenizer=tokenizer)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.ffn_down.weight"] == "Q4_0"


def test_errors(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="not quantized"):
        export_model(make_model(16), "packed", tmp_path / "a", tokenizer=tokenizer)
    model = make_model(2)
    with pytest.raises(ExportError, match="unknown export format 'zip'"):
        export_model(model, "zip", tmp_path / "a")
    broken = make_model(2)
    broken.layers.mlp.up_proj.scale = None
    with pytest.raises(ExportError, match="missing scales"):
        export_model(broken, "gguf", tmp_path / "a.gguf", tokenizer=tokenizer)
    # a file that is not an earlier export is kept, even with force
    out = tmp_path / "m.gguf"
    out.write_text("precious")
    for force in (False, True):
        with pytest.raises(ExportError, match="not an output of paretoq_jax"):
            export_model(model, "gguf", out, tokenizer=tokenizer, force=force)
    assert out.read_text() == "precious"
    # an earlier export is kept without force; a failed export leaves it as it was
    mine = tmp_path / "mine.gguf"
    export_model(model, "gguf", mine, tokenizer=tokenizer)
    before = mine.read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, "gguf", mine, tokenizer=tokenizer)
    with pytest.raises(ExportError, match="unknown GGUF qtype"):
        export_model(model, "gguf", mine, tokenizer=tokenizer, gguf_qtype="Q9_9", force=True)
    with pytest.raises(ValueError, match="needs the tokenizer"):  # fails mid-export
        export_model(model, "gguf", mine, tokenizer=None, force=True)
    assert mine.read_bytes() == before
    export_model(model, "gguf", mine, tokenizer=tokenizer, force=True, gguf_qtype="Q8_0")
    assert mine.read_bytes()[:4] == b"GGUF" and mine.read_bytes() != before
    mine.unlink()

    class Broken:  # fails after model.safetensors is written
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_model(model, "packed", tmp_path / "new", tokenizer=Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    with pytest.raises(ExportError, match="config.yaml"):
        load_run(tmp_path)
    with pytest.raises(Exception, match="quant_config.json"):
        load_packed(tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real QAT run: configs/tiny.yaml (2 bits, SEQ) for 2 steps."""
    from paretoq_jax.config import load_config
    from paretoq_jax.train import RunConfig, train

    tmp = tmp_path_factory.mktemp("run")
    cfg = load_config(
        RunConfig,
        ROOT / "configs" / "tiny.yaml",
        [f"run_dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}", "train.steps=2",
         "checkpoint.every=2", f"model.path={TINY}", f"data.path={ROOT / 'tests/fixtures/corpus'}"],
    )  # fmt: skip
    train(cfg, progress=False)
    return Path(cfg.run_dir)


def test_cli_on_a_training_run(run_dir, tmp_path, capsys):
    model, tok, _, step = load_run(run_dir)
    assert step == 2
    ref = logits(model)
    out = tmp_path / "packed"
    assert export_main(["--checkpoint", str(run_dir), "--format", "packed", "--out", str(out)]) == 0
    np.testing.assert_array_equal(logits(load_packed(out)), ref)
    before = (out / "model.safetensors").stat().st_mtime_ns
    args = ["--checkpoint", str(run_dir), "--format", "packed", "--out", str(out)]
    assert export_main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    bad = ["--checkpoint", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")]
    assert export_main(bad) == 2 and "unknown export format" in capsys.readouterr().err
    # hf: the fake-quantized floats, reloaded as a float model, give the same logits
    hf = export_model(model, "hf", tmp_path / "hf", tokenizer=tok)
    np.testing.assert_allclose(logits(load_pretrained(hf)), ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_hf_export_runs_in_transformers(tmp_path, tokenizer):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = make_model(1.58, seed=4)
    out = export_model(model, "hf", tmp_path / "hf", tokenizer=tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        got = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, logits(model, ids), rtol=0, atol=1e-4)


def test_qwen2_packed_and_gguf(tmp_path, tokenizer):
    """Qwen2: q/k/v biases, arch 'qwen2' (no q/k permutation), F16 fallback for in=48."""
    from gguf import GGUFReader

    cfg = dataclasses.replace(
        LlamaConfig.from_json(ROOT / "tests/fixtures/tiny_llama_qwen2"), vocab_size=512
    )
    model = Llama(cfg, quant=QuantRules.paretoq(3), rngs=nnx.Rngs(2))
    for lin in (model.layers.self_attn.q_proj, model.layers.self_attn.k_proj):
        lin.bias[...] = jax.random.normal(jax.random.PRNGKey(5), lin.bias.shape) * 0.1
    ref = logits(model)
    out = export_model(model, "packed", tmp_path / "pk", tokenizer=tokenizer)
    np.testing.assert_array_equal(logits(load_packed(out)), ref)
    path = export_model(model, "gguf", tmp_path / "q.gguf", tokenizer=tokenizer)
    r = GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "qwen2"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.bias"] == "F32" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # in = 48: no exact block size
    got = logits(load_pretrained(path))
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 2e-3


def test_gguf_llama3_rope_freqs(tmp_path, tokenizer):
    """Llama-3.1 rope scaling is written as llama.cpp's rope_freqs (unscaled / scaled freqs)."""
    from gguf import GGUFReader

    from paretoq_jax.models.layers import rope_inv_freq

    cfg = dataclasses.replace(
        LlamaConfig.from_json(ROOT / "tests/fixtures/tiny_llama_tied_llama3"), vocab_size=512
    )
    assert cfg.rope_type == "llama3"
    model = Llama(cfg, quant=QuantRules.paretoq(4), rngs=nnx.Rngs(0))
    path = export_model(model, "gguf", tmp_path / "l3.gguf", tokenizer=tokenizer)
    t = {t.name: t for t in GGUFReader(str(path)).tensors}
    assert "output.weight" not in t  # tied
    d = cfg.head_dim
    base = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    np.testing.assert_allclose(1.0 / np.asarray(t["rope_freqs.weight"].data),
                               rope_inv_freq(cfg) / base, rtol=1e-5)  # fmt: skip


def test_packed_int8_embedding_round_trip(tmp_path, tokenizer):
    """``embed="int8"``: per-row absmax int8 codes; packed mode keeps them int8, dequantize
    mode holds exactly their float values, and both give the same logits."""
    from paretoq_jax.models.packed import Int8Embedding

    model = make_model(2, tie_word_embeddings=True)  # the table is also the LM head
    path = export_model(model, "packed", tmp_path / "p", tokenizer=tokenizer, packed_embed="int8")
    qc = json.loads((path / "quant_config.json").read_text())
    assert qc["embed"]["type"] == "int8"
    packed = load_packed(path, mode="packed")
    floats = load_packed(path, mode="dequantize")
    assert isinstance(packed.embed_tokens, Int8Embedding)
    assert packed.embed_tokens.codes().dtype == jnp.int8
    w = np.asarray(packed.embed_tokens.weight())
    np.testing.assert_array_equal(np.asarray(floats.embed_tokens[...]), w)
    np.testing.assert_array_equal(unpack_export(path)["model.embed_tokens.weight"], w)
    # every entry within half a step of its row's scale of the original table
    e = np.asarray(model.embed_tokens[...])
    step = np.abs(e).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(w - e) <= 0.5 * step + 1e-7)
    ref, got, deq = logits(model), logits(packed), logits(floats)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, deq, rtol=0, atol=1e-4 * scale)
    assert 0 < np.abs(got - ref).max() < 2e-2 * scale  # an 8-bit table: small, not zero
    with pytest.raises(ExportError, match="packed_embed"):
        export_model(model, "packed", tmp_path / "q", tokenizer=tokenizer, packed_embed="int4")


def test_gguf_q8_0_token_embd_reads_back(tmp_path, tokenizer):
    """``float_type="q8_0"``: token_embd / output stored as Q8_0, read back by our reader within
    half a Q8_0 step of the float table (llama.cpp: tests/test_export_llamacpp.py)."""
    from gguf import GGUFReader

    model = make_model(2, hidden_size=256, intermediate_size=512, head_dim=64)
    path = export_model(model, "gguf", tmp_path / "m.gguf", tokenizer=tokenizer,
                        float_type="q8_0")  # fmt: skip
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"
    loaded = load_pretrained(path)
    e, w = np.asarray(model.embed_tokens[...]), np.asarray(loaded.embed_tokens[...])
    blocks = np.abs(e.reshape(e.shape[0], -1, 32)).max(-1, keepdims=True) / 127
    err = np.abs((w - e).reshape(blocks.shape[0], -1, 32))
    # half a step, plus the fp16 rounding of the block scale times |q| <= 127 (2^-11 relative)
    assert np.all(err <= (0.5 + 127 * 2.0**-11) * blocks + 1e-7)
    ref, got = logits(model), logits(loaded)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 2e-2
