"""Run metrics: ``RUN_DIR/metrics.jsonl``, a progress bar, optional TensorBoard, quant statistics.

``metrics.jsonl`` holds one JSON object per logged step: ``step``, ``loss``, ``lr``,
``grad_norm``, ``tokens_per_sec``, ``step_time_s``, ``tokens`` (seen so far), ``elapsed_s``;
every ``train.logging.quant_stats_every`` steps also ``quant``: for each quantized projection (a
module path with the layer index, e.g. ``layers.3.self_attn.q_proj``)

- ``scale_mean``: the mean effective scale ``a = max(alpha, 1e-5)`` over output channels,
- ``outside_clip``: the fraction of weights with ``W / a`` outside the quantizer's clip range,
- ``codes_changed``: the fraction of integer codes that differ from the previous quant log
  (null at the first one): ParetoQ's "learning transition" signal (Sec. 2.2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from paretoq_jax import quant
from paretoq_jax.models.linears import quant_linears
from paretoq_jax.quant import QuantSpec
from paretoq_jax.run.metrics import read_metrics

__all__ = ["MetricsWriter", "QuantStats", "quantized_kernels"]


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl`` (process 0 only) and drives a tqdm bar."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress: bool = True,
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.resumed_elapsed_s = 0.0
        if enabled:
            self._truncate_after(start_step)
        self._file = self.path.open("a") if enabled else None
        self._bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if enabled and progress
            else None
        )
        self._tb = _tensorboard_writer(Path(run_dir) / "tb") if enabled and tensorboard else None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint being resumed from.

        Sets ``resumed_elapsed_s``: the training time already spent up to ``step`` (the kept rows'
        last ``elapsed_s``), so that ``elapsed_s`` keeps counting across resumed segments.
        """
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        if self.path.exists():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.resumed_elapsed_s = float(rows[-1].get("elapsed_s", 0.0)) if step and rows else 0.0

    def advance(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(_jsonable(row)) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.scalar(k, v, step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "size", 2) == 1:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _tensorboard_writer(path: Path):
    """A TensorBoard writer if one is installed (``tensorboardX`` or ``tensorflow``), else None."""
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except ImportError:
        return None

    class _W:
        def __init__(self):
            self.w = SummaryWriter(str(path))

        def scalar(self, k, v, step):
            self.w.add_scalar(k, v, step)

        def close(self):
            self.w.close()

    return _W()


def quantized_kernels(model: nnx.Module) -> dict[tuple, QuantSpec]:
    """``{key path of a quantized projection: its QuantSpec}``, e.g.
    ``("layers", "self_attn", "q_proj") -> QuantSpec(bits=2, ...)``."""
    return {path: m.spec for path, m in quant_linears(model).items()}


def _get(tree: Mapping, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _layer_stats(w: jax.Array, scale: jax.Array | None, spec: QuantSpec) -> tuple[dict, jax.Array]:
    """Statistics per leading (layer) index of a stacked ``(L, in, out)`` kernel, or of a single
    ``(in, out)`` kernel (as a length-1 axis)."""
    if w.ndim == 2:
        w = w[None]
        scale = None if scale is None else scale[None]
    a = quant.effective_scale(w, scale, spec)
    outside = (w < spec.lo * a[:, None, :]) | (w > spec.hi * a[:, None, :])
    stats = {
        "scale_mean": jnp.mean(a, axis=-1),
        "outside_clip": jnp.mean(outside, axis=(1, 2)),
    }
    return stats, quant.to_codes(w, scale, spec)


class QuantStats:
    """Per-layer quantization statistics of the model's quantized projections, on device."""

    def __init__(self, model: nnx.Module):
        self.layers = quantized_kernels(model)
        self._prev: dict | None = None
        layers = self.layers

        def compute(params, prev):
            stats, codes = {}, {}
            for path, spec in layers.items():
                node = _get(params, path)
                name = ".".join(map(str, path))
                stats[name], codes[name] = _layer_stats(node["kernel"], node.get("scale"), spec)
                if prev is not None:
                    stats[name]["codes_changed"] = jnp.mean(codes[name] != prev[name], axis=(1, 2))
            return stats, codes

        self._compute = jax.jit(compute)

    def __call__(self, params: Mapping) -> dict[str, dict[str, float | None]]:
        """``{"layers.3.self_attn.q_proj": {"scale_mean", "outside_clip", "codes_changed"}}``;
        ``codes_changed`` compares with the codes of the previous call (None at the first)."""
        if not self.layers:
            return {}
        stats, self._prev = self._compute(params, self._prev)
        out: dict[str, dict[str, float | None]] = {}
        for name, s in jax.device_get(stats).items():
            head, _, tail = name.partition(".")
            n = len(s["scale_mean"])
            for i in range(n):
                key = f"{head}.{i}.{tail}" if n > 1 or head == "layers" else name
                out[key] = {
                    "scale_mean": float(s["scale_mean"][i]),
                    "outside_clip": float(s["outside_clip"][i]),
                    "codes_changed": (
                        float(s["codes_changed"][i]) if "codes_changed" in s else None
                    ),
                }
        return out
