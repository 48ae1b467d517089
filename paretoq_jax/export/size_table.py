"""Measured export sizes next to theory: ``python -m paretoq_jax.export.size_table``.

Builds a randomly initialized model of a given shape (default: SmolLM2-135M's, read from the
GGUF that ``paretoq_jax.assets`` ships) quantized at each bit-width, exports it as packed
safetensors and as GGUF, and prints a Markdown table:

- ``quant bits/weight``: bytes of the quantized projections' stored data (codes and their
  scales) x 8 / number of quantized weights, measured in the written file; ``theory`` is the
  format's nominal density (packed: 1, 1.6 or 2, 2, 3, 4 bits + one f32 scale per output
  channel; GGUF: the ggml block's ``type_size * 8 / block_size``).
- ``file``: the whole file (embeddings, norms, header included) and its ratio to the theoretical
  size (nominal payload of every tensor, no header).

Weights are random: sizes do not depend on values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.assets import smollm2_gguf
from paretoq_jax.io.gguf import _reader, gguf_config
from paretoq_jax.io.gguf_writer import write_gguf
from paretoq_jax.io.packed import quantized_weights, save_packed
from paretoq_jax.models import Llama, LlamaConfig, QuantRules

__all__ = ["measure", "main"]


def _smollm2_config() -> LlamaConfig:

    path = smollm2_gguf()
    return gguf_config(_reader(path), path)


def _quant_params(model: Llama) -> tuple[int, int, int]:
    """(quantized weights, their output channels, float elements) of a model."""
    nq = nout = nf = 0
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[0] == "layers" and p[-1] == "kernel":
            nq += v.size
            nout += v.size // v.shape[-2]
        elif p[-1] != "scale":
            nf += v.size
    return nq, nout, nf


def measure(config: LlamaConfig, bits_list=(1, 1.58, 2, 3, 4)) -> list[dict]:
    """One row per (bits, format) with measured and theoretical sizes in bytes."""
    from gguf import GGML_QUANT_SIZES, GGUFReader
    from safetensors import safe_open

    rows = []
    tokenizer = _FakeTokenizer(config.vocab_size)
    for bits in bits_list:
        model = Llama(config, quant=QuantRules.paretoq(bits), rngs=nnx.Rngs(0))
        quantized_weights(model)
        nq, nout, nf = _quant_params(model)
        float_bytes = 4 * nf
        with tempfile.TemporaryDirectory() as tmp:
            layouts = ("2bit", "base3") if bits == 1.58 else ("2bit",)
            for ternary in layouts:
                out = save_packed(model, Path(tmp) / f"pk-{ternary}", ternary=ternary)
                f = safe_open(str(out / "model.safetensors"), framework="numpy")
                qbytes = sum(
                    _nbytes(f, k)
                    for k in f.keys()
                    if k.endswith((".weight_packed", ".weight_scale"))
                )
                density = quant.pack_format(bits, ternary).bits_per_code
                theory_q = nq * density / 8 + 4 * nout
                size = (out / "model.safetensors").stat().st_size
                name = "packed" + (f" ({ternary})" if bits == 1.58 else "")
                rows.append(
                    _row(bits, name, qbytes, theory_q, nq, size, theory_q + float_bytes, nq + nf)
                )
            qtypes = ("TQ2_0", "TQ1_0") if bits == 1.58 else (None,)
            for qtype in qtypes:
                path = Path(tmp) / f"m-{qtype}.gguf"
                types = write_gguf(model, path, tokenizer=tokenizer, qtype=qtype)
                r = GGUFReader(str(path))
                qt = [t for t in r.tensors if t.name.startswith("blk.") and "norm" not in t.name]
                qbytes = sum(int(t.n_bytes) for t in qt)
                theory_q = (
                    sum(
                        int(t.n_elements)
                        * GGML_QUANT_SIZES[t.tensor_type][1]
                        * 8
                        / GGML_QUANT_SIZES[t.tensor_type][0]
                        for t in qt
                    )
                    / 8
                )
                kinds = sorted({types[t.name] for t in qt})
                size = path.stat().st_size
                rows.append(
                    _row(bits, "gguf " + "/".join(kinds), qbytes, theory_q, nq, size,
                         theory_q + float_bytes, nq + nf)
                )  # fmt: skip
    return rows


def _nbytes(f, key: str) -> int:
    """Bytes of a tensor in a safetensors file, from its header (uint8 codes, f32 scales)."""
    sl = f.get_slice(key)
    return int(np.prod(sl.get_shape())) * {"U8": 1, "F32": 4}[sl.get_dtype()]


def _row(bits, fmt, qbytes, theory_q, nq, size, theory_file, n_params) -> dict:
    return {
        "params": n_params,
        "quantized_params": nq,
        "bits": bits,
        "format": fmt,
        "quant_bits_per_weight": 8 * qbytes / nq,
        "theory_bits_per_weight": 8 * theory_q / nq,
        "file_bytes": size,
        "file_vs_theory": size / theory_file,
    }


class _FakeTokenizer:
    """A byte-level BPE stand-in with ``vocab`` tokens (sizes only; not a real tokenizer)."""

    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = None
    pad_token_id = None
    chat_template = None

    def __init__(self, vocab: int):
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.BPE(vocab={f"t{i}": i for i in range(vocab)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.backend_tokenizer = tok

    def __call__(self, text: str) -> dict:
        return {"input_ids": []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None, help="HF config.json (default: SmolLM2-135M)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    config = LlamaConfig.from_json(args.config) if args.config else _smollm2_config()
    rows = measure(config)
    nq, n = rows[0]["quantized_params"], rows[0]["params"]
    print(f"{n / 1e6:.1f}M parameters, {nq / 1e6:.1f}M of them quantized; float parts f32\n")
    print(
        "| bits | format | quant bits/weight | theory | file MiB | file bytes/param | file / theory |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['bits']} | {r['format']} | {r['quant_bits_per_weight']:.4f} | "
            f"{r['theory_bits_per_weight']:.4f} | {r['file_bytes'] / 2**20:.2f} | "
            f"{r['file_bytes'] / r['params']:.3f} | {r['file_vs_theory']:.4f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
