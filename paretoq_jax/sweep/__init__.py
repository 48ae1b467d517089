"""Pareto sweeps: ``python -m paretoq_jax.sweep --config configs/sweeps/NAME.yaml``.

A grid of training runs over any config keys (bit-width, quantizer, model, steps, learning
rate, ...), each a normal run in its own directory followed by evaluation; results in
``SWEEP_DIR/results.{csv,json}``. See ``docs/sweeps.md``.
"""

from .runner import cell_config, collect_results, run_cells, write_results
from .spec import Cell, SweepConfig, SweepError, cell_name, expand, load_sweep, parse_shard, select

__all__ = [
    "Cell",
    "SweepError",
    "SweepConfig",
    "cell_config",
    "cell_name",
    "collect_results",
    "expand",
    "load_sweep",
    "parse_shard",
    "run_cells",
    "select",
    "write_results",
]
