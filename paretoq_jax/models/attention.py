"""Causal self-attention: the XLA formulation every platform runs, and two fused kernels.

``dot_attention`` is the reference: scores ``q k^T / sqrt(d)`` in float32 over an explicit mask,
softmax, then ``p v``. It materializes ``(B, heads, S, T)`` scores, which at ``S = 2048`` is what
makes small models' training steps HBM-bound on TPU (docs/scale.md).

``Splash`` runs the same causal (or sliding-window) attention as the fused Pallas TPU kernel of
``jax.experimental.pallas.ops.tpu.splash_attention``: online softmax over blocks of keys, blocks
the mask leaves empty skipped, no ``(S, S)`` array in HBM, forward and backward. On a CPU mesh
the kernel runs in Pallas interpret mode: slow, exact, for checking numerics
(tests/test_attention.py). ``Cudnn`` is the GPU counterpart: cuDNN's fused (flash) attention
through ``jax.nn.dot_product_attention(implementation="cudnn")``. Under a device mesh both run
per device through ``shard_map`` (batch over ``data`` x ``fsdp``, heads over ``tensor``, as the
activation rules of :mod:`paretoq_jax.sharding` say).

``configure(model, mesh, mode)`` picks per model (``model.attention``): ``auto`` is splash on TPU
meshes, cuDNN on GPU meshes (bf16 / fp16 compute, head_dim a multiple of 8 up to 128) and XLA
elsewhere; ``splash`` / ``cudnn`` / ``xla`` force one. Only the uncached training / evaluation
path with the model's own causal mask is fused; KV-cache decoding and explicit masks always run
``dot_attention``. The splash kernel's FLOPs are invisible to ``cost_analysis()``;
``kernel_cost`` gives them to the planner.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jax.sharding import Mesh, PartitionSpec

from paretoq_jax.sharding import logical_to_spec

__all__ = [
    "ATTENTION_MODES",
    "AttentionMode",
    "Cudnn",
    "Splash",
    "block_size",
    "causal_mask",
    "configure",
    "dot_attention",
    "cudnn_available",
    "cudnn_takes",
    "kernel_cost",
    "mesh_platform",
    "resolve",
    "runs",
]

AttentionMode = Literal["auto", "xla", "splash", "cudnn"]
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)
_LANES = 128  # splash blocks are multiples of the TPU's 128 lanes


def causal_mask(seq: int, window: int | None = None) -> Array:
    """``(S, S)`` bool: query ``i`` sees key ``j`` iff ``j <= i`` (and ``i - j < window``)."""
    q, k = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    return mask


def dot_attention(q: Array, k: Array, v: Array, mask: Array, dtype) -> Array:
    """Grouped-query attention: ``q (B, S, kv, g, d)``, ``k, v (B, T, kv, d)``, ``mask``
    broadcasting to ``(B, kv, g, S, T)`` -> ``(B, S, kv, g, d)`` (heads share K/V in groups of
    ``g``; K/V are never repeated)."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v)


