"""Write a whole QAT model as a llama.cpp GGUF file (``gguf.GGUFWriter``).

Quantized projections are stored in ggml block formats that hold ParetoQ's codes exactly
(:func:`paretoq_jax.io.gguf_quants.encode_tensor`; defaults: 1 and 1.58 bits TQ2_0, 2 bits Q2_K,
3 and 4 bits Q4_0, falling back to Q4_0/Q8_0 when 256 does not divide ``in``, F16 when 32 does
not either), so ``gguf.quants.dequantize`` gives back the QAT weights up to the fp16 rounding of
the block scales. Embeddings and a float ``lm_head`` are F32 (or F16), norms F32.

Names are llama.cpp's (``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``, ``output``): the
inverse of :data:`paretoq_jax.io.mapping.GGUF_TABLE`. As llama.cpp's ``convert_hf_to_gguf.py``
does for ``llama``, the rows of ``attn_q`` / ``attn_k`` are permuted from HF's half-split RoPE
order to interleaved pairs (:func:`permute_qk`, the inverse of ``io.gguf.unpermute_qk``).
Tokenizer metadata (``gpt2`` byte-level BPE: tokens, merges, token types, special ids,
pre-tokenizer name, chat template) comes from the HF tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from flax import nnx
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from paretoq_jax.io.gguf_quants import DEFAULT_QTYPE, encode_tensor
from paretoq_jax.io.mapping import hf_to_gguf, model_to_hf
from paretoq_jax.io.packed import quantized_weights
from paretoq_jax.models import Llama
from paretoq_jax.models.layers import rope_inv_freq
from paretoq_jax.models.packed import linear_codes
from paretoq_jax.outputs import GGUF_KIND_KEY

__all__ = ["GGUF_ARCH", "QTYPE_NAMES", "hf_to_gguf_name", "permute_qk", "write_gguf"]

Q = GGMLQuantizationType
# HF architecture -> (GGUF general.architecture, whether q/k rows are permuted).
GGUF_ARCH = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
QTYPE_NAMES = {q.name: q for q in (Q.TQ1_0, Q.TQ2_0, Q.Q2_K, Q.Q4_0, Q.Q8_0)}
# Types of the embedding table and a float lm_head: "q8_0" is llama.cpp's 8-bit block format
# (32 weights share one fp16 scale, absmax rounding): 4x fewer bytes than f32 for the tied
# embedding / LM head that decoding reads once per token.
FLOAT_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
_FILE_TYPE = {
    Q.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
    Q.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0,
    Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def hf_to_gguf_name(hf_name: str) -> str:
    """llama.cpp's name of an HF tensor (``model.layers.0.mlp.up_proj.weight`` ->
    ``blk.0.ffn_up.weight``), by inverting ``GGUF_TABLE`` (``io.mapping.hf_to_gguf``)."""
    name = hf_to_gguf(hf_name)
    if name is not None:
        return name
    raise KeyError(f"HF tensor {hf_name!r} has no llama.cpp name in io.mapping.GGUF_TABLE")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute``: rows of an ``(out, ...)`` q/k weight (or bias, or a per-row
    scale) from HF's ``(head, 2, pair)`` half-split order to interleaved ``(head, pair, 2)``."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pick_qtype(bits: float, n_in: int, qtype: Q | None) -> Q | None:
    """The requested qtype when its block divides ``n_in``; else ``None`` (encode_tensor's
    default with its exact fallbacks), or F16 when no exact block size divides ``n_in``."""
    if qtype is not None and n_in % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    if n_in % 32:
        return Q.F16
    return None


def _pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the HF pre-tokenizer (those ``io.gguf`` reads)."""
    pre = tok_json.get("pre_tokenizer") or {}
    kind = pre.get("type")
    if kind == "ByteLevel":
        return "gpt-2"  # llama.cpp spells it with a hyphen (llama-vocab.cpp)
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        types = [p.get("type") for p in parts]
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
        if types[:1] == ["Split"]:
            regex = json.dumps(parts[0].get("pattern", {}))
            return "qwen2" if r"\\p{N}|" in regex or r"\\p{N}| ?" in regex else "llama-bpe"
    raise ValueError(
        f"cannot name the pre-tokenizer {json.dumps(pre)[:200]} for llama.cpp: supported are "
        "GPT-2 byte-level, SmolLM (digits + byte-level), Llama 3 and Qwen2 splits"
    )


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """``tokenizer.ggml.*`` metadata of a byte-level BPE HF tokenizer (``PreTrainedTokenizerFast``),
    laid out as llama.cpp's converter does (ids past the tokenizer padded as ``[PAD{i}]``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers-backed) HF tokenizer")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(
            f"GGUF export supports byte-level BPE tokenizers (gpt2), got {model.get('type')!r}"
        )
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    by_id = {i: s for s, i in vocab.items()}
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(bos is not None and ids and ids[0] == bos))
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


def _add_hparams(writer: gguf.GGUFWriter, model: Llama) -> None:
    c = model.config
    if c.sliding_window is not None:
        raise ValueError(
            f"sliding_window={c.sliding_window}: llama.cpp's {GGUF_ARCH[c.architecture][0]} "
            "graph has no sliding-window attention; export --format hf or packed instead"
        )
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(c.rope_scaling["factor"]))


def _rope_freqs(model: Llama) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` for Llama-3.1 scaling: the factor each inverse frequency is
    divided by (what its converter computes), i.e. unscaled / scaled inverse frequencies."""
    c = model.config
    if c.rope_type != "llama3":
        return None
    d = c.head_dim
    base = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    return (base / rope_inv_freq(c)).astype(np.float32)


