"""A packed export written with another format or layout version is refused, not misread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from paretoq_jax.io import CheckpointError
from paretoq_jax.io.packed import load_packed, save_packed
from paretoq_jax.models import Llama, LlamaConfig, QuantRules

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    model = Llama(LlamaConfig.from_json(TINY), quant=QuantRules.paretoq(2), rngs=nnx.Rngs(0))
    return save_packed(model, tmp_path_factory.mktemp("pk") / "pk")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("key", ["layout_version", "format_version"])
def test_unknown_version_in_quant_config_is_refused(tmp_path, export, key):
    out = _copy(export, tmp_path / "pk")
    qc = json.loads((out / "quant_config.json").read_text())
    qc[key] = 99
    (out / "quant_config.json").write_text(json.dumps(qc))
    with pytest.raises(CheckpointError, match=f"{key} 99.*re-export"):
        load_packed(out)


def test_unknown_layout_in_weights_file_is_refused(tmp_path, export):
    """quant_config.json intact, the safetensors header from another layout version."""
    out = _copy(export, tmp_path / "pk")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        meta = dict(f.metadata())
    save_file(load_file(out / "model.safetensors"), str(out / "model.safetensors"),
              metadata={**meta, "layout_version": "2"})  # fmt: skip
    with pytest.raises(CheckpointError, match="layout_version 2.*re-export"):
        load_packed(out)


def test_damaged_quant_config_is_a_clear_error(tmp_path, export):
    out = _copy(export, tmp_path / "pk")
    (out / "quant_config.json").write_text('{"format": "paretoq-pa')
    with pytest.raises(CheckpointError, match="not valid JSON.*damaged"):
        load_packed(out)
    load_packed(export)  # the intact one loads
