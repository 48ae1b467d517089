"""Reference unpacker for paretoq packed exports, using only numpy and safetensors.

Self-contained on purpose (no paretoq_jax, no JAX): it is the executable form of the spec in
``docs/export.md`` and ``docs/packed-format.md``, for anyone reading a packed export elsewhere.

    python paretoq_jax/export/reference_unpack.py EXPORT_DIR OUT.safetensors

writes every tensor of the export as float32 under its HF name, with the quantized weights
dequantized to HF's ``(out, in)`` layout: together with the export's ``config.json`` and
tokenizer files that is an HF checkpoint folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

# Bit fields of the unsigned code u (low bits first) and the code range, per pack format.
FIELDS = {"1": (1,), "1.58/2bit": (2,), "2": (2,), "3": (2, 1), "4": (4,)}
KMIN = {"1": -1, "1.58/2bit": -1, "1.58/base3": -1, "2": -2, "3": -4, "4": -8}


def unpack_codes(packed: np.ndarray, pack_format: str, n: int) -> np.ndarray:
    """uint8 ``(P, R, out)`` -> int8 codes ``(n, out)`` (layout version 1)."""
    p = packed.astype(np.int32)
    if pack_format == "1.58/base3":
        slabs = [(p[0] // 3**t) % 3 for t in range(5)]
    else:
        slabs, plane, shift = [0] * 8, 0, 0
        for w in FIELDS[pack_format]:
            for t in range(8):
                g, j = divmod(t, 8 // w)
                slabs[t] = slabs[t] | (((p[plane + g] >> (w * j)) & ((1 << w) - 1)) << shift)
            plane, shift = plane + w, shift + w
    u = np.concatenate(slabs, axis=0)[:n]  # slab t holds rows t*R .. t*R + R - 1
    mult = 2 if pack_format == "1" else 1
    return (mult * u + KMIN[pack_format]).astype(np.int8)


def dequantize(packed: np.ndarray, scale: np.ndarray, entry: dict) -> np.ndarray:
    """The float32 HF weight ``(out, in)``: ``W = a * (k + z) / n`` with ``a = max(scale, 1e-5)``."""
    k = unpack_codes(packed, entry["pack_format"], entry["in_features"]).astype(np.float32)
    a = np.maximum(scale.astype(np.float32), np.float32(1e-5))
    w = a[None, :] * ((k + np.float32(entry["z"])) / np.float32(entry["n"]))  # (in, out)
    return np.ascontiguousarray(w.T)


def unpack_export(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a packed export under its HF name; quantized weights dequantized."""
    folder = Path(folder)
    qc = json.loads((folder / "quant_config.json").read_text())
    if qc.get("format") != "paretoq-packed" or qc.get("layout_version") != 1:
        raise ValueError(f"{folder}: not a paretoq-packed export with layout version 1")
    tensors = load_file(str(folder / "model.safetensors"))
    out: dict[str, np.ndarray] = {}
    for name, entry in qc["weights"].items():
        packed = tensors.pop(f"{name}.weight_packed")
        scale = tensors.pop(f"{name}.weight_scale")
        if list(packed.shape) != entry["packed_shape"]:
            raise ValueError(f"{name}: packed shape {packed.shape} != {entry['packed_shape']}")
        out[f"{name}.weight"] = dequantize(packed, scale, entry)
    if qc.get("embed", {}).get("type") == "int8":  # optional per-row absmax int8 embedding
        codes = tensors.pop("model.embed_tokens.weight_int8").astype(np.float32)
        scale = tensors.pop("model.embed_tokens.weight_scale").astype(np.float32)
        out["model.embed_tokens.weight"] = codes * scale[:, None]
    for name, value in tensors.items():
        out[name] = value.astype(np.float32)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: reference_unpack.py EXPORT_DIR OUT.safetensors")
    save_file(unpack_export(sys.argv[1]), sys.argv[2], metadata={"format": "pt"})
