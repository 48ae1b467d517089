"""Compile the exact train step for a TPU topology from abstract shapes; memory, FLOPs, collectives.

``plan(cfg, topology)`` builds what ``python -m paretoq_jax.train`` would run (the model with its
QAT specs, the distillation teacher, AdamW, the shardings, remat / scan, gradient accumulation:
``run.build.model_factory`` and ``train.loop.make_step_for``) from ``nnx.eval_shape`` shapes only,
compiles it for compile-only TPU devices (``jax.experimental.topologies``) and reads:

- memory: ``compiled.memory_analysis()`` per device (arguments, outputs, temporaries), and the
  parameter / optimizer-state bytes per device from their shardings;
- FLOPs and HBM bytes per step: ``cost_analysis()`` counts a ``while`` body (a ``lax.scan`` over
  layers or micro-batches) once, so they come from two extra compiles of the same step with 1
  and 2 unrolled layers on one micro-batch, extrapolated linearly to ``L`` layers and multiplied
  by ``train.grad_accum`` (less the optimizer update, compiled alone, counted once); the loops
  left in those compiles (XLA:TPU's collective-matmul loops on 8+ chips) are added from the HLO
  (``hlo.loop_cost``);
- collectives: bytes per device per step from the optimized HLO (``paretoq_jax.hlo``, loops counted by
  their trip counts).
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from paretoq_jax import hlo
from paretoq_jax.errors import ParetoQError
from paretoq_jax.io import load_model_config
from paretoq_jax.models import attention
from paretoq_jax.models.config import LlamaConfig
from paretoq_jax.outputs import atomic_output
from paretoq_jax.parallel import code_gather
from paretoq_jax.run.build import build_mesh, model_factory, param_shardings
from paretoq_jax.run.checkpoint import abstract_like
from paretoq_jax.run.config import RunConfig
from paretoq_jax.run.state import abstract_state
from paretoq_jax.sharding import num_slices
from paretoq_jax.train.loop import make_step_for

from .chips import Chip, chip_for
from .table import flops_suspect

__all__ = [
    "PlanError", "HBMError", "plan", "tpu_devices", "gpu_devices", "architecture", "MODELS_DIR",
    "GPU_TARGETS", "traffic", "weight_gather_bytes", "count_flops", "add_roofline",
    "compile_layers",
]  # fmt: skip

MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
# XLA GpuTargetConfigProto text of each GPU the planner compiles for (configs/gpu/)
GPU_TARGETS = {"h100": Path(__file__).resolve().parents[2] / "configs" / "gpu" / "h100_sxm.txtpb"}


class PlanError(ParetoQError, ValueError):
    """The plan cannot be made (bad topology, missing architecture, missing libtpu)."""


class HBMError(PlanError):
    """The step does not fit the chip's HBM; the message says what to change."""


def tpu_devices(topology: str, slices: int = 1) -> list:
    """Compile-only devices of a TPU ``topology`` (e.g. ``v5p:4x4x4``) times ``slices``."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no lock: nothing runs on a TPU
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError(
            "compiling for TPU topologies needs libtpu: pip install -e '.[tpu]' "
            "(jax[tpu] at the project's jax version)"
        ) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, num_slices=slices
        )
    except Exception as e:  # libtpu's error names the bad field
        raise PlanError(
            f"unknown TPU topology {topology!r} (e.g. v5p:4x4x4, v5e:4x4): {e}"
        ) from None
    return list(desc.devices)


def gpu_devices(spec: str) -> list:
    """Compile-only GPUs of ``spec`` = ``<gpu>:<slices>x<hosts>x<gpus per host>`` (e.g.
    ``h100:1x2x8``: 2 nodes of 8 H100), from XLA's GPU target config (``GPU_TARGETS``)."""
    gpu, _, shape = spec.partition(":")
    target = GPU_TARGETS.get(gpu.lower())
    if target is None or not re.fullmatch(r"\d+x\d+x\d+", shape):
        raise PlanError(
            f"--gpu {spec!r}: expected <gpu>:<slices>x<hosts>x<gpus per host> with <gpu> one of "
            f"{sorted(GPU_TARGETS)} (e.g. h100:1x2x8 for 2 nodes of 8 GPUs)"
        )
    # compile-only: no CUDA runtime or driver here, so the plugin must not check their versions
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        raise PlanError(
            "compiling for GPUs without a GPU needs XLA's CUDA plugin: pip install -e "
            "'.[gpu-plan]' (jax-cuda12-plugin and jax-cuda12-pjrt at the project's jax version)"
        ) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="cuda", topology_name="gpu", topology=shape,
            target_config=target.read_text(),
        )  # fmt: skip
    except Exception as e:
        raise PlanError(f"XLA could not make the GPU topology {spec!r}: {e}") from None
    return list(desc.devices)


