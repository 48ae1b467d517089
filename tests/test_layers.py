"""The package's import layering (``[tool.importlinter]`` in pyproject.toml, docs/architecture.md)
and the names defined once that other tables must agree with."""

import re
from pathlib import Path

import pytest

from paretoq_jax.io.mapping import GGUF_PROJ
from paretoq_jax.models.linears import PROJECTIONS
from paretoq_jax.models.rules import DECODER_PROJECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch):
    """``lint-imports``: no module imports from a layer above its own (e.g. eval, export and
    report read runs through ``paretoq_jax.run``, never through ``paretoq_jax.train``)."""
    cli = pytest.importorskip("importlinter.cli", reason="pip install -e '.[test]'")
    monkeypatch.chdir(ROOT)  # reads pyproject.toml from the working directory
    monkeypatch.syspath_prepend(str(ROOT))  # this checkout's package, not an installed one
    assert cli.lint_imports(no_cache=True) == 0, "import contract broken: run lint-imports"


def test_projection_tables_agree():
    """GGUF's names and the default quantization rule cover exactly the seven projections."""
    assert sorted(GGUF_PROJ.values()) == sorted(PROJECTIONS.values())
    for i in (0, 11):
        assert all(
            re.fullmatch(DECODER_PROJECTIONS, f"layers.{i}.{p}") for p in PROJECTIONS.values()
        )
    assert not re.fullmatch(DECODER_PROJECTIONS, "layers.0.input_layernorm")
