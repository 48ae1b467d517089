"""Export a QAT run to files people can run: packed integer codes, an HF folder, a GGUF file.

``python -m paretoq_jax.export --checkpoint RUN_DIR --format packed|hf|gguf --out PATH``

- ``packed``: :func:`paretoq_jax.io.packed.save_packed` (codes at their real bit-width, one
  effective scale per output channel; spec in ``docs/export.md``).
- ``hf``: :func:`paretoq_jax.io.save_pretrained` (the fake-quantized weights as floats; loads
  in ``transformers``).
- ``gguf``: :func:`paretoq_jax.io.gguf_writer.write_gguf` (llama.cpp block formats holding the
  codes exactly up to fp16 block scales).

Outputs are written to a temporary path beside ``PATH`` and renamed into place when complete,
so a failed export never leaves a partial file at ``PATH``. ``PATH`` is checked before the run is
loaded (:mod:`paretoq_jax.outputs`): never into, over or above a training run or the checkpoint
being read; an existing ``PATH`` is replaced only when it is an earlier export of the same format
(its marker says so) and ``force=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paretoq_jax.errors import ParetoQError
from paretoq_jax.io import save_pretrained
from paretoq_jax.io.gguf_writer import FLOAT_TYPES, QTYPE_NAMES, write_gguf
from paretoq_jax.io.packed import quantized_weights, save_packed
from paretoq_jax.models import Llama
from paretoq_jax.outputs import OutputError, atomic_output, check_output
from paretoq_jax.run.restore import load_run as restore_run

__all__ = ["FORMATS", "ExportError", "export_model", "export_run", "load_run"]

FORMATS = ("packed", "hf", "gguf")


class ExportError(ParetoQError, ValueError):
    """An export that cannot be done; the message names the problem and the fix."""


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _check_options(
    ternary: str = "2bit",
    gguf_qtype: str | None = None,
    float_type: str = "f32",
    packed_embed: str = "float",
):
    if ternary not in ("2bit", "base3"):
        raise ExportError(f"ternary={ternary!r}: choose '2bit' or 'base3'")
    if gguf_qtype is not None and gguf_qtype.upper() not in QTYPE_NAMES:
        raise ExportError(
            f"unknown GGUF qtype {gguf_qtype!r}: choose one of {', '.join(sorted(QTYPE_NAMES))}"
        )
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float_type={float_type!r}: choose one of {sorted(FLOAT_TYPES)}")
    if packed_embed not in ("float", "int8"):
        raise ExportError(f"packed_embed={packed_embed!r}: choose 'float' or 'int8'")


def output_kind_of(fmt: str) -> str:
    """The output kind (marker) of an export format: ``export-packed``, ``export-hf``, ..."""
    return f"export-{fmt}"


def check_export_out(
    out: str | Path, fmt: str, *, force: bool, reads: Sequence[str | Path] = (),
    owned_run: str | Path | None = None,
) -> Path:  # fmt: skip
    """:func:`paretoq_jax.outputs.check_output` for an export of ``fmt`` (folder, or a .gguf
    file); raises :class:`ExportError`."""
    try:
        return check_output(
            out, output_kind_of(fmt), directory=fmt != "gguf", force=force, reads=reads,
            owned_run=owned_run,
        )  # fmt: skip
    except OutputError as e:
        raise ExportError(str(e)) from None


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[Llama, Any, Any, int]:
    """``(model, tokenizer, run_config, step)`` of ``RUN_DIR`` at checkpoint ``step`` (default:
    the latest complete one); see :func:`paretoq_jax.run.restore.load_run`."""
    try:
        return restore_run(run_dir, step)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None


def export_model(
    model: Llama,
    fmt: str,
    out: str | Path,
    *,
    tokenizer: Any = None,
    force: bool = False,
    reads: Sequence[str | Path] = (),
    owned_run: str | Path | None = None,
    ternary: str = "2bit",
    gguf_qtype: str | None = None,
    float_type: str = "f32",
    packed_embed: str = "float",
) -> Path:
    """Export a quantized model; returns ``out``.

    ``ternary`` (packed, 1.58 bits): ``"2bit"`` or ``"base3"``. ``gguf_qtype`` (gguf): block
    format of the quantized projections (default per bit-width). ``float_type`` (gguf): ``"f32"``,
    ``"f16"`` or ``"q8_0"`` for embeddings and a float ``lm_head``. ``packed_embed`` (packed):
    ``"float"`` or ``"int8"`` token embedding (``io.packed.save_packed``). ``reads`` /
    ``owned_run``: see
    :func:`paretoq_jax.outputs.check_output` (an export never goes into, over or above a
    training run or what it was read from; ``force`` replaces only an earlier export).
    """
    _check_format(fmt)
    _check_options(ternary, gguf_qtype, float_type, packed_embed)
    out = Path(out)
    where = dict(force=force, reads=reads, owned_run=owned_run)
    check_export_out(out, fmt, **where)
    try:
        quantized_weights(model)  # not quantized / missing scales: clear errors up front
    except ValueError as e:
        raise ExportError(str(e)) from None
    with atomic_output(out, output_kind_of(fmt), directory=fmt != "gguf", **where) as tmp:
        if fmt == "packed":
            save_packed(model, tmp, tokenizer=tokenizer, ternary=ternary, embed=packed_embed)
        elif fmt == "hf":
            save_pretrained(model, tmp, tokenizer=tokenizer)
        else:
            write_gguf(
                model, tmp, tokenizer=tokenizer, qtype=gguf_qtype, float_type=float_type,
                output_kind=output_kind_of(fmt),
            )  # fmt: skip
    return out


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    step: int | None = None,
    force: bool = False,
    **kwargs: Any,
) -> Path:
    """:func:`load_run` then :func:`export_model` (format and output are checked first)."""
    _check_format(fmt)
    _check_options(**kwargs)
    check_export_out(out, fmt, force=force, reads=[run_dir])
    model, tokenizer, _, _ = load_run(run_dir, step)
    return export_model(
        model, fmt, out, tokenizer=tokenizer, force=force, reads=[run_dir], **kwargs
    )