def architecture(path: str) -> LlamaConfig:
    """The ``LlamaConfig`` of ``model.path``: a local folder / ``.gguf``, else the committed
    ``configs/models/<hub id>/config.json`` (offline; no weights)."""
    local = MODELS_DIR / path / "config.json"
    if local.exists():
        return LlamaConfig.from_json(local)
    if Path(path).exists():
        return load_model_config(path)
    raise PlanError(
        f"no architecture for model.path={path!r}: not a local folder or file, and no "
        f"{local}. Add the model's config.json there (or point model.path at a folder with one)."
    )


class _Abstract(NamedTuple):
    """What :func:`_abstract_args` builds: the jitted step and its abstract arguments (with
    NamedShardings), the optimizer and the abstract train state, how many quantized linears
    gather packed codes, and what attention runs as (``xla``, or the fused kernel's name,
    ``splash`` / ``cudnn``, when the model's layers run one)."""

    fn: Any
    args: list[Any]
    tx: Any
    state: Any
    gathering: int
    attention: str


def _abstract_args(
    cfg: RunConfig,
    mesh: jax.sharding.Mesh,
    arch: LlamaConfig,
    teacher_arch: LlamaConfig | None,
) -> _Abstract:
    """``cfg``'s train step built from abstract shapes on ``mesh`` (compute dtype for the
    mesh's platform, as ``train`` builds it there)."""
    backend = "gpu" if mesh.devices.flat[0].platform == "gpu" else "tpu"
    model = nnx.eval_shape(model_factory(cfg, backend=backend, config=arch))
    # as `train` does: under FSDP the quantized linears gather packed codes (mesh.gather_codes)
    gathering = code_gather.configure(model, mesh, cfg.mesh.gather_codes, keep=cfg.mesh.keep_codes)
    attention.configure(model, mesh, cfg.model.attention)
    kind = attention.runs(model, cfg.data.train_len)
    teacher = None
    if cfg.train.uses_teacher:
        teacher = nnx.eval_shape(
            model_factory(cfg, teacher=True, backend=backend, config=teacher_arch)
        )
        attention.configure(teacher, mesh, cfg.model.attention)
    step, tx = make_step_for(cfg, mesh, model, teacher)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = abstract_state(params, tx, step.state_shardings)
    tokens = jax.ShapeDtypeStruct(
        (cfg.train.batch_size, cfg.data.train_len), jnp.int32, sharding=step.batch_sharding
    )
    args: list[Any] = [state, {"tokens": tokens}]
    if teacher is not None:
        t_params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
        args.append(abstract_like(t_params, param_shardings(teacher, mesh)))
    return _Abstract(step.fn, args, tx, state, gathering, kind)