def block_size(seq: int, largest: int = 512) -> int | None:
    """The splash block (queries and keys alike): the largest multiple of 128 up to ``largest``
    dividing ``seq``; None if ``seq`` is no multiple of 128."""
    for b in range(largest - largest % _LANES, 0, -_LANES):
        if seq % b == 0:
            return b
    return None


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, seq: int, window: int | None, block: int, interpret: bool):
    """A splash kernel for one example ``(heads, S, d)`` (mask processing is numpy work:
    cached per shape)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        one = sa.CausalMask((seq, seq))
    else:  # j <= i and i - j <= window - 1
        one = sa.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
    sizes = sa.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = sa.MultiHeadMask([one] * heads)
    with jax.ensure_compile_time_eval():  # concrete mask tables, also when built under a trace
        return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


@dataclasses.dataclass(frozen=True)
class Splash:
    """Fused causal attention of one model's layers (a static, hashable module attribute).

    ``window``: the model's sliding window (None: full causal); ``interpret``: run the Pallas
    kernel interpreted (CPU meshes); ``block``: the largest block tried (512); ``strict``: a
    sequence the kernel cannot take (not a multiple of 128) is an error (``model.attention:
    splash``), else it runs ``dot_attention`` (``auto``)."""

    window: int | None = None
    interpret: bool = False
    block: int = 512
    strict: bool = True

    def takes(self, seq: int) -> bool:
        """Whether this layer runs a ``seq``-long sequence through the kernel."""
        return self.strict or block_size(seq, self.block) is not None

    def __call__(self, q: Array, k: Array, v: Array) -> Array:
        """``q (B, S, kv, g, d)``, ``k, v (B, S, kv, d)`` -> ``(B, S, kv, g, d)``, equal to
        ``dot_attention`` with ``causal_mask(S, window)`` up to float rounding."""
        b, s, kv, g, d = q.shape
        block = block_size(s, self.block)
        if block is None:
            raise ValueError(
                f"splash attention needs a sequence length that is a multiple of {_LANES}, got "
                f"{s}; set data.seq_len to a multiple of {_LANES} or model.attention=xla"
            )
        # the kernel's layout: heads before positions; it does not scale the scores
        qh = (q.reshape(b, s, kv * g, d) * (1.0 / math.sqrt(d))).astype(q.dtype)
        qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (qh, k, v))
        mesh = jax.sharding.get_abstract_mesh()
        q_spec, kv_spec = _specs(mesh, qh.shape, kh.shape)
        heads = kv * g // _shards(mesh, q_spec[1])
        kernel = _kernel(heads, s, self.window, block, self.interpret)
        run = jax.vmap(kernel)
        if not mesh.empty:
            run = jax.shard_map(
                run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                check_vma=False,
            )  # fmt: skip
        out = run(qh, kh, vh)
        return out.transpose(0, 2, 1, 3).reshape(b, s, kv, g, d)


@dataclasses.dataclass(frozen=True)
class Cudnn:
    """cuDNN's fused causal attention of one model's layers (static, hashable, like
    :class:`Splash`): ``jax.nn.dot_product_attention`` with ``is_causal`` and, for a sliding
    window ``w``, ``local_window_size=(w - 1, 0)`` (query ``i`` sees keys ``i - w + 1 .. i``, as
    :func:`causal_mask`). ``implementation``: ``"cudnn"`` (GPU); ``"xla"`` runs the same call
    through JAX's XLA formulation, which is how the plumbing (layout, GQA, window, sharding) is
    checked on a CPU."""

    window: int | None = None
    implementation: str = "cudnn"

    def takes(self, seq: int) -> bool:
        """Every length: cuDNN masks the causal blocks itself."""
        return True

    def __call__(self, q: Array, k: Array, v: Array) -> Array:
        """``q (B, S, kv, g, d)``, ``k, v (B, S, kv, d)`` -> ``(B, S, kv, g, d)``, equal to
        ``dot_attention`` with ``causal_mask(S, window)`` up to float rounding."""
        b, s, kv, g, d = q.shape
        window = None if self.window is None else (self.window - 1, 0)

        def attend(q, k, v):  # (B, S, heads, d): query head kv * g + j uses key head kv
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=window,
                implementation=self.implementation,
            )  # fmt: skip

        qh = q.reshape(b, s, kv * g, d)
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty:
            q_spec, kv_spec = _specs(mesh, (b, kv * g, s, d), (b, kv, s, d))
            q_spec, kv_spec = (PartitionSpec(p[0], None, p[1], None) for p in (q_spec, kv_spec))
            attend = jax.shard_map(
                attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                check_vma=False,
            )  # fmt: skip
        return attend(qh, k, v).reshape(b, s, kv, g, d)


def _shards(mesh, axes) -> int:
    if mesh.empty or axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _specs(mesh, q_shape, kv_shape) -> tuple[PartitionSpec, PartitionSpec]:
    """Per-device blocks for the kernel: the batch as the activation rules split it, the heads
    over ``tensor`` when both query and key/value heads divide (a query head must find its key
    head on the same device), else whole."""
    if mesh.empty:
        return PartitionSpec(None, None, None, None), PartitionSpec(None, None, None, None)
    q_spec = logical_to_spec(("batch", "heads", None, None), mesh, None, q_shape)
    kv_spec = logical_to_spec(("batch", "kv_heads", None, None), mesh, None, kv_shape)
    if q_spec[1] != kv_spec[1]:
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        kv_spec = PartitionSpec(kv_spec[0], None, None, None)
    return q_spec, kv_spec


def configure(model: nnx.Module, mesh: Mesh | None, mode: AttentionMode = "auto") -> int:
    """Set how every attention layer of ``model`` computes (in place); returns how many fuse.

    ``auto``: splash on TPU meshes, cuDNN on GPU meshes where it takes the layer (bf16 / fp16
    compute, ``head_dim`` a multiple of 8 up to 128), XLA elsewhere; ``splash``: splash anywhere
    it can run (TPU; interpreted on CPU), an error on GPU; ``cudnn``: cuDNN, an error off GPUs;
    ``xla``: ``dot_attention`` everywhere."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"model.attention must be one of {ATTENTION_MODES}, got {mode!r}")
    platform = mesh_platform(mesh)
    if mode == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(
            f"model.attention=splash is a TPU kernel and cannot run on {platform}; "
            "use model.attention=auto or xla"
        )
    if mode == "cudnn" and platform not in _GPUS:
        raise ValueError(
            f"model.attention=cudnn is cuDNN's GPU kernel and cannot run on {platform}; "
            "use model.attention=auto or xla"
        )
    kind = resolve(mode, platform)
    from paretoq_jax.models.layers import Attention

    count = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention):
            window = module.sliding_window
            kernel = None
            if kind == "splash":
                kernel = Splash(window, interpret=platform != "tpu", strict=mode == "splash")
            elif kind == "cudnn" and (mode == "cudnn" or cudnn_takes(module)):
                kernel = Cudnn(window)
            module.fused = kernel
            count += kernel is not None
    return count


