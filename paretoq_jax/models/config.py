"""`LlamaConfig`: the shape of a Llama-family decoder, read from and written to HF `config.json`.

One dataclass covers `LlamaForCausalLM` (Llama 2/3/3.1/3.2, SmolLM/SmolLM2, MobileLLM shapes),
`MistralForCausalLM` (Llama plus an optional sliding window) and `Qwen2ForCausalLM` (biases on
q/k/v). Reads both the transformers-4 keys (`rope_theta`, `rope_scaling`) and transformers-5's
`rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# HF `architectures` entry -> HF `model_type`. Anything else is refused with a clear error.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (names follow HF `config.json`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v
    attention_out_bias: bool = (
        False  # bias on o (Llama's attention_bias sets both; Qwen2: q/k/v only)
    )
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral / Qwen2 windowed attention (None = full causal)
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: "
                f"{sorted(ARCHITECTURES)} (Llama-family decoders only)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} unsupported: only 'silu' (SwiGLU)")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} unsupported; supported: {ROPE_TYPES}"
            )

    def __hash__(self) -> int:
        # rope_scaling is a dict: hash the JSON form so graphdefs holding a config stay hashable
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """Builds a config from a parsed HF `config.json`; raises ValueError on unknown archs."""
        archs = d.get("architectures") or []
        if not archs:
            by_type = {v: k for k, v in ARCHITECTURES.items()}
            if d.get("model_type") not in by_type:
                raise ValueError(
                    f"config has no 'architectures' and model_type={d.get('model_type')!r} is "
                    f"not one of {sorted(by_type)}"
                )
            archs = [by_type[d["model_type"]]]
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} in config.json; supported: "
                f"{sorted(ARCHITECTURES)}"
            )
        rope = dict(d.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_scaling = d.get("rope_scaling") or (rope or None)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.pop("rope_theta", None)
            if rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
            if d.get("use_sliding_window"):
                raise ValueError(
                    "Qwen2 use_sliding_window=True (per-layer windows) is unsupported; "
                    "set it to false in config.json to use full causal attention"
                )
            window = None
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
            window = d.get("sliding_window")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=window,
            hidden_act=d.get("hidden_act", "silu"),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            architecture=arch,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(d)

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` dict that transformers' `from_pretrained` understands."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.architecture == "Qwen2ForCausalLM":
            d["use_sliding_window"] = False
        else:
            if self.attention_bias != self.attention_out_bias:
                raise ValueError(
                    f"{self.architecture} cannot express q/k/v bias without o bias in config.json"
                )
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
            if self.architecture == "MistralForCausalLM":
                d["sliding_window"] = self.sliding_window
        return d