def _device_bytes(tree: Any) -> float:
    """Bytes one device holds of the abstract arrays in ``tree`` (from their shardings)."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


_USED = re.compile(
    r"required for (.*?) \(([0-9.]+[KMGT]?)\) exceeds available HBM \(([0-9.]+[KMGT]?)\)"
)


def _compile(fn, args, *, what: str, cfg: RunConfig, mesh, topology: str, chip: Chip):
    try:
        return fn.lower(*args).compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when HBM overflows
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds available" not in text.lower():
            raise
        m = _USED.search(text)
        used = (
            f"XLA needs {m[2]}B per chip for {m[1]}, {m[3]}B are available"
            if m
            else "XLA ran out of HBM"
        )
        raise HBMError(hbm_advice(cfg, mesh, topology, chip, used, what)) from None


def hbm_advice(cfg: RunConfig, mesh, topology: str, chip: Chip, used: str, what: str) -> str:
    """The one-paragraph HBM overflow message: what overflowed and what to change."""
    shape = dict(mesh.shape)
    n = math.prod(shape.values())
    remat = "" if cfg.model.remat else "turn on model.remat=true (recompute layer activations), "
    scan = "" if cfg.model.scan_layers else "model.scan_layers=true, "
    keep = ""
    gathers = code_gather.gather_mode(cfg.mesh.gather_codes) != "off"
    if cfg.model.remat and cfg.mesh.keep_codes and gathers and cfg.model.bits < 16:
        keep = "mesh.keep_codes=false (remat then gathers the packed codes again), "
    per_dev = cfg.train.batch_size // max(shape["data"] * shape["fsdp"] * cfg.train.grad_accum, 1)
    return (
        f"{what} does not fit {topology} ({n} chips of {chip.hbm_bytes / 2**30:.0f} GiB HBM): "
        f"{used}. Mesh {shape}. Reduce what each chip holds: shard parameters and optimizer "
        f"state over more chips (mesh.fsdp={shape['fsdp']} -> larger, mesh.data smaller), split "
        f"heads / MLP / vocabulary and their activations with tensor parallelism "
        f"(mesh.tensor={shape['tensor']} -> 2, 4 or 8), {remat}{scan}{keep}or raise train.grad_accum "
        f"(now {cfg.train.grad_accum}; {per_dev} sequences per chip per micro-batch) so "
        f"activations shrink; or plan a larger topology."
    )


GPU_MEM_FRACTION = 0.75  # JAX's default share of a GPU's memory for its allocator


def gpu_mem_fraction() -> tuple[float, str]:
    """The share of a GPU's memory JAX's allocator may use, and where it comes from:
    ``$XLA_CLIENT_MEM_FRACTION`` (or the deprecated ``$XLA_PYTHON_CLIENT_MEM_FRACTION``) as
    the planning process sees it, else JAX's default of 75% (docs: GPU memory allocation)."""
    for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        value = os.environ.get(var)
        if value:
            try:
                frac = float(value)
            except ValueError:
                raise PlanError(f"${var}={value!r} is not a number (a share such as .9)") from None
            if not 0 < frac <= 1:
                raise PlanError(f"${var}={value} must be in (0, 1]")
            return frac, f"${var}={value}"
    return GPU_MEM_FRACTION, "JAX's default, $XLA_CLIENT_MEM_FRACTION unset"


def model_flops_per_token(arch: LlamaConfig, seq: int) -> float:
    """``6 N + 12 L H Dh S`` (PaLM's MFU convention): N = weights in matmuls, LM head included;
    attention scores and values over the full sequence ``S``."""
    d, f, L = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    n = L * (d * q + 2 * d * kv + q * d + 3 * d * f) + d * arch.vocab_size
    return 6 * n + 12 * L * q * seq


def _cost(compiled, window: int | None = None) -> tuple[float, float]:
    """FLOPs and HBM bytes of one run: ``cost_analysis()`` plus what it misses inside ``while``
    loops (XLA:TPU's collective-matmul loops; ``hlo.loop_cost``) and inside splash attention
    kernels (``window``: the model's sliding window)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, list):
        ca = ca[0]
    text = compiled.as_text()
    missed = hlo.loop_cost(text)
    kf, kb = splash_cost(text, window)
    flops, nbytes = float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))
    return flops + missed.flops + kf, nbytes + missed.bytes + kb


def splash_cost(text: str, window: int | None = None) -> tuple[float, float]:
    """FLOPs and HBM bytes inside the splash attention kernels of an optimized HLO module,
    which ``cost_analysis()`` does not count (it counts a custom call's operand and result
    bytes, once per loop body; ``hlo.loop_cost`` adds the loop repeats of those). Each call
    (``splash_mha_fwd`` / ``_dq`` / ``_dkv``) is costed by ``models.attention.kernel_cost``
    from its query / key operands ``(batch, heads, seq, head_dim)`` and its block count (the
    mask-info operand ``s8[1, n, n]``)."""
    flops = nbytes = 0.0
    if "splash_m" not in text:  # no kernel: skip parsing the module once more
        return flops, nbytes
    for call in hlo.custom_calls(text):
        kind = _SPLASH.match(call.name)
        if not kind:
            continue
        quads = [(dt, shape) for dt, shape in call.operands if len(shape) == 4]
        blocks = [shape[-1] for dt, shape in call.operands if dt == "s8" and len(shape) == 3]
        if len(quads) < 2:
            raise PlanError(f"splash kernel {call.name} without (batch, heads, seq, dim) operands")
        (dtype, (b, h, s, d)), kv = quads[0], quads[1][1][1]
        block = s // blocks[0] if blocks else s
        f, nb = attention.kernel_cost(
            kind[1], b, h, s, d, kv, window, block, hlo.DTYPE_BYTES[dtype]
        )
        flops += call.count * f
        nbytes += call.count * max(nb - call.io_bytes, 0.0)
    return flops, nbytes


_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dq|dkv)")


def _variant(cfg: RunConfig, **changes: Any) -> RunConfig:
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(out, section), name, value)
    return out


def _optimizer_cost(tx, state, mesh, compile_kw) -> tuple[float, float]:
    """FLOPs and bytes of the update that ends every step (gradients in, new state out)."""

    def update(state, grads):
        grads = jax.tree.map(lambda g: g / 2.0, grads)
        norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return optax.apply_updates(state["params"], updates), opt_state, norm

    fn = jax.jit(update)
    return _cost(_compile(fn, [state, state["params"]], **compile_kw))


def compile_layers(
    cfg: RunConfig,
    mesh: jax.sharding.Mesh,
    arch: LlamaConfig,
    teacher_arch: LlamaConfig | None,
    layers: int,
    compile_kw: dict[str, Any],
) -> tuple[Any, int]:
    """``(compiled step, linears gathering codes)`` of ``cfg``'s step with ``layers`` unrolled
    decoder layers (student and teacher), no gradient accumulation: the small compiles whose
    difference is one layer's cost (``cost_analysis()`` counts a scanned body once)."""
    micro = _variant(
        cfg, train__batch_size=cfg.train.batch_size // cfg.train.grad_accum,
        train__grad_accum=1, model__scan_layers=False,
    )  # fmt: skip
    a = dataclasses.replace(arch, num_hidden_layers=layers)
    t = teacher_arch and dataclasses.replace(teacher_arch, num_hidden_layers=layers)
    built = _abstract_args(micro, mesh, a, t)
    return _compile(built.fn, built.args, **compile_kw), built.gathering


