"""Hugging Face safetensors folders: streaming load into a (sharded) model, and export.

Loading builds the model abstractly (``nnx.eval_shape``: no random init), then fills each
parameter from the checkpoint one parameter at a time: the per-layer tensors of a stacked
parameter are read one by one (``safe_open``: memory-mapped, no pickle, no remote code) into one
host buffer, which is placed on the mesh right away. Peak host memory is the model plus one
stacked parameter. The names are translated by :data:`paretoq_jax.io.mapping.HF_TABLE`.

Export (:func:`save_hf`) writes ``config.json``, ``model.safetensors`` with the *quantized*
weights as floats (what ``transformers.LlamaForCausalLM.from_pretrained`` loads and runs to the
same logits), and the learned scales in ``quant_scales.safetensors`` with the rules in
``config.json["paretoq"]``, so loading the folder again at the same bits resumes exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from paretoq_jax import quant
from paretoq_jax.errors import ParetoQError
from paretoq_jax.io.mapping import HF_IGNORED, hf_tensors, hf_to_model, model_to_hf
from paretoq_jax.models import Llama, LlamaConfig, QuantRules
from paretoq_jax.models.linears import named, quant_linears
from paretoq_jax.sharding import ShardingRules, variable_sharding

SCALES_FILE = "quant_scales.safetensors"
CONFIG_KEY = "paretoq"


class CheckpointError(ParetoQError, ValueError):
    """A checkpoint that cannot be loaded: the message names the tensor and the file."""


class TensorSource(Protocol):
    """Read-only access to a checkpoint's tensors under their HF names."""

    def names(self) -> Iterable[str]: ...

    def where(self, name: str) -> str: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """Tensors of an HF folder: ``model.safetensors``, or shards listed in the index JSON."""

    def __init__(self, folder: Path, files: list[str] | None = None):
        from safetensors import safe_open

        self.folder = folder
        if files is None:
            files = self._list_files(folder)
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for f in files:
            path = folder / f
            if not path.exists():
                raise CheckpointError(f"checkpoint file {path} is missing (listed in the index)")
            try:
                handle = safe_open(str(path), framework="numpy")
                keys = list(handle.keys())
            except Exception as e:  # SafetensorError: truncated or corrupt header
                raise CheckpointError(
                    f"cannot read {path}: {e} (truncated or not a safetensors file? "
                    "re-download or re-save it)"
                ) from None
            self._check_size(path)
            self._handles[f] = handle
            for k in keys:
                self._file_of[k] = f

    @staticmethod
    def _list_files(folder: Path) -> list[str]:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        files = sorted(p.name for p in folder.glob("*.safetensors") if p.name != SCALES_FILE)
        if not files:
            found = sorted(p.name for p in folder.iterdir())
            raise CheckpointError(
                f"no *.safetensors weights in {folder} (found {found}); only safetensors "
                "checkpoints are loaded (never pickled .bin files): convert with "
                "transformers' save_pretrained(safe_serialization=True)"
            )
        return files

    @staticmethod
    def _check_size(path: Path) -> None:
        """safetensors validates lazily; check that the data the header promises is there."""
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        size = path.stat().st_size
        if size < 8 + n + end:
            raise CheckpointError(
                f"{path} is truncated: header promises {8 + n + end} bytes, file has {size}; "
                "re-download or re-save it"
            )

    def names(self) -> Iterable[str]:
        return self._file_of.keys()

    def where(self, name: str) -> str:
        return str(self.folder / self._file_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self._file_of[name]].get_tensor(name)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {
        ".".join(map(str, path)): var
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def assemble_model(
    config: LlamaConfig,
    source: TensorSource,
    *,
    quant_rules: QuantRules,
    saved_rules: QuantRules | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
    scale_init: str = "paretoq",
    **model_kwargs,
) -> Llama:
    """A :class:`Llama` whose parameters come from ``source`` (HF names), placed on ``mesh``.

    Learned scales come from the checkpoint when it holds them for the same (bits, method)
    (``saved_rules``); otherwise ``scale_init`` of the loaded kernel: ``paretoq`` (ParetoQ's
    ``init_scale``) or ``mse`` (``quant.mse_scale``, the least-squares scale).
    """
    if scale_init not in quant.SCALE_INITS:
        raise ValueError(f"scale_init {scale_init!r} is not one of {sorted(quant.SCALE_INITS)}")
    abstract = nnx.eval_shape(
        lambda: Llama(
            config, quant=quant_rules, dtype=dtype, param_dtype=param_dtype,
            rngs=nnx.Rngs(0), **model_kwargs,
        )
    )  # fmt: skip
    params = _flat_params(abstract)
    layers = config.num_hidden_layers

    # 1. Plan: every checkpoint tensor -> (parameter, layer); unknown names are errors.
    plan: dict[str, dict[int | None, tuple[str, bool]]] = {}
    for name in source.names():
        if any(p.fullmatch(name) for p in HF_IGNORED):
            continue
        hit = hf_to_model(name)
        if hit is None:
            raise CheckpointError(
                f"unexpected tensor {name!r} in {source.where(name)}: not a parameter of a "
                f"{config.architecture} (expected names like "
                "'model.layers.0.self_attn.q_proj.weight'); is the checkpoint misnamed?"
            )
        path, layer, transpose = hit
        if path == "lm_head.kernel" and config.tie_word_embeddings:
            continue  # tied: HF ignores a stored copy of the embeddings too
        if path.endswith(".scale"):
            continue  # handled in step 3
        if path not in params:
            raise CheckpointError(
                f"tensor {name!r} in {source.where(name)} has no place in this model "
                f"(parameter {path!r} does not exist for this config.json: check "
                "attention_bias / mlp_bias / tie_word_embeddings)"
            )
        if layer is not None and layer >= layers:
            raise CheckpointError(
                f"tensor {name!r} in {source.where(name)} is for layer {layer}, but "
                f"config.json says num_hidden_layers={layers}"
            )
        plan.setdefault(path, {})[layer] = (name, transpose)

    # 2. Fill every parameter (except scales), one at a time, and place it.
    values: dict[str, jax.Array] = {}
    for path, var in params.items():
        if path.endswith(".scale"):
            continue
        stacked = path.startswith("layers.")
        want = range(layers) if stacked else [None]
        got = plan.get(path, {})
        missing = [i for i in want if i not in got]
        if missing:
            example = model_to_hf(path, missing[0])[0]
            raise CheckpointError(
                f"missing tensor {example!r} (model parameter {path!r}"
                + (f", layers {missing}" if stacked else "")
                + ") in the checkpoint; is it misnamed or from another architecture?"
            )
        buf = np.empty(var.shape, _np_dtype(param_dtype))
        for i in want:
            name, transpose = got[i]
            expect = var.shape[1:] if stacked else var.shape
            shape = source.shape(name)
            if (shape[::-1] if transpose else shape) != tuple(expect):
                want_hf = tuple(expect)[::-1] if transpose else tuple(expect)
                raise CheckpointError(
                    f"tensor {name!r} in {source.where(name)} has shape {shape}, expected "
                    f"{want_hf} from config.json (hidden_size={config.hidden_size}, "
                    f"intermediate_size={config.intermediate_size}, "
                    f"heads={config.num_attention_heads}/{config.num_key_value_heads}, "
                    f"vocab_size={config.vocab_size})"
                )
            arr = source.get(name)
            if transform is not None:
                arr = transform(name, arr)
            arr = arr.T if transpose else arr
            if stacked:
                buf[i] = arr
            else:
                buf[...] = arr
        values[path] = _place(buf, var, mesh, rules)
        del buf

    # 3. Scales: kept from a QAT checkpoint with the same settings, else ParetoQ's init.
    for path, linear in named(quant_linears(abstract, quantized=False)).items():
        if linear.scale is None:
            continue
        kernel = values[f"{path}.kernel"]
        spec_path = f"layers.0.{path[len('layers.') :]}" if path.startswith("layers.") else path
        saved = None
        if saved_rules is not None and saved_rules.spec_for(spec_path) == linear.spec:
            saved = _read_scales(source, path, linear.scale.shape, layers)
        if saved is None:
            init = quant.SCALE_INITS[scale_init]
            scale = jax.jit(init, static_argnums=1)(kernel, linear.spec)
            scale = np.asarray(scale, _np_dtype(param_dtype))
        else:
            scale = saved.astype(_np_dtype(param_dtype))
        values[f"{path}.scale"] = _place(scale, linear.scale, mesh, rules)

    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    filled = [(p, v.replace(values[".".join(map(str, p))])) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _read_scales(source: TensorSource, path: str, shape, layers: int) -> np.ndarray | None:
    if path.startswith("layers."):
        names = [model_to_hf(f"{path}.scale", i)[0] for i in range(layers)]
    else:
        names = [model_to_hf(f"{path}.scale")[0]]
    have = set(source.names())
    if not all(n in have for n in names):
        return None
    arrs = [source.get(n) for n in names]
    out = np.stack(arrs) if path.startswith("layers.") else arrs[0]
    if out.shape != tuple(shape):
        raise CheckpointError(
            f"scale {names[0]!r} in {source.where(names[0])} has shape {out.shape}, expected "
            f"{tuple(shape)}"
        )
    return out


def _place(buf: np.ndarray, var: nnx.Variable, mesh: Mesh | None, rules: ShardingRules | None):
    if mesh is None:
        return jnp.asarray(buf)
    return jax.device_put(buf, variable_sharding(var, mesh, rules))


class _ScaleSource:
    """A checkpoint's tensors plus the scales file, behind one TensorSource."""

    def __init__(self, main: SafetensorsSource, scales: SafetensorsSource):
        self.main, self.scales = main, scales
        self._scale_names = set(scales.names())

    def _pick(self, name: str) -> SafetensorsSource:
        return self.scales if name in self._scale_names else self.main

    def names(self) -> Iterable[str]:
        return [*self.main.names(), *self._scale_names]

    def where(self, name: str) -> str:
        return self._pick(name).where(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._pick(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._pick(name).get(name)


def load_hf(
    folder: str | Path,
    *,
    quant_rules: QuantRules,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    **model_kwargs,
) -> Llama:
    """Loads an HF folder (``config.json`` + safetensors, sharded index too)."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    config = LlamaConfig.from_hf(raw)
    source: TensorSource = SafetensorsSource(folder)
    saved_rules = None
    if (folder / SCALES_FILE).exists():
        saved_rules = QuantRules.from_list(raw.get(CONFIG_KEY, {}).get("quant_rules", []))
        source = _ScaleSource(source, SafetensorsSource(folder, [SCALES_FILE]))
    return assemble_model(
        config, source, quant_rules=quant_rules, saved_rules=saved_rules, dtype=dtype,
        param_dtype=param_dtype, mesh=mesh, rules=rules, **model_kwargs,
    )  # fmt: skip


def save_hf(model: Llama, out_dir: str | Path, *, tokenizer=None, dtype=None) -> Path:
    """Writes an HF folder that ``transformers`` loads: quantized weights as floats (``dtype``:
    default the parameters' dtype), learned scales and rules alongside, tokenizer if given."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = _flat_params(model)
    linears = named(quant_linears(model, quantized=False))
    layers = model.config.num_hidden_layers
    tensors: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    for path, var in params.items():
        module_path, _, leaf = path.rpartition(".")
        if leaf == "kernel" and module_path in linears:
            value = linears[module_path].weight()  # what the forward multiplies by
        else:
            value = var[...]
        value = np.asarray(jax.device_get(value))
        if dtype is not None and leaf != "scale":
            value = value.astype(_np_dtype(dtype))
        target = scales if leaf == "scale" else tensors
        target.update(hf_tensors(path, value, layers))

    config = model.config.to_hf()
    stored = next(iter(tensors.values())).dtype
    config["torch_dtype"] = config["dtype"] = (
        "bfloat16" if stored == ml_dtypes.bfloat16 else str(stored)
    )
    if model.rules.rules:
        config[CONFIG_KEY] = {
            "quant_rules": model.rules.to_list(),
            "weights": "fake-quantized floats; learned scales in " + SCALES_FILE,
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / SCALES_FILE).unlink(missing_ok=True)
    if scales:
        save_file(scales, str(out / SCALES_FILE), metadata={"format": "paretoq"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
