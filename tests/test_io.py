"""Loading and saving checkpoints: HF folders (sharded, bf16), GGUF files written here in
llama.cpp's layout, the tokenizer from GGUF metadata, save_pretrained round trips, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from paretoq_jax import quant
from paretoq_jax.io import (
    CheckpointError,
    load_model_config,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from paretoq_jax.io.gguf import unpermute_qk
from paretoq_jax.io.hf import SCALES_FILE
from paretoq_jax.models import LlamaConfig, QuantRules

FIXTURES = Path(__file__).parent / "fixtures"
GQA = FIXTURES / "tiny_llama_gqa"


@nnx.jit
def forward(model, ids):
    return model(ids)


def ids_and_ref(d: Path):
    return jnp.asarray(np.load(d / "input_ids.npy")), np.load(d / "logits.npy")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def copy_fixture(tmp_path: Path, name: str = "tiny_llama_gqa") -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


# --- llama.cpp's layout, written independently of the loader -----------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (HF half-split -> interleaved RoPE rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def write_gguf(src: Path, out: Path, qtype=gguf.GGMLQuantizationType.F32, drop=None) -> Path:
    """The HF fixture as a llama.cpp GGUF (q/k rows permuted; 2-D weights in ``qtype``)."""
    cfg = LlamaConfig.from_json(src)
    tensors = load_file(src / "model.safetensors")
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in sorted(tensors.items()):
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{GGUF_LAYER[mod]}.{kind}"
            if mod == "self_attn.q_proj":
                t = llama_cpp_permute(t, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                t = llama_cpp_permute(t, cfg.num_key_value_heads)
        else:
            gname = GGUF_NAMES[name]
        if gname == drop:
            continue
        t = np.ascontiguousarray(t.astype(np.float32))
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and t.shape[1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_unpermute_inverts_llama_cpp():
    w = np.random.default_rng(0).normal(size=(24, 5))
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_gguf_f32_matches_transformers(tmp_path):
    path = write_gguf(GQA, tmp_path / "tiny.gguf")
    ids, ref = ids_and_ref(GQA)
    model = load_pretrained(path)
    assert not model.config.tie_word_embeddings
    assert load_model_config(path) == model.config
    want, got = LlamaConfig.from_json(GQA), load_model_config(path)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
    ):
        assert getattr(got, key) == getattr(want, key), key  # fmt: skip
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps)  # stored as float32 in GGUF
    assert rel_err(forward(model, ids), ref) < 1e-4


def test_gguf_q8_0_dequantized_and_tied(tmp_path):
    """Q8_0 weights are dequantized with gguf.quants; no output.weight means tied embeddings."""
    path = write_gguf(GQA, tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0, "output.weight")
    model = load_pretrained(path)
    assert model.config.tie_word_embeddings and model.lm_head is None
    emb = load_file(GQA / "model.safetensors")["model.embed_tokens.weight"]
    want = gguf.quants.dequantize(
        gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    np.testing.assert_array_equal(np.asarray(model.embed_tokens[...]), want)
    assert 0 < np.abs(want - emb).max() < 0.01 * np.abs(emb).max()


def test_save_load_round_trip_keeps_scales(tmp_path):
    ids, ref = ids_and_ref(GQA)
    model = load_pretrained(GQA, bits=2)
    scale = model.layers.mlp.up_proj.scale
    scale[...] = scale[...] * 0.8  # as if trained: no longer init_scale of the kernel
    out = forward(model, ids)
    save_pretrained(model, tmp_path / "q2")
    cfg = json.loads((tmp_path / "q2" / "config.json").read_text())
    assert cfg["paretoq"]["quant_rules"] == QuantRules.paretoq(2).to_list()
    assert (tmp_path / "q2" / SCALES_FILE).exists()
    again = load_pretrained(tmp_path / "q2", bits=2)
    np.testing.assert_allclose(again.layers.mlp.up_proj.scale[...], scale[...], rtol=0)
    np.testing.assert_allclose(forward(again, ids), out, rtol=1e-6, atol=1e-6)
    # the exported weights are the quantized ones: 4 levels per output channel at 2 bits
    w = load_file(tmp_path / "q2" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    a = np.asarray(scale[1])[:, None]
    np.testing.assert_allclose(np.unique(np.round(w / a, 5)), [-0.75, -0.25, 0.25, 0.75])
    # as floats, the folder loads at 16 bits to the same logits
    np.testing.assert_allclose(forward(load_pretrained(tmp_path / "q2"), ids), out, atol=1e-5)
    assert rel_err(out, ref) > 1e-2  # 2-bit differs from float (the comparison can fail)


def test_save_float_round_trip(tmp_path):
    ids, ref = ids_and_ref(FIXTURES / "tiny_llama_qwen2")
    model = load_pretrained(FIXTURES / "tiny_llama_qwen2")
    save_pretrained(model, tmp_path / "f")
    assert not (tmp_path / "f" / SCALES_FILE).exists()
    assert rel_err(forward(load_pretrained(tmp_path / "f"), ids), ref) < 1e-4


def test_bf16_params_save_as_bf16(tmp_path):
    model = load_pretrained(FIXTURES / "tiny_llama_tied_llama3", dtype=jnp.bfloat16)
    save_pretrained(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_pretrained(tmp_path / "b", dtype=jnp.bfloat16)
    np.testing.assert_array_equal(back.embed_tokens[...], model.embed_tokens[...])


def test_scales_reinitialized_for_other_bits(tmp_path):
    model = load_pretrained(GQA, bits=2)
    save_pretrained(model, tmp_path / "q2")
    four = load_pretrained(tmp_path / "q2", bits=4)
    k = four.layers.self_attn.k_proj
    assert k.spec == quant.resolve(4)
    np.testing.assert_allclose(k.scale[...], quant.init_scale(k.kernel[...], 4), rtol=1e-6)


# --- tokenizer from GGUF metadata -----------------------------------------------------------


def test_gguf_tokenizer_byte_level_bpe(tmp_path):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", *alphabet, "Ġh", "Ġhe", "ll", "Ġhell", "Ġhello"]
    merges = ["Ġ h", "Ġh e", "l l", "Ġhe ll", "Ġhell o"]
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "tok.gguf")
    text = "a hello 42<|endoftext|>"
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == ["a", "Ġhello", "Ġ", "4", "2", "<|endoftext|>"]  # smollm: single digits
    assert tok.decode(ids) == text and tok.eos_token == "<|endoftext|>"


# --- bad input ------------------------------------------------------------------------------


def test_unknown_architecture(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_pretrained(d)


def _edit_weights(d: Path, edit) -> None:
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def test_missing_tensor(tmp_path):
    d = copy_fixture(tmp_path)
    _edit_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        load_pretrained(d)


def test_misnamed_tensor(tmp_path):
    d = copy_fixture(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_weights(d, lambda t: t.update({name.replace("q_proj", "query"): t.pop(name)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn"):
        load_pretrained(d)


def test_shape_mismatch(tmp_path):
    d = copy_fixture(tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    _edit_weights(d, lambda t: t.update({name: t[name][:, :40]}))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*\(32, 40\).*\(32, 48\)"):
        load_pretrained(d)


def test_tensor_config_disagree(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="layer 1.*num_hidden_layers=1"):
        load_pretrained(d)


def test_truncated_safetensors(tmp_path):
    d = copy_fixture(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_pretrained(d)


def test_truncated_gguf(tmp_path):
    path = write_gguf(GQA, tmp_path / "t.gguf")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"t\.gguf"):
        load_pretrained(path)


def test_no_weights_and_no_pickles(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no \\*.safetensors.*never pickled"):
        load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_pretrained(tmp_path / "nowhere")


def test_quant_rules_passed_as_sharding_rules():
    with pytest.raises(TypeError, match="quant_rules="):
        load_pretrained(GQA, rules=QuantRules.paretoq(2))
