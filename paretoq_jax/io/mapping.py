"""Name tables between checkpoint tensors and model parameters (one table per format).

``HF_TABLE`` pairs an HF tensor-name template with a model parameter path and a transform; the
same entry serves loading (HF -> model) and saving (model -> HF). ``GGUF_TABLE`` renames
llama.cpp tensors to HF names, so GGUF files reuse the HF table. Placeholders:

- ``{layer}``: the decoder-layer index (the parameter is stacked over layers);
- ``{proj}``: one of the seven decoder projections (``self_attn.q_proj`` ... ``mlp.down_proj``);
- ``{norm}``: ``input_layernorm`` or ``post_attention_layernorm``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

PLACEHOLDERS = {
    "layer": r"\d+",
    "proj": r"self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj",
    "norm": r"input_layernorm|post_attention_layernorm",
    "gproj": r"attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down",
    "gnorm": r"attn_norm|ffn_norm",
    "kind": r"weight|bias",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row: checkpoint name template <-> model path template (dot-separated)."""

    checkpoint: str
    model: str
    transpose: bool = False  # HF (out, in) weight <-> Flax (in, out) kernel

    def _regex(self, template: str) -> re.Pattern:
        out, pos = "", 0
        for m in re.finditer(r"\{(\w+)\}", template):
            out += re.escape(template[pos : m.start()])
            out += f"(?P<{m.group(1)}>{PLACEHOLDERS[m.group(1)]})"
            pos = m.end()
        return re.compile(out + re.escape(template[pos:]))

    def match_checkpoint(self, name: str) -> dict[str, str] | None:
        m = self._regex(self.checkpoint).fullmatch(name)
        return None if m is None else m.groupdict()

    def match_model(self, path: str) -> dict[str, str] | None:
        m = self._regex(self.model).fullmatch(path)
        return None if m is None else m.groupdict()


# HF Llama/Mistral/Qwen2 tensor names <-> paretoq_jax.models.Llama parameter paths.
HF_TABLE: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", "embed_tokens"),
    Entry("model.norm.weight", "norm.weight"),
    Entry("lm_head.weight", "lm_head.kernel", transpose=True),
    Entry("lm_head.weight_scale", "lm_head.scale"),
    Entry("model.layers.{layer}.{proj}.weight", "layers.{proj}.kernel", transpose=True),
    Entry("model.layers.{layer}.{proj}.bias", "layers.{proj}.bias"),
    Entry("model.layers.{layer}.{proj}.weight_scale", "layers.{proj}.scale"),
    Entry("model.layers.{layer}.{norm}.weight", "layers.{norm}.weight"),
)
# Buffers some HF checkpoints carry that are not parameters (recomputed by the model).
HF_IGNORED = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)

# llama.cpp GGUF tensor names -> HF names.
GGUF_PROJ = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_NORM = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GGUF_TABLE: tuple[Entry, ...] = (
    Entry("token_embd.weight", "model.embed_tokens.weight"),
    Entry("output_norm.weight", "model.norm.weight"),
    Entry("output.weight", "lm_head.weight"),
    Entry("blk.{layer}.{gproj}.{kind}", "model.layers.{layer}.{proj}.{kind}"),
    Entry("blk.{layer}.{gnorm}.weight", "model.layers.{layer}.{norm}.weight"),
)


def hf_to_model(name: str) -> tuple[str, int | None, bool] | None:
    """``(model path, layer index or None, transpose)`` for an HF tensor name, else None."""
    for entry in HF_TABLE:
        groups = entry.match_checkpoint(name)
        if groups is not None:
            layer = groups.pop("layer", None)
            return (
                entry.model.format(**groups),
                None if layer is None else int(layer),
                entry.transpose,
            )
    return None


def model_to_hf(path: str, layer: int | None = None) -> tuple[str, bool]:
    """``(HF tensor name, transpose)`` for a model parameter path (and layer index)."""
    for entry in HF_TABLE:
        groups = entry.match_model(path)
        if groups is not None:
            return entry.checkpoint.format(layer=layer, **groups), entry.transpose
    raise KeyError(f"model parameter {path!r} has no HF name in paretoq_jax.io.mapping.HF_TABLE")


def hf_tensors(path: str, value: np.ndarray, layers: int) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, HF-layout array)`` for one model parameter: stacked ``layers.*`` parameters
    are split into one tensor per layer; kernels are transposed to HF's ``(out, in)``."""
    if path.startswith("layers."):
        for i in range(layers):
            name, transpose = model_to_hf(path, i)
            yield name, np.ascontiguousarray(value[i].T if transpose else value[i])
    else:
        name, transpose = model_to_hf(path)
        yield name, np.ascontiguousarray(value.T if transpose else value)


# The name parts llama.cpp and HF spell differently: (HF group, GGUF group, GGUF -> HF spelling).
_GGUF_PARTS = (("proj", "gproj", GGUF_PROJ), ("norm", "gnorm", GGUF_NORM))


def gguf_to_hf(name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, else None."""
    return _gguf_hf(name, to_gguf=False)


def hf_to_gguf(name: str) -> str | None:
    """llama.cpp's name of an HF tensor name (``model.layers.0.mlp.up_proj.weight`` ->
    ``blk.0.ffn_up.weight``), else None."""
    return _gguf_hf(name, to_gguf=True)


def _gguf_hf(name: str, *, to_gguf: bool) -> str | None:
    """``name`` translated through ``GGUF_TABLE``, HF -> llama.cpp or llama.cpp -> HF."""
    for entry in GGUF_TABLE:
        groups = entry.match_model(name) if to_gguf else entry.match_checkpoint(name)
        if groups is None:
            continue
        for hf, gguf, gguf_to_hf_part in _GGUF_PARTS:
            if to_gguf and hf in groups:
                part = groups.pop(hf)
                groups[gguf] = next(g for g, h in gguf_to_hf_part.items() if h == part)
            elif not to_gguf and gguf in groups:
                groups[hf] = gguf_to_hf_part[groups.pop(gguf)]
        return (entry.checkpoint if to_gguf else entry.model).format(**groups)
    return None