def step_cost(cfg, mesh, arch, teacher_arch, compile_kw, compiled=None) -> tuple[float, float]:
    """Per-device FLOPs and HBM bytes of one whole step (see the module docstring);
    ``compiled``: the step itself, whose own count is exact when nothing is scanned."""
    k, L = cfg.train.grad_accum, arch.num_hidden_layers
    if compiled is not None and k == 1 and not cfg.model.scan_layers:
        return _cost(compiled, arch.sliding_window)
    (f1, b1), (f2, b2) = (
        _cost(compile_layers(cfg, mesh, arch, teacher_arch, n, compile_kw)[0], arch.sliding_window)
        for n in (1, 2)
    )
    flops, nbytes = f1 + (L - 1) * (f2 - f1), b1 + (L - 1) * (b2 - b1)
    if k > 1:
        built = _abstract_args(cfg, mesh, arch, teacher_arch)
        of, ob = _optimizer_cost(built.tx, built.state, mesh, compile_kw)
        flops, nbytes = k * flops - (k - 1) * of, k * nbytes - (k - 1) * ob
    return flops, nbytes


_INDEX_DTYPES = ("s32", "s64", "pred")  # token ids, positions, masks (codes are unsigned)


def traffic(found: list[hlo.Collective], arch: LlamaConfig, tensor: int = 1) -> dict[str, dict]:
    """Collective bytes sent per chip per step by what they move (``hlo.Collective.role``):
    ``"weights <dtype>"``: gathers of the decoder linears' weights (packed codes, which XLA
    gathers as ``u8`` or as ``u32`` words, and ``f32`` scales with code gathering; ``bf16``
    kernels without), ``"embedding"``: gathers of the embedding / LM head, ``"indices"``:
    signed integer gathers (token ids), ``"reductions"``: all-reduces and reduce-scatters
    (gradients, Megatron activations, the loss), ``"other"``: all-to-all and permutes. Forward
    and rematerialized gathers both count (the backward recomputes them)."""
    embed = arch.vocab_size * arch.hidden_size
    embed_sizes = {embed, embed // max(tensor, 1)}

    def classify(c: hlo.Collective, dtype: str, shape: tuple[int, ...]) -> str:
        if c.role != "gather":
            return "reductions" if c.role == "reduce" else "other"
        if dtype in _INDEX_DTYPES:
            return "indices"
        return "embedding" if math.prod(shape) in embed_sizes else f"weights {dtype}"

    return hlo.summarize_roles(found, classify)


def weight_gather_bytes(split: dict[str, dict]) -> float:
    """Bytes one chip sends per step gathering the decoder linears' weights (``traffic``)."""
    return sum(v["bytes"] for k, v in split.items() if k.startswith("weights "))


def _write_hlo(path: str | os.PathLike, text: str) -> None:
    """Keep the optimized HLO text at ``path`` (gzip when it ends in ``.gz``), written
    atomically and only over an earlier HLO dump (``outputs.check_output``)."""
    with atomic_output(path, "hlo", directory=False, flag="--hlo") as tmp:
        opener = gzip.open if Path(path).suffix == ".gz" else open
        with opener(tmp, "wt") as f:
            f.write(text)


def add_roofline(out: dict[str, Any], flops: float, nbytes: float) -> dict[str, Any]:
    """Put a step's per-device FLOPs and HBM bytes into the plan ``out`` (a :func:`plan` dict)
    with the roofline they imply: compute, HBM and collective times, the step time with the
    collectives overlapped (max) and serial (sum), MFU and tokens/s."""
    chip = chip_for(out["topology"])
    t = out["time"]
    t_flops = flops / chip.peak_flops
    t_hbm = nbytes / (chip.hbm_GBps * 1e9)
    t_coll = t["collectives_ici_s"] + t["collectives_dcn_s"]
    t_overlap = max(t_flops, t_hbm, t_coll)
    t_serial = max(t_flops, t_hbm) + t_coll
    out["flops_per_device"] = flops
    out["hbm_bytes_per_device"] = nbytes
    t.update(
        compute_s=t_flops,
        hbm_s=t_hbm,
        step_overlapped_s=t_overlap,
        step_serial_s=t_serial,
        collective_share=t_coll / t_serial if t_serial else 0.0,
    )
    tokens = out["batch"] * out["seq_len"]
    mf_dev = out["model_flops_per_step"] / out["devices"]
    out["flops_suspect"] = flops_suspect(out)
    out["mfu"] = mf_dev / (chip.peak_flops * t_overlap) if t_overlap else 0.0
    out["mfu_serial"] = mf_dev / (chip.peak_flops * t_serial) if t_serial else 0.0
    out["tokens_per_s"] = tokens / t_overlap if t_overlap else 0.0
    return out


def count_flops(
    cfg: RunConfig, topology: str, slices: int = 1, *, name: str = "the step"
) -> tuple[float, float]:
    """Per-device FLOPs and HBM bytes of ``cfg``'s whole step on ``topology`` from the small
    compiles of :func:`step_cost` alone (1 and 2 unrolled layers), without compiling the whole
    step: what ``plan(count_flops=True)`` adds to a plan that is already known to fit."""
    chip = chip_for(topology)
    if topology.split(":")[0].lower() in GPU_TARGETS:
        raise PlanError(
            "no FLOP count on GPUs: XLA:GPU has no cost_analysis() for compile-only devices"
        )
    devices = tpu_devices(topology, slices)
    try:
        mesh = build_mesh(cfg, devices)
    except ValueError as e:
        raise PlanError(str(e)) from None
    arch = architecture(cfg.model.path)
    teacher_arch = architecture(cfg.model.teacher) if cfg.model.teacher else arch
    compile_kw = dict(what=name, cfg=cfg, mesh=mesh, topology=topology, chip=chip)
    return step_cost(cfg, mesh, arch, teacher_arch, compile_kw)


def plan(
    cfg: RunConfig,
    topology: str,
    slices: int = 1,
    *,
    count_flops: bool = True,
    name: str = "the step",
    hlo_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compile ``cfg``'s train step for ``topology`` x ``slices``; returns the plan as a dict
    (see ``docs/scale.md``). Raises ``HBMError`` when it does not fit. ``hlo_out``: also keep
    the optimized HLO text there (gzip when it ends in ``.gz``) to re-read its collectives."""

    chip = chip_for(topology)
    on_gpu = topology.split(":")[0].lower() in GPU_TARGETS
    if on_gpu and slices != 1:
        raise PlanError("--slices is for TPUs; give GPU nodes as <gpu>:1x<nodes>x<gpus per node>")
    devices = gpu_devices(topology) if on_gpu else tpu_devices(topology, slices)
    # the share of a chip's memory a run gets (read before the compile: a bad value is an error)
    frac, source = gpu_mem_fraction() if on_gpu else (1.0, "")
    if on_gpu:
        count_flops = False  # XLA:GPU has no cost_analysis() for compile-only devices
    try:
        mesh = build_mesh(cfg, devices)
    except ValueError as e:
        raise PlanError(str(e)) from None
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"] * cfg.train.grad_accum
    if cfg.train.batch_size % n_batch:
        raise PlanError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by mesh.data x mesh.fsdp "
            f"x train.grad_accum = {n_batch} (mesh {dict(mesh.shape)})"
        )
    arch = architecture(cfg.model.path)
    teacher_arch = architecture(cfg.model.teacher) if cfg.model.teacher else arch
    compile_kw = dict(what=name, cfg=cfg, mesh=mesh, topology=topology, chip=chip)

    built = _abstract_args(cfg, mesh, arch, teacher_arch)
    fn, args, state, gathering = built.fn, built.args, built.state, built.gathering
    compiled = _compile(fn, args, **compile_kw)
    text = compiled.as_text()
    if hlo_out is not None:
        _write_hlo(hlo_out, text)
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
    )  # fmt: skip
    # XLA:GPU compiles past the device memory, and XLA:TPU checks its temporaries alone against
    # HBM (Llama-3 8B on 4 v5p chips compiled with 22 GiB of state + 82 GiB of temporaries in
    # 95 GiB): compare the whole peak here, on a GPU with what JAX's allocator may use (75% of
    # the memory unless the run sets a fraction).
    if peak > frac * chip.hbm_bytes:
        io = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        parts = (
            f"{io / 2**30:.1f} GiB of arguments and outputs + "
            f"{mem.temp_size_in_bytes / 2**30:.1f} GiB of temporaries"
        )
        used = f"the compiled step needs {peak / 2**30:.1f} GiB per chip ({parts})"
        if on_gpu:
            used += (
                f"; JAX's allocator may use {frac:.0%} of a GPU's memory ({source}): "
                f"{frac * chip.hbm_bytes / 2**30:.1f} GiB"
            )
        raise HBMError(hbm_advice(cfg, mesh, topology, chip, used, name))
    n = len(devices)
    slice_of = [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]
    found = hlo.collectives(text, n, num_slices(devices))
    coll = hlo.summarize(found, slice_of if num_slices(devices) > 1 else None)
    codes = hlo.summarize([c for c in found if code_gather.SCOPE in c.op_name])
    split = traffic(found, arch, mesh.shape["tensor"])
    t_ici = sum(v["bytes"] for k, v in coll.items() if "DCN" not in k) / (chip.ici_GBps * 1e9)
    t_dcn = sum(v["bytes"] for k, v in coll.items() if "DCN" in k) / (chip.dcn_GBps * 1e9)

    tokens = cfg.train.batch_size * cfg.data.train_len
    mf_token = model_flops_per_token(arch, cfg.data.train_len)
    out: dict[str, Any] = {
        "topology": topology,
        "slices": slices,
        "chip": chip.name,
        "devices": n,
        "mesh": dict(mesh.shape),
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.train_len,
        "grad_accum": cfg.train.grad_accum,
        "remat": cfg.model.remat,
        "scan_layers": cfg.model.scan_layers,
        "attention": built.attention,
        "bits": cfg.model.bits,
        "method": cfg.model.method,
        "distill": cfg.train.uses_teacher,
        "bytes": {
            "params": _device_bytes(state["params"]),
            "optimizer": _device_bytes(state["opt_state"]),
            "arguments": float(mem.argument_size_in_bytes),
            "outputs": float(mem.output_size_in_bytes),
            "aliased": float(mem.alias_size_in_bytes),
            "temporaries": float(mem.temp_size_in_bytes),
            "code": float(mem.generated_code_size_in_bytes),
            "peak": float(peak),
            "hbm": float(chip.hbm_bytes),
            # what JAX's allocator may use of it: all of a TPU's HBM, a share of a GPU's
            "usable": float(frac * chip.hbm_bytes),
        },
        "collectives": coll,
        "gather_codes": {
            "mode": code_gather.gather_mode(cfg.mesh.gather_codes),
            "linears": gathering,  # quantized linears that all-gather packed codes
            "keep": cfg.mesh.keep_codes,  # kept for the backward under remat
            "bytes": sum(v["bytes"] for v in codes.values()),  # their gathers, sent / chip
        },
        "traffic": split,
        "weight_gather_bytes": weight_gather_bytes(split),
        "model_flops_per_token": mf_token,
        "model_flops_per_step": mf_token * tokens,
        "time": {"collectives_ici_s": t_ici, "collectives_dcn_s": t_dcn},
    }
    if count_flops:
        add_roofline(out, *step_cost(cfg, mesh, arch, teacher_arch, compile_kw, compiled))
    return out
