"""GGUF files (llama.cpp): config, dequantized weights and the tokenizer, from one file.

Tensors are dequantized with ``gguf.quants.dequantize`` one at a time (the file is memory-mapped)
and renamed to HF names by :data:`paretoq_jax.io.mapping.GGUF_TABLE`, so loading reuses
:func:`paretoq_jax.io.hf.assemble_model`. llama.cpp's converter permutes the rows of ``attn_q``
and ``attn_k`` of ``llama`` models (interleaved RoPE pairs); :func:`unpermute_qk` undoes it.
A file without ``output.weight`` has tied embeddings.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from paretoq_jax.io.hf import CheckpointError, assemble_model
from paretoq_jax.io.mapping import gguf_to_hf
from paretoq_jax.models import Llama, LlamaConfig, QuantRules

# GGUF general.architecture -> HF architecture; whether llama.cpp permuted q/k rows.
GGUF_ARCHS = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}


def _reader(path: Path):
    """A parsed GGUFReader (memory-mapped); cached, since parsing the tokenizer arrays of a
    49k-token vocabulary takes seconds and model + tokenizer loading both need it."""
    st = Path(path).stat()
    return _cached_reader(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # truncated files fail while parsing the header or tensor infos
        raise CheckpointError(
            f"cannot read GGUF file {path}: {type(e).__name__}: {e} (truncated or corrupt? "
            "re-download it)"
        ) from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute(w, n_head)`` on an HF ``(out, in)`` q/k weight (or bias):
    rows ``(head, pair, 2)`` interleaved back to HF's ``(head, 2, pair)`` half-split order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, path: Path) -> LlamaConfig:
    """A :class:`LlamaConfig` from GGUF metadata (``{arch}.block_count`` etc.)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(GGUF_ARCHS)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path}: tensor 'rope_freqs.weight' (llama.cpp's Llama-3.1 rope scaling) is not "
            "supported; load the Hugging Face checkpoint instead"
        )

    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    scaling = None
    if key("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    hf_arch, _ = GGUF_ARCHS[arch]
    has_bias = "blk.0.attn_q.bias" in names
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=has_bias,
        attention_out_bias=has_bias and hf_arch != "Qwen2ForCausalLM",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        architecture=hf_arch,
    )


class GGUFSource:
    """A GGUF file's tensors under HF names, dequantized to float32 on access."""

    def __init__(self, reader, path: Path, config: LlamaConfig, permuted: bool):
        self.path, self.config, self.permuted = path, config, permuted
        self._tensors = {}
        size = path.stat().st_size
        for t in reader.tensors:
            hf = gguf_to_hf(t.name)
            if hf is None:
                raise CheckpointError(
                    f"unexpected tensor {t.name!r} in {path}: not a parameter of a "
                    f"{config.architecture} (expected llama.cpp names like 'blk.0.attn_q.weight')"
                )
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{path} is truncated: tensor {t.name!r} runs past the end")
            self._tensors[hf] = t

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def where(self, name: str) -> str:
        return f"{self.path} (GGUF tensor {self._tensors[name].name!r})"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # ggml: ne0 first

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(self.shape(name))
        if self.permuted and (".q_proj." in name or ".k_proj." in name):
            c = self.config
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            w = unpermute_qk(w, heads)
        return w


def load_gguf(
    path: str | Path,
    *,
    quant_rules: QuantRules,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh=None,
    rules=None,
    **model_kwargs,
) -> Llama:
    """Loads a llama.cpp GGUF file (any ggml quant type ``gguf`` can dequantize)."""
    path = Path(path)
    reader = _reader(path)
    config = gguf_config(reader, path)
    source = GGUFSource(reader, path, config, GGUF_ARCHS[_field(reader, "general.architecture")][1])
    return assemble_model(
        config, source, quant_rules=quant_rules, dtype=dtype, param_dtype=param_dtype,
        mesh=mesh, rules=rules, **model_kwargs,
    )  # fmt: skip


# tokenizer.ggml.pre -> the pre-tokenizer its merges were learned with (llama.cpp's llama-vocab).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact"):  # single digits, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    splits = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}
    splits["qwen2"] = _QWEN2_SPLIT
    if pre in splits:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise CheckpointError(
        f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: gpt2, smollm, "
        "starcoder, refact, llama3/llama-bpe, qwen2"
    )


def gguf_tokenizer(path: str | Path):
    """An HF ``PreTrainedTokenizerFast`` rebuilt from a GGUF's byte-level BPE metadata
    (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` / special token ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2', used by SmolLM2, "
            "Llama 3, Qwen2) is rebuilt from GGUF: load the HF tokenizer folder instead"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"), path)
    tok.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == 3
    ]
    tok.add_special_tokens(control)

    def special(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    extra = {}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        extra["chat_template"] = template
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos"),
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        **extra,
    )
