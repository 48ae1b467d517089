"""Any model by path: a training run directory, a packed export, an HF folder, a ``.gguf`` file
or a hub id -> ``(model, tokenizer)``; what a results file records about it.

The one loader behind ``eval``, ``generate`` and the quickstart (re-exported by
``paretoq_jax.eval``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from paretoq_jax.config import load_config
from paretoq_jax.io import load_pretrained, load_tokenizer
from paretoq_jax.io.packed import is_packed_export, load_packed
from paretoq_jax.sharding import shard_model

from .checkpoint import Checkpointer
from .config import RunConfig
from .restore import load_run as restore_run

__all__ = ["LOADERS", "describe_model", "is_run_dir", "load_model", "load_run"]


def is_run_dir(path: Path) -> bool:
    """A training run directory: ``config.yaml`` and a ``checkpoints/`` folder."""
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def load_run(
    run_dir: str | Path, *, step: int | None = None, mesh: Mesh | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a training run: the model the run's ``config.yaml`` describes,
    holding the parameters of checkpoint ``step`` (default: the latest complete one); see
    :func:`paretoq_jax.run.restore.load_run`."""
    model, tokenizer, _, _ = restore_run(run_dir, step, mesh=mesh)
    return model, tokenizer


def _load_pretrained(path: str, *, bits=None, method=None, mesh=None, dtype=jnp.float32, **_):
    model = load_pretrained(path, 16 if bits is None else bits, method, dtype, mesh)
    return model, load_tokenizer(path)


def _load_run(path: str, *, bits=None, method=None, mesh=None, dtype=None, **_):
    if bits is not None or method is not None:
        raise ValueError(
            f"{path} is a training run: its bits/method come from its config.yaml; drop --bits "
            "and --method"
        )
    return load_run(path, mesh=mesh)


def _is_packed(p: Path) -> bool:
    return is_packed_export(p)


def _load_packed(
    path: str, *, bits=None, method=None, mesh=None, dtype=jnp.float32, packed_mode="dequantize"
):
    """A packed export: by default a float model holding exactly its dequantized codes;
    ``packed_mode="packed"`` computes from the packed codes (``io.packed.load_packed``)."""
    if bits is not None or method is not None:
        raise ValueError(f"{path} is a packed export with its own bits; drop --bits/--method")
    model = load_packed(path, mode=packed_mode, dtype=dtype)
    if mesh is not None:
        shard_model(model, mesh)
    return model, load_tokenizer(path)


def _is_hub_id(p: Path) -> bool:
    s = str(p)
    return not p.exists() and s.count("/") == 1 and not s.startswith((".", "/", "~"))


# (predicate, loader): the first predicate that holds picks the loader.
LOADERS: list[tuple[str, Callable[[Path], bool], Callable[..., tuple[Any, Any]]]] = [
    ("training run directory", is_run_dir, _load_run),
    ("packed export", _is_packed, _load_packed),
    ("HF folder", lambda p: p.is_dir() and (p / "config.json").is_file(), _load_pretrained),
    (".gguf file", lambda p: p.is_file() and p.suffix == ".gguf", _load_pretrained),
    ("hub id", _is_hub_id, _load_pretrained),
]


def load_model(
    path: str | Path,
    *,
    bits: float | int | str | None = None,
    method: str | None = None,
    mesh: Mesh | None = None,
    dtype=jnp.float32,
    packed_mode: str = "dequantize",
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a training run directory (latest checkpoint), a packed
    export, an HF folder, a ``.gguf`` file or a hub id. ``bits``/``method`` quantize a float
    checkpoint at load (round-to-nearest with the method's scale init); ``mesh`` places the
    parameters sharded; ``packed_mode`` is how a packed export loads (``"dequantize"``: float
    weights, ``"packed"``: compute from the codes; other kinds ignore it)."""
    p = Path(path).expanduser()
    for _, predicate, loader in LOADERS:
        if predicate(p):
            return loader(
                str(p), bits=bits, method=method, mesh=mesh, dtype=dtype, packed_mode=packed_mode
            )
    kinds = ", ".join(name for name, _, _ in LOADERS)
    raise FileNotFoundError(f"cannot load a model from {str(path)!r}: expected one of {kinds}")


def describe_model(path: str | Path, bits=None, method=None) -> dict[str, Any]:
    """What a results file records about the model: path, kind, bits, method (and run step)."""
    p = Path(path).expanduser()
    kind = next((name for name, pred, _ in LOADERS if pred(p)), "unknown")
    info: dict[str, Any] = {"model": str(path), "kind": kind, "bits": bits, "method": method}
    if kind == "training run directory":
        cfg = load_config(RunConfig, p / "config.yaml", stored=True)
        ckpt = Checkpointer(p / "checkpoints", async_save=False)
        try:
            info.update(bits=cfg.model.bits, method=cfg.model.method, step=ckpt.latest_step())
        finally:
            ckpt.close()
    elif bits is None:
        info["bits"] = 16
    return info
