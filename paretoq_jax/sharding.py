"""Logical axis names -> mesh axes (`data`, `fsdp`, `tensor`), meshes, and placing a model.

Every parameter of :mod:`paretoq_jax.models` names its axes ('layers', 'embed', 'vocab', 'heads',
'kv_heads', 'mlp', 'norm') in its ``out_sharding`` metadata. One table, ``DEFAULT_SHARDING_RULES``, maps
each logical name to a mesh axis (or ``None``: replicated). A dimension whose size the mesh axis
does not divide is replicated instead, so any model works on any mesh.

Activations are constrained with the same table (``constrain``): the batch over ``data`` x
``fsdp``, attention heads, MLP hidden units and the vocabulary over ``tensor`` (Megatron-style
tensor parallelism), the residual stream replicated over ``tensor``. Over several TPU slices
(multi-slice), ``make_mesh`` puts ``data`` across slices (DCN) and ``fsdp`` x ``tensor`` within
each slice (ICI).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_SHARDING_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations: the batch is split over data and fsdp
    "length": None,
    "layers": None,  # stacked layers stay whole on each device (scan slices them)
    "embed": "fsdp",  # FSDP: the model dimension of every weight is split
    "vocab": "tensor",
    "heads": "tensor",  # Megatron-style tensor parallelism: heads / mlp split
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}

ShardingRules = Mapping[str, str | tuple[str, ...] | None]


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of ``jax.devices()``).

    TPU devices are laid out along the physical torus (``mesh_utils``); devices of several
    slices get ``data`` across the slices (only data-parallel gradients cross the slower DCN).
    """
    devices = list(jax.devices() if devices is None else devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
            f"but {len(devices)} are available; choose sizes whose product is {len(devices)}"
        )
    grid = _device_grid((data, fsdp, tensor), devices)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def num_slices(devices: Sequence) -> int:
    """How many TPU slices ``devices`` span (1 for anything but multi-slice TPU)."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def _device_grid(shape: tuple[int, int, int], devices: list) -> np.ndarray:
    from jax.experimental import mesh_utils

    slices = num_slices(devices)
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(
                f"{len(devices)} devices span {slices} TPU slices: mesh.data={shape[0]} must be "
                f"a multiple of {slices} (the data axis is the one that crosses slices, over DCN)"
            )
        ici = (shape[0] // slices, shape[1], shape[2])
        return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    if devices[0].platform == "tpu":
        try:
            return mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # a shape the torus layout does not handle: device order as given
    return np.asarray(devices, dtype=object).reshape(shape)


def logical_to_spec(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: ShardingRules | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for logical axis ``names``; with ``shape``, axes the mesh does not divide
    (and mesh axes already used by an earlier dimension) are replicated."""
    rules = DEFAULT_SHARDING_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; rules know {sorted(rules)}"
            )
        target = None if name is None else rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if shape is not None and shape[i] % size:
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(
    x: jax.Array, names: Sequence[str | None], rules: ShardingRules | None = None
) -> jax.Array:
    """``x`` with the sharding of its logical axis ``names`` on the ambient mesh (set by the
    train / eval steps with ``jax.sharding.use_abstract_mesh``); unchanged without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh, rules, x.shape))


def logical_to_sharding(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: ShardingRules | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding on ``mesh`` for logical axis ``names`` (see ``logical_to_spec``)."""
    return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape))


def variable_sharding(
    var: nnx.Variable, mesh: Mesh, rules: ShardingRules | None = None
) -> NamedSharding:
    """The sharding of one model variable from its ``out_sharding`` logical names."""
    names = var.get_metadata().get("out_sharding") or (None,) * var.ndim
    if len(names) != var.ndim:
        raise ValueError(f"variable of shape {var.shape} has {len(names)} axis names {names}")
    return logical_to_sharding(names, mesh, rules, var.shape)


def model_shardings(model: nnx.Module, mesh: Mesh, rules: ShardingRules | None = None) -> nnx.State:
    """An ``nnx.State`` (same structure as ``nnx.state(model)``) of NamedShardings."""
    state = nnx.state(model)
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh, rules),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules | None = None) -> nnx.State:
    """Places every parameter of ``model`` on ``mesh`` (in place) and returns the shardings
    (an ``nnx.State`` of NamedShardings, usable as jit in/out shardings of ``nnx.state(model)``)."""
    shardings = model_shardings(model, mesh, rules)
    state = nnx.state(model)
    placed = jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v[...], s)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    nnx.update(model, placed)
    return shardings
