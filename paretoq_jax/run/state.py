"""The train state of a run: what the step updates and a checkpoint holds.

A plain dict ``{"params", "opt_state", "step", "rng"}`` of arrays: ``params`` is the model's
``nnx.Param`` state as a pure dict (float32 master weights), ``opt_state`` the optimizer's,
``step`` the number of steps taken, ``rng`` the run's PRNG key (``train.seed``; kept in the
checkpoint format for training features that draw random numbers, none of which does yet).

``init_state`` (the training loop) and ``abstract_state`` (checkpoint restore, the planner) are
the one definition of its layout and shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .checkpoint import abstract_like

__all__ = ["state_shardings", "init_state", "abstract_state"]


def state_shardings(
    mesh: Mesh, param_shardings: Any, tx: optax.GradientTransformation, params_shape: Any
) -> dict[str, Any]:
    """NamedShardings of the whole train state: optimizer moments follow their parameters."""
    replicated = NamedSharding(mesh, P())
    opt_shape = jax.eval_shape(tx.init, params_shape)
    masked = optax.MaskedNode  # params that a multi_transform branch skips
    opt_shardings = optax.tree_map_params(
        tx,
        lambda leaf, s: leaf if isinstance(leaf, masked) else s,
        opt_shape,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, masked)),
    )
    return {
        "params": param_shardings,
        "opt_state": opt_shardings,
        "step": replicated,
        "rng": replicated,
    }


def _state(params: Any, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed),
    }


def init_state(
    params: Any, tx: optax.GradientTransformation, shardings: dict[str, Any], seed: int
) -> dict[str, Any]:
    """The state at step 0 for the arrays ``params`` (kept as they are), laid out in
    ``shardings`` (``state_shardings``)."""
    rest = jax.jit(
        lambda p: {k: v for k, v in _state(p, tx, seed).items() if k != "params"},
        out_shardings={k: v for k, v in shardings.items() if k != "params"},
    )(params)
    return {"params": params, **rest}


def abstract_state(
    params: Any, tx: optax.GradientTransformation, shardings: dict[str, Any]
) -> dict[str, Any]:
    """``ShapeDtypeStruct`` leaves (with ``shardings``) of the state for ``params`` (arrays or
    abstract): the target a checkpoint restores into, the arguments the planner compiles."""
    return abstract_like(jax.eval_shape(lambda p: _state(p, tx, 0), params), shardings)