def write_gguf(
    model: Llama,
    path: str | Path,
    *,
    tokenizer: Any = None,
    qtype: str | Q | None = None,
    float_type: str = "f32",
    name: str | None = None,
    output_kind: str = "export-gguf",
) -> dict[str, str]:
    """Write ``model`` as a GGUF file at ``path`` that llama.cpp runs.

    Args:
      model: a quantized :class:`Llama` (fake-quant QAT model).
      tokenizer: the HF tokenizer (byte-level BPE); required by llama.cpp to run the file.
      qtype: block format for the quantized projections (``"TQ1_0"``, ``"TQ2_0"``, ``"Q2_K"``,
        ``"Q4_0"``, ``"Q8_0"``); default per bit-width (see the module docstring). Tensors whose
        ``in`` is not a multiple of its block get the exact fallback.
      float_type: ``"f32"``, ``"f16"`` or ``"q8_0"`` (8-bit blocks of 32 with an fp16 scale)
        for the embeddings and a float ``lm_head``.
      name: ``general.name``.
      output_kind: stored under ``paretoq_jax.output`` (llama.cpp ignores it), so that a later
        export may recognise, and with ``--force`` replace, this file (:mod:`paretoq_jax.outputs`).

    Returns:
      ``{gguf tensor name: ggml type name}``.
    """
    c = model.config
    if c.architecture not in GGUF_ARCH:
        raise ValueError(f"no GGUF architecture for {c.architecture}")
    arch, permuted = GGUF_ARCH[c.architecture]
    if isinstance(qtype, str):
        if qtype.upper() not in QTYPE_NAMES:
            raise ValueError(f"unknown GGUF qtype {qtype!r}: choose one of {sorted(QTYPE_NAMES)}")
        qtype = QTYPE_NAMES[qtype.upper()]
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type={float_type!r}: choose one of {sorted(FLOAT_TYPES)}")
    ftype = FLOAT_TYPES[float_type]
    linears = quantized_weights(model)
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (llama.cpp reads it from the file)")

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or f"paretoq-{arch}")
    writer.add_string(GGUF_KIND_KEY, output_kind)
    _add_hparams(writer, model)
    add_tokenizer(writer, tokenizer, c.vocab_size)
    layers = c.num_hidden_layers
    types: dict[str, str] = {}

    def heads_of(hf_name: str) -> int | None:
        if not permuted:
            return None
        if ".q_proj." in hf_name:
            return c.num_attention_heads
        if ".k_proj." in hf_name:
            return c.num_key_value_heads
        return None

    def add(hf_name: str, data: np.ndarray, dtype: Q) -> None:
        gname = hf_to_gguf_name(hf_name)
        if dtype in (Q.F32, Q.F16):
            writer.add_tensor(
                gname,
                np.ascontiguousarray(data.astype(np.float32 if dtype == Q.F32 else np.float16)),
            )
        elif data.dtype.kind == "f":  # a float matrix stored in a block format (q8_0)
            if data.shape[-1] % 32:
                raise ValueError(
                    f"{hf_name}: {dtype.name} needs rows of a multiple of 32 values, got "
                    f"{data.shape[-1]}; use float_type='f16'"
                )
            q = gguf.quants.quantize(np.ascontiguousarray(data, np.float32), dtype)
            writer.add_tensor(gname, q, raw_dtype=dtype)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(data), raw_dtype=dtype)
        types[gname] = dtype.name

    freqs = _rope_freqs(model)
    if freqs is not None:
        writer.add_tensor("rope_freqs.weight", freqs)
        types["rope_freqs.weight"] = Q.F32.name

    chosen: list[Q] = []
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path_ = ".".join(map(str, p))
        module, _, leaf = path_.rpartition(".")
        stacked = path_.startswith("layers.")
        if module in linears and leaf == "scale":
            continue
        if module in linears and leaf == "kernel":
            lin = linears[module]
            codes, scale = (np.asarray(jax.device_get(x)) for x in linear_codes(lin))
            for i in range(layers) if stacked else [None]:
                hf_name = model_to_hf(path_, i)[0]
                k = codes[i] if stacked else codes
                a = scale[i] if stacked else scale
                heads = heads_of(hf_name)
                if heads is not None:  # permute output channels: columns of (in, out) codes
                    perm = permute_qk(np.arange(k.shape[1]), heads)
                    k, a = k[:, perm], a[perm]
                want = _pick_qtype(lin.spec.bits, k.shape[0], qtype)
                data, got = encode_tensor(k, a, lin.spec.bits, want, method=lin.spec.method)
                chosen.append(got)
                add(hf_name, data, got)
            continue
        value = np.asarray(jax.device_get(var[...]), np.float32)
        is_norm = leaf == "weight" and ("norm" in module or module == "norm")
        for i in range(layers) if stacked else [None]:
            hf_name, transpose = model_to_hf(path_, i)
            v = value[i] if stacked else value
            v = v.T if transpose else v
            heads = heads_of(hf_name)
            if heads is not None:
                v = permute_qk(v, heads)
            one_d = v.ndim == 1
            add(hf_name, v, Q.F32 if (is_norm or one_d) else ftype)

    if chosen:
        most = max(set(chosen), key=chosen.count)
        if most in _FILE_TYPE:
            writer.add_file_type(_FILE_TYPE[most])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


DEFAULT_QTYPES = {str(b): q.name for b, q in DEFAULT_QTYPE.items()}
