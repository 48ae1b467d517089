"""Checkpoints from and to the outside world: HF safetensors folders, GGUF files, hub ids.

Public API: :func:`load_pretrained`, :func:`save_pretrained`, :func:`load_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh

from paretoq_jax.io.gguf import _reader, gguf_config, gguf_tokenizer, load_gguf
from paretoq_jax.io.hf import CheckpointError, load_hf, save_hf
from paretoq_jax.models import Llama, LlamaConfig, QuantRules, resolve_rules
from paretoq_jax.sharding import ShardingRules

__all__ = [
    "CheckpointError",
    "load_model_config",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


def _resolve(path: str | Path) -> Path:
    """A local folder or .gguf file; a hub id (``org/name``) is downloaded when a hub is reachable."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
        except Exception as e:
            raise FileNotFoundError(
                f"{s!r} is not a local path and downloading it from the Hugging Face hub failed "
                f"({type(e).__name__}: {e}); pass a local folder or .gguf file"
            ) from None
    raise FileNotFoundError(f"no checkpoint at {s!r} (expected an HF folder or a .gguf file)")


def load_pretrained(
    path: str | Path,
    bits: float | int | str = 16,
    method: str | None = None,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    quant_rules: QuantRules | None = None,
    *,
    param_dtype=None,
    remat: bool = False,
    scan_layers: bool = True,
    scale_init: str = "paretoq",
) -> Llama:
    """Loads a Llama-family model from an HF folder, a ``.gguf`` file or a hub id.

    ``bits``/``method`` set ParetoQ's rule (every decoder projection quantized; 16 = float);
    ``quant_rules`` overrides it. ``dtype`` is the compute dtype (parameters are stored in
    ``param_dtype``, default ``dtype``). With ``mesh``, parameters are placed sharded by the
    logical-axis ``rules`` (default ``paretoq_jax.sharding.DEFAULT_SHARDING_RULES``) as they are read.
    ``scale_init``: how learned scales start (``paretoq`` or ``mse``) unless the checkpoint
    holds scales for the same quantizer.
    """
    if isinstance(rules, QuantRules):
        raise TypeError(
            "load_pretrained(rules=...) is the sharding table (logical axis -> mesh axis); "
            "pass quantization rules as quant_rules=QuantRules(...)"
        )
    p = _resolve(path)
    kwargs = dict(
        quant_rules=resolve_rules(bits, method, quant_rules),
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
        mesh=mesh,
        rules=rules,
        remat=remat,
        scan_layers=scan_layers,
        scale_init=scale_init,
    )
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf(p, **kwargs)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face model folder")
        return load_hf(p, **kwargs)
    raise CheckpointError(f"{p}: expected an HF model folder or a .gguf file")


def load_model_config(path: str | Path) -> LlamaConfig:
    """The :class:`LlamaConfig` of an HF folder (``config.json``) or a ``.gguf`` file's metadata,
    without reading any weights."""
    p = _resolve(path)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_config(_reader(p), p)
    return LlamaConfig.from_json(p)


def save_pretrained(model: Llama, out_dir: str | Path, tokenizer=None, dtype=None) -> Path:
    """Writes an HF folder (config.json, model.safetensors with the quantized weights as floats,
    learned scales, tokenizer files) that ``transformers.LlamaForCausalLM`` loads."""
    return save_hf(model, out_dir, tokenizer=tokenizer, dtype=dtype)


def load_tokenizer(path: str | Path):
    """The HF ``PreTrainedTokenizerFast`` of an HF folder, or rebuilt from a GGUF's metadata."""
    p = _resolve(path)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_tokenizer(p)
    from transformers import AutoTokenizer

    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json) in {p}")
    return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
