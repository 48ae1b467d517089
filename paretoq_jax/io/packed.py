"""The packed export format: quantized weights as integer codes at their real bit-width.

A packed export is a folder (spec: ``docs/export.md``)::

    config.json          the HF config of the model
    quant_config.json    format, layout version, quant rules, one entry per quantized weight
    model.safetensors    NAME.weight_packed (uint8 codes, quant.pack layout) and
                         NAME.weight_scale (float32 effective scale, one per output channel)
                         for quantized linears; everything else (embeddings, norms, float
                         lm_head, biases) as HF-named float tensors in their dtype
    tokenizer files      when a tokenizer was given

``NAME`` is the HF module name (``model.layers.3.self_attn.q_proj``). The codes ``k`` of the
Flax kernel ``(in, out)`` (the transposed HF weight) are packed along ``in`` by
:func:`paretoq_jax.quant.pack` into ``(P, R, out)``; the weight is ``W = a * (k + z) / n``
(quantizers.md, codes table) with ``a`` the stored scale and ``n``, ``z`` from
``quant.resolve(bits, method)``, which the entry names.

:func:`save_packed` writes one; :func:`load_packed` reads it back either as a float model holding
exactly the fake-quantized weights (``mode="dequantize"``: bit-identical logits) or as a model
whose quantized linears compute from the packed codes (``mode="packed"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.io.hf import CheckpointError
from paretoq_jax.io.mapping import hf_tensors, model_to_hf
from paretoq_jax.models import Llama, LlamaConfig, QuantLinear, QuantRules
from paretoq_jax.models.linears import named, quant_linears
from paretoq_jax.models.packed import (
    EMBED_TYPES,
    Int8Embedding,
    PackedLinear,
    linear_codes,
    set_module,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "QUANT_CONFIG",
    "WEIGHTS_FILE",
    "is_packed_export",
    "load_packed",
    "quantized_weights",
    "save_packed",
]

FORMAT = "paretoq-packed"
FORMAT_VERSION = 1
QUANT_CONFIG = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"
PACKED_SUFFIX = ".weight_packed"
INT8_SUFFIX = ".weight_int8"
EMBED_NAME = "model.embed_tokens"
SCALE_SUFFIX = ".weight_scale"
MODES = ("dequantize", "packed")


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _dtype_name(dt: np.dtype) -> str:
    return "bfloat16" if dt == ml_dtypes.bfloat16 else str(dt)


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def quantized_weights(model: Llama) -> dict[str, QuantLinear]:
    """``{module path: QuantLinear}`` of the quantized linears, checked for export.

    Raises ``ValueError`` when there are none (a float checkpoint) or when a learned-scale
    quantizer has no scale or a non-finite one.
    """
    found = named(quant_linears(model))
    if not found:
        raise ValueError(
            "the checkpoint is not quantized (bits 16/32, no quantization rules): there are no "
            "integer codes to export; train with model.bits in {1, 1.58, 2, 3, 4}, or save the "
            "float model with paretoq_jax.io.save_pretrained"
        )
    for path, lin in found.items():
        if lin.spec.learned:
            if lin.scale is None:
                raise ValueError(
                    f"{path}: {lin.spec.method} at {lin.spec.bits} bits needs a learned scale, but "
                    "the checkpoint has none (missing scales): export a QAT checkpoint that was "
                    "trained with these quantization rules"
                )
            s = _np(lin.scale[...])
            if not np.all(np.isfinite(s)):
                raise ValueError(f"{path}: the learned scale has non-finite entries")
    return found


def _entry(path: str, layer: int | None, lin: QuantLinear, ternary: str) -> tuple[str, dict]:
    hf_name = model_to_hf(f"{path}.kernel", layer)[0].removesuffix(".weight")
    spec = lin.spec
    fmt = quant.pack_format(spec.bits, ternary)
    shape = (lin.in_features, lin.out_features)
    return hf_name, {
        "module": path if layer is None else f"{path} [layer {layer}]",
        "bits": spec.bits,
        "method": spec.method,
        "n": spec.n,
        "z": spec.z,
        "qmin": spec.qmin,
        "qmax": spec.qmax,
        "in_features": lin.in_features,
        "out_features": lin.out_features,
        "packed_shape": list(quant.packed_shape(shape, spec.bits, ternary=ternary)),
        "pack_format": fmt.name,
        "bits_per_code": fmt.bits_per_code,
    }


def save_packed(
    model: Llama,
    out_dir: str | Path,
    *,
    tokenizer=None,
    ternary: str = "2bit",
    float_dtype=None,
    embed: str = "float",
) -> Path:
    """Write ``model``'s packed export into ``out_dir`` (created; files in it are replaced).

    Args:
      model: a quantized :class:`Llama` (fake-quant QAT model).
      tokenizer: an HF tokenizer to save alongside (``save_pretrained``).
      ternary: 1.58-bit layout, ``"2bit"`` or ``"base3"`` (1.6 bits a code).
      float_dtype: dtype of the float parts (default: as stored in the model).
      embed: ``"float"`` (the token embedding as a float tensor, default) or ``"int8"``
        (per-row absmax int8 codes and a float32 scale per row,
        :class:`~paretoq_jax.models.packed.Int8Embedding`; with tied embeddings also the LM
        head, which decoding reads whole every step).
    """
    from safetensors.numpy import save_file

    if ternary not in ("2bit", "base3"):
        raise ValueError(f"ternary={ternary!r}: choose '2bit' or 'base3'")
    if embed not in EMBED_TYPES:
        raise ValueError(f"embed={embed!r}: choose one of {EMBED_TYPES}")
    linears = quantized_weights(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = model.config.num_hidden_layers
    tensors: dict[str, np.ndarray] = {}
    weights: dict[str, dict] = {}

    for path, lin in linears.items():
        codes, a = linear_codes(lin)
        packed = _np(quant.pack(codes, lin.spec.bits, ternary=ternary))
        a = _np(a).astype(np.float32)
        stacked = path.startswith("layers.")
        for i in range(layers) if stacked else [None]:
            name, entry = _entry(path, i, lin, ternary)
            tensors[name + PACKED_SUFFIX] = np.ascontiguousarray(packed[i] if stacked else packed)
            tensors[name + SCALE_SUFFIX] = np.ascontiguousarray(a[i] if stacked else a)
            weights[name] = entry

    float_dtypes = set()
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = ".".join(map(str, p))
        module, _, leaf = path.rpartition(".")
        if module in linears and leaf in ("kernel", "scale"):
            continue
        if path == "embed_tokens" and embed == "int8":
            emb = Int8Embedding.quantize(var[...])
            tensors[EMBED_NAME + INT8_SUFFIX] = np.ascontiguousarray(_np(emb.codes()))
            tensors[EMBED_NAME + SCALE_SUFFIX] = _np(emb.scale[...])
            continue
        value = _np(var[...])
        if float_dtype is not None:
            value = value.astype(_np_dtype(jnp.dtype(float_dtype).name))
        float_dtypes.add(_dtype_name(value.dtype))
        tensors.update(hf_tensors(path, value, layers))

    quant_config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout_version": quant.LAYOUT_VERSION,
        "ternary": ternary,
        "quant_rules": model.rules.to_list(),
        "float_dtype": sorted(float_dtypes)[0] if len(float_dtypes) == 1 else sorted(float_dtypes),
        "weights": weights,
    }
    if embed == "int8":
        quant_config["embed"] = {
            "type": "int8",
            "scheme": "per-row absmax: codes = round(E / s), s = max|E_row| / 127",
            "tensors": [EMBED_NAME + INT8_SUFFIX, EMBED_NAME + SCALE_SUFFIX],
        }
    (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    (out / QUANT_CONFIG).write_text(json.dumps(quant_config, indent=2))
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layout_version": str(quant.LAYOUT_VERSION),
        "quant_config": json.dumps(quant_config, separators=(",", ":")),
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=meta)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def is_packed_export(path: str | Path) -> bool:
    """True when ``path`` is a packed export folder (its ``quant_config.json`` says so)."""
    qc = Path(path) / QUANT_CONFIG
    if not qc.is_file():
        return False
    try:
        return json.loads(qc.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def _read_quant_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"no packed export at {folder} (expected a folder)")
    qc_path = folder / QUANT_CONFIG
    if not qc_path.exists():
        raise CheckpointError(
            f"{folder} has no {QUANT_CONFIG}: not a packed export (write one with "
            "python -m paretoq_jax.export --format packed)"
        )
    try:
        qc = json.loads(qc_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{qc_path} is not valid JSON ({e}): the export is damaged") from e
    if not isinstance(qc, dict) or qc.get("format") != FORMAT:
        qc = qc if isinstance(qc, dict) else {}
        raise CheckpointError(f"{qc_path}: format {qc.get('format')!r}, expected {FORMAT!r}")
    if qc.get("format_version") != FORMAT_VERSION or qc.get("layout_version") != (
        quant.LAYOUT_VERSION
    ):
        raise CheckpointError(
            f"{qc_path}: format_version {qc.get('format_version')} / layout_version "
            f"{qc.get('layout_version')}; this paretoq_jax reads {FORMAT_VERSION} / "
            f"{quant.LAYOUT_VERSION}: re-export with this version"
        )
    return qc


def load_packed(
    path: str | Path,
    *,
    mode: str = "dequantize",
    dtype=jnp.float32,
    scan_layers: bool = True,
    tile_rows: int | None = None,
) -> Llama:
    """Load a packed export.

    Args:
      path: the export folder.
      mode: ``"dequantize"``: a float :class:`Llama` (no quantization rules) whose kernels are
        ``from_codes(unpack(codes), scale)``, exactly the fake-quant model's weights, so its
        logits equal the QAT model's bit for bit. ``"packed"``: the quantized linears are
        :class:`~paretoq_jax.models.packed.PackedLinear` computing from the packed codes (logits
        equal to float32 rounding); the float weights are never formed. An int8 embedding
        (``save_packed(embed="int8")``) stays int8 in ``"packed"`` mode and becomes its float
        values in ``"dequantize"`` mode.
      dtype: compute dtype. Float parts keep their stored dtype as parameter dtype.
      tile_rows: byte rows per tile of the packed matmul (``mode="packed"``).
    """
    from safetensors import safe_open

    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    folder = Path(path)
    qc = _read_quant_config(folder)
    config = LlamaConfig.from_json(folder)
    layers = config.num_hidden_layers
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.exists():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    handle = safe_open(str(weights_file), framework="numpy")
    stored = handle.metadata() or {}
    expect = {"format_version": str(FORMAT_VERSION), "layout_version": str(quant.LAYOUT_VERSION)}
    if any(stored.get(k) != v for k, v in expect.items()):
        raise CheckpointError(
            f"{weights_file}: format_version {stored.get('format_version')} / layout_version "
            f"{stored.get('layout_version')}; this paretoq_jax reads {FORMAT_VERSION} / "
            f"{quant.LAYOUT_VERSION}: re-export with this version"
        )
    names = set(handle.keys())

    def get(name: str) -> np.ndarray:
        if name not in names:
            kind = "scale" if name.endswith(SCALE_SUFFIX) else "tensor"
            raise CheckpointError(
                f"missing {kind} {name!r} in {weights_file}: the file is incomplete"
            )
        return handle.get_tensor(name)

    float_dtype = qc["float_dtype"]
    param_dtype = _np_dtype(float_dtype if isinstance(float_dtype, str) else "float32")
    abstract = nnx.eval_shape(
        lambda: Llama(
            config, quant=QuantRules(), dtype=dtype, param_dtype=jnp.dtype(param_dtype),
            rngs=nnx.Rngs(0), scan_layers=scan_layers,
        )
    )  # fmt: skip
    rules = QuantRules.from_list(qc["quant_rules"])
    ternary = qc["ternary"]
    quantized = {}
    for p, m in quant_linears(abstract, quantized=False).items():
        mpath = ".".join(map(str, p))
        spec_path = f"layers.0.{mpath[len('layers.') :]}" if mpath.startswith("layers.") else mpath
        spec = rules.spec_for(spec_path)
        if spec is not None:
            quantized[mpath] = (p, m, spec)

    values: dict[str, np.ndarray] = {}
    embed_type = qc.get("embed", {}).get("type", "float")
    if embed_type not in EMBED_TYPES:
        raise CheckpointError(
            f"{folder / QUANT_CONFIG}: embed type {embed_type!r} is not one of {EMBED_TYPES}: "
            "written by a newer paretoq_jax?"
        )
    if embed_type == "int8":
        codes, scale = get(EMBED_NAME + INT8_SUFFIX), get(EMBED_NAME + SCALE_SUFFIX)
        emb = Int8Embedding(codes, scale, dtype=dtype)
        if emb.shape != (config.vocab_size, config.hidden_size):
            raise CheckpointError(
                f"{weights_file}: int8 embedding has shape {emb.shape}, expected "
                f"{(config.vocab_size, config.hidden_size)} from config.json"
            )
        if mode == "packed":
            abstract.embed_tokens = emb
        else:
            values["embed_tokens"] = _np(emb.weight()).astype(param_dtype)
    for mpath, (p, lin, spec) in quantized.items():
        stacked = mpath.startswith("layers.")
        idx = range(layers) if stacked else [None]
        packed, scales = [], []
        for i in idx:
            name = model_to_hf(f"{mpath}.kernel", i)[0].removesuffix(".weight")
            entry = qc["weights"].get(name)
            if entry is None or entry["bits"] != spec.bits or entry["method"] != spec.method:
                raise CheckpointError(
                    f"{folder / QUANT_CONFIG}: no entry for {name!r} matching the quant rules"
                )
            packed.append(get(name + PACKED_SUFFIX))
            scales.append(get(name + SCALE_SUFFIX))
        packed_arr = np.stack(packed) if stacked else packed[0]
        scale_arr = np.stack(scales) if stacked else scales[0]
        shape = (*packed_arr.shape[:-3], lin.in_features, lin.out_features)
        expected = quant.packed_shape(shape, spec.bits, ternary=ternary)
        if packed_arr.shape != expected:
            raise CheckpointError(
                f"{weights_file}: packed codes of {mpath} have shape {packed_arr.shape}, "
                f"expected {expected} from config.json"
            )
        bias = None
        if lin.bias is not None:
            bias = np.stack([get(model_to_hf(f"{mpath}.bias", i)[0]) for i in idx])
            bias = bias if stacked else bias[0]
        if mode == "packed":
            new = PackedLinear(
                jnp.asarray(packed_arr), jnp.asarray(scale_arr), spec=spec,
                in_features=lin.in_features, ternary=ternary, bias=bias, dtype=dtype,
                tile_rows=tile_rows,
            )  # fmt: skip
            set_module(abstract, p, new)
        else:
            codes = quant.unpack(jnp.asarray(packed_arr), spec.bits, shape, ternary=ternary)
            w = quant.from_codes(codes, jnp.asarray(scale_arr), spec, dtype=jnp.float32)
            values[f"{mpath}.kernel"] = _np(w).astype(param_dtype)

    graphdef, state = nnx.split(abstract)
    filled = []
    for p, var in nnx.to_flat_state(state):
        key = ".".join(map(str, p))
        current = var.get_value()
        if isinstance(current, jax.ShapeDtypeStruct):
            if key not in values:
                if key.startswith("layers."):
                    values[key] = np.stack([get(_hf(key, i)[0]) for i in range(layers)])
                    if _hf(key, 0)[1]:
                        values[key] = np.swapaxes(values[key], -1, -2)
                else:
                    name, transpose = _hf(key, None)
                    values[key] = get(name).T if transpose else get(name)
            arr = values[key]
            if tuple(arr.shape) != tuple(current.shape):
                raise CheckpointError(
                    f"{weights_file}: tensor for {key} has shape {arr.shape}, expected "
                    f"{tuple(current.shape)} from config.json"
                )
            var = var.replace(jnp.asarray(arr, current.dtype))
        filled.append((p, var))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _hf(key: str, layer: int | None) -> tuple[str, bool]:
    return model_to_hf(key, layer)
