"""The run layer: what a training run is, below everything that trains, evaluates, exports or
reports on runs.

- ``config``: the run schema (``RunConfig``, ``configs/*.yaml``);
- ``build``: config -> mesh, model, teacher, tokenizer (``build_mesh``, ``build_model``, ...);
- ``optim``: the optimizer and learning-rate schedule of ``train.*``;
- ``state``: the train state's layout and shardings (``init_state``, ``abstract_state``);
- ``checkpoint``: Orbax checkpoints of that state in ``RUN_DIR/checkpoints``;
- ``restore``: ``load_run`` and friends, the one way to read a run back;
- ``metrics``: reading ``RUN_DIR/metrics.jsonl``.

``paretoq_jax.train`` (the loop), ``eval``, ``export``, ``sweep``, ``report``, ``quickstart`` and
``plan`` build on it; it imports none of them.
"""

from .build import build_mesh, build_model, load_tokenizer, model_factory, resolve_model_path
from .config import CheckpointConfig, MeshConfig, ModelConfig, RunConfig, TrainConfig
from .metrics import read_metrics
from .restore import checkpoint_steps, load_run, restore_params, set_params

__all__ = [
    "CheckpointConfig",
    "MeshConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "build_mesh",
    "build_model",
    "checkpoint_steps",
    "load_run",
    "load_tokenizer",
    "model_factory",
    "read_metrics",
    "resolve_model_path",
    "restore_params",
    "set_params",
]