_GPUS = ("gpu", "cuda")  # NVIDIA GPUs' platform names (mesh_platform tells ROCm apart)


def cudnn_takes(module) -> bool:
    """Whether ``auto`` runs an attention layer through cuDNN: its flash kernel takes bf16 /
    fp16 only and head dims that are multiples of 8 up to 128 (256 on Hopper and later), and
    JAX must find the cuDNN library (:func:`cudnn_available`)."""
    dtype_ok = jnp.dtype(module.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    shape_ok = module.head_dim % 8 == 0 and module.head_dim <= 128
    return dtype_ok and shape_ok and cudnn_available()


@functools.lru_cache(maxsize=1)
def cudnn_available() -> bool:
    """Whether ``jax.nn.dot_product_attention(implementation="cudnn")`` can be traced here: JAX
    looks for the cuDNN library when the call is traced (``RuntimeError: cuDNN not found``
    without it; ``jax[cuda12]`` installs it, the ``gpu-plan`` extra too)."""
    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(
            lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn"),
            x,
        )
    except Exception:  # noqa: BLE001 - any failure means: do not pick cuDNN automatically
        return False
    return True


def runs(model: nnx.Module, seq: int) -> str:
    """What the attention of ``model`` (after :func:`configure`) computes a ``seq``-long
    sequence with: ``splash`` / ``cudnn`` when its layers run that fused kernel, else ``xla``
    (``auto`` falls back to XLA where the kernel cannot take the length, e.g. splash on a
    sequence that is not a multiple of 128)."""
    from paretoq_jax.models.layers import Attention

    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention) and module.fused is not None:
            if module.fused.takes(seq):
                return type(module.fused).__name__.lower()
    return "xla"


def resolve(mode: AttentionMode, platform: str) -> str:
    """``splash``, ``cudnn`` or ``xla``: what ``mode`` runs on ``platform`` (see
    :func:`configure`; on a GPU ``auto`` still runs XLA for a layer cuDNN cannot take)."""
    if mode == "auto":
        return {"tpu": "splash", **dict.fromkeys(_GPUS, "cudnn")}.get(platform, "xla")
    return mode


def mesh_platform(mesh: Mesh | None) -> str:
    """The mesh's platform (``jax.default_backend()`` without one); ``rocm`` for AMD GPUs,
    which JAX also calls ``gpu`` but cuDNN does not serve."""
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    platform = device.platform
    if platform == "gpu" and "rocm" in str(getattr(device.client, "platform_version", "")).lower():
        return "rocm"
    return platform


# Matrix products per kernel invocation, each 2 * heads * S_q * S_k * d FLOPs over the blocks
# the mask does not skip: the forward computes q k^T and p v; the dq kernel recomputes q k^T and
# forms do v^T and ds k; the dkv kernel recomputes q k^T and forms do v^T, p^T do and ds^T q.
_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def kernel_cost(
    kind: str, batch: int, heads: int, seq: int, head_dim: int, kv_heads: int,
    window: int | None = None, block: int = 512, itemsize: int = 2,
) -> tuple[float, float]:  # fmt: skip
    """``(flops, bytes)`` of one splash call (``kind``: fwd, dq or dkv) on ``batch`` examples of
    ``heads`` query heads, counting only the block pairs the causal / window mask does not skip
    (a partly masked block is computed whole). Bytes: the tensors the kernel keeps per block row
    once, the ones it streams (keys and values; for dkv queries and output gradients) once per
    computed block pair and query head: the HBM traffic ``cost_analysis()`` does not see."""
    b = block_size(seq, block) or seq
    n = seq // b
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    live = j <= i  # query block i sees some key of block j
    if window is not None:
        live &= i * b - (j * b + b - 1) < window
    pairs = int(live.sum())
    flops = _MATMULS[kind] * 2.0 * batch * heads * pairs * b * b * head_dim
    q_side = batch * heads * seq * head_dim * itemsize
    kv_side = batch * kv_heads * seq * head_dim * itemsize
    stream = pairs * batch * heads * b * head_dim * itemsize  # one streamed tensor
    kept = {"fwd": 2 * q_side, "dq": 3 * q_side, "dkv": 4 * kv_side}[kind]
    return flops, float(kept + 2 * stream)
