"""FSDP that gathers packed integer codes, not float kernels (protocol: docs/fsdp-code-gather.md).

Under FSDP every quantized linear's kernel ``W (in, out)`` is split over the ``fsdp`` mesh axis
(its ``in`` dimension for q/k/v/gate/up, its ``out`` dimension for o/down). The QAT forward only
uses ``Q(W) = a * level(k)``, so each device computes the codes ``k`` of its own shard (the scale
``a`` is per output channel), packs them at their bit-width along the input axis
(``quant.pack``), all-gathers the uint8 bytes (plus the scale when ``out`` is the split
dimension) and dequantizes after the gather. The forward is bit-identical to
``quant.fake_quant`` on the gathered kernel. On TPU one Pallas kernel unpacks the gathered
bytes (``kernels/unpack_tpu.py``), elsewhere XLA ops (``quant.unpack``). The backward is
``quant.fake_quant_vjp`` on the global arrays, exactly the plain path's: XLA reduce-scatters
the weight gradient to the shards, the clip mask is computed on each shard, and the scale
gradient is a partial sum per shard plus an all-reduce. Under ``model.remat`` each layer keeps its gathered codes for the backward
(``mesh.keep_codes``, :attr:`CodeGather.keep`), so a step gathers every kernel once.

The math stays in :mod:`paretoq_jax.quant`; this module is only the collective plumbing. Use
:func:`configure` on a model placed on a mesh (``mesh.gather_codes`` in a run config).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from paretoq_jax import hlo, quant
from paretoq_jax.kernels.unpack_tpu import unpack_blocks
from paretoq_jax.models.layers import REMAT_KEEP
from paretoq_jax.models.linears import quant_linears
from paretoq_jax.sharding import ShardingRules, variable_sharding

__all__ = [
    "GATHER_MODES",
    "KEEP_AXES",
    "SCOPE",
    "UNPACK_MODES",
    "CodeGather",
    "configure",
    "gather_mode",
    "gathered_bytes",
    "gathered_fake_quant",
    "pack_layout",
    "plan_for",
    "weight_gather_bytes",
]

Array = jax.Array
GatherMode = Literal["auto", "on", "off"]
GATHER_MODES = ("auto", "on", "off")
UnpackMode = Literal["xla", "pallas", "interpret"]
UNPACK_MODES: tuple[str, ...] = get_args(UnpackMode)

# Mesh axes a matmul consumes sharded (Megatron tensor parallelism): never gathered. Every other
# mesh axis that splits a kernel (fsdp; data too on a mesh whose rules shard weights over it,
# e.g. across slices) is gathered before the matmul.
KEEP_AXES = ("tensor",)

# Name scope of the gathered-codes op: its collectives' HLO ``op_name`` contains it.
SCOPE = "gather_codes"


def _axes(entry) -> tuple[str, ...]:
    """Mesh axes of one PartitionSpec entry."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _suffix_gathered(axes: tuple[str, ...], gather: tuple[str, ...]) -> bool:
    """Whether the gathered ones among ``axes`` (one dim's mesh axes, major first) are its last."""
    n = sum(a in gather for a in axes)
    return all(a in gather for a in axes[len(axes) - n :])


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class CodeGather:
    """How one quantized linear's kernel ``(..., in, out)`` is laid out and gathered.

    ``in_axes`` / ``out_axes``: the mesh axes splitting the kernel's in / out dimension (the
    scale ``(..., out)`` is split like ``out``); ``gather`` the subset that is gathered. Leading
    (stacked-layer) dimensions are never split. ``unpack``: how the gathered bytes become int8
    codes: ``"pallas"``, one pass of a Pallas kernel (``kernels.unpack_tpu``; TPU),
    ``"interpret"``, the same kernel interpreted (any backend: tests), or ``"xla"``,
    ``quant.unpack`` (XLA ops). ``keep``: name the gathered packed codes and scales
    ``REMAT_KEEP``, so that a rematerialized layer keeps them for its backward (one gather per
    step instead of two; memory: the packed codes of every layer). Hashable: it lives in the
    model's graphdef.
    """

    mesh: Mesh
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    gather: tuple[str, ...]
    unpack: UnpackMode = "xla"
    keep: bool = True

    def __post_init__(self) -> None:
        if not self.gather:
            raise ValueError("CodeGather needs at least one mesh axis to gather over")
        if any(a not in self.in_axes + self.out_axes for a in self.gather):
            raise ValueError(f"gather axes {self.gather} must split the kernel's in or out dim")
        if self.unpack not in UNPACK_MODES:
            raise ValueError(f"unpack={self.unpack!r}: choose one of {UNPACK_MODES}")
        if not _suffix_gathered(self.in_axes, self.gather) or not _suffix_gathered(
            self.out_axes, self.gather
        ):
            raise ValueError(
                f"gathered axes {self.gather} must be the minor (last) mesh axes of the kernel "
                f"dims they split (in {self.in_axes}, out {self.out_axes}), so the gathered "
                "blocks are contiguous"
            )

    def _size(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    def specs(self, ndim: int) -> tuple[P, P, P]:
        """PartitionSpecs of ``(kernel, scale, gathered kernel)`` for a kernel of ``ndim`` dims."""
        lead = (None,) * (ndim - 2)
        keep_in = tuple(a for a in self.in_axes if a not in self.gather)
        keep_out = tuple(a for a in self.out_axes if a not in self.gather)
        return (
            P(*lead, _entry(self.in_axes), _entry(self.out_axes)),
            P(*lead, _entry(self.out_axes)),
            P(*lead, _entry(keep_in), _entry(keep_out)),
        )

    def gathered_bytes(self, spec: quant.QuantSpec, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(code bytes, scale bytes)`` of one call's gathers for a kernel of ``shape``."""
        g_in = tuple(a for a in self.in_axes if a in self.gather)
        g_out = tuple(a for a in self.out_axes if a in self.gather)
        return gathered_bytes(
            spec, shape, in_split=self._size(self.in_axes), out_split=self._size(self.out_axes),
            gather_in=self._size(g_in), gather_out=self._size(g_out),
        )  # fmt: skip

    def forward(self, w: Array, scale: Array, spec: quant.QuantSpec) -> Array:
        """``fake_quant(w, scale)``'s value, gathered over ``self.gather``: the kernel as the
        matmul consumes it (split only over the kept axes)."""
        k_spec, s_spec, out_spec = self.specs(w.ndim)
        g_in = tuple(a for a in self.in_axes if a in self.gather)
        g_out = tuple(a for a in self.out_axes if a in self.gather)
        in_local = w.shape[-2] // self._size(self.in_axes)
        bits, ternary = pack_layout(spec, in_local)

        def local(w: Array, a: Array) -> Array:
            codes = quant.train_codes(w, a, spec)
            packed = quant.pack(codes, bits, ternary=ternary, axis=-2)  # (..., planes, R, out)
            blocks = w.shape  # (..., [shards,] in_local, out): the codes as unpacked
            if g_out:  # packing is along `in`: out-slices concatenate as they are
                packed, a = _gather_with_scale(packed, a, g_out)
                blocks = (*blocks[:-1], a.shape[-1])
            if g_in:  # one packed block per shard, on a new axis before the blocks' planes
                axis = packed.ndim - 3
                packed = jax.lax.all_gather(packed, g_in, axis=axis, tiled=False, to="invarying")
                blocks = (*blocks[:-2], packed.shape[axis], *blocks[-2:])
            if self.keep:  # what remat keeps: 2-bit Llama-3.2 3B on v5p, -1.2% HBM bytes a layer
                packed, a = checkpoint_name(packed, REMAT_KEEP), checkpoint_name(a, REMAT_KEEP)
            codes = self._unpack(packed, bits, ternary, blocks)
            codes = codes.reshape(*w.shape[:-2], -1, blocks[-1])  # shards' rows in order
            # the int8 codes, materialized: XLA:TPU otherwise moves the gathered kernel's
            # layout change after dequantization and copies it as f32 (4x the bytes; MobileLLM-
            # 125M at 1,024 tokens per v5p chip: QAT / float HBM bytes 1.40 -> 1.23 with it)
            codes = jax.lax.optimization_barrier(codes)
            return quant.from_codes(codes, a, spec, dtype=w.dtype)

        with jax.named_scope(SCOPE):  # names its collectives in the HLO (paretoq_jax.hlo)
            return jax.shard_map(
                local, mesh=self.mesh, in_specs=(k_spec, s_spec), out_specs=out_spec,
                check_vma=False,  # a Pallas kernel's grid indices carry no mesh axes
            )(w, scale)  # fmt: skip

    def _unpack(self, packed: Array, bits: float, ternary: str, shape: tuple[int, ...]) -> Array:
        """int8 codes of ``shape`` (``(..., in, out)``) from their packed bytes."""
        if self.unpack == "xla":
            return quant.unpack(packed, bits, shape, ternary=ternary, axis=-2)
        fmt = quant.pack_format(bits, ternary)
        flat = packed.reshape(-1, *packed.shape[-3:])  # (blocks, planes, R, out)
        codes = unpack_blocks(
            flat, fields=fmt.fields, base3=fmt.base3, kmin=fmt.kmin, mult=fmt.mult,
            interpret=self.unpack == "interpret",
        )  # fmt: skip
        codes = codes.reshape(flat.shape[0], -1, shape[-1])[:, : shape[-2]]  # no pad rows
        return codes.reshape(shape)

    def __call__(self, w: Array, scale: Array | None, spec: quant.QuantSpec) -> Array:
        return gathered_fake_quant(w, scale, spec, self)


def _gather_with_scale(packed: Array, a: Array, axes: tuple[str, ...]) -> tuple[Array, Array]:
    """All-gather the packed codes ``(..., planes, R, out)`` and their scale ``(..., out)`` over
    ``axes`` (tiled along ``out``) as ONE uint8 collective: the scale's bytes ride as extra byte
    rows of each column (a bitcast, so exact). One collective instead of two: on host devices
    every collective is a barrier of all devices, and the scale's own gather cost more than
    its bytes."""
    *lead, planes, rows, out = packed.shape
    sb = jax.lax.bitcast_convert_type(a, jnp.uint8)  # (..., out, itemsize)
    sb = jnp.moveaxis(sb.reshape(*a.shape, -1), -1, -2)  # (..., itemsize, out)
    both = jnp.concatenate([packed.reshape(*lead, planes * rows, out), sb], axis=-2)
    both = jax.lax.all_gather(both, axes, axis=both.ndim - 1, tiled=True, to="invarying")
    n = both.shape[-1]
    codes = both[..., : planes * rows, :].reshape(*lead, planes, rows, n)
    scale = jax.lax.bitcast_convert_type(
        jnp.moveaxis(both[..., planes * rows :, :], -2, -1), a.dtype
    )
    return codes, scale.reshape(*a.shape[:-1], n)


def pack_layout(spec: quant.QuantSpec, in_local: int) -> tuple[float, str]:
    """``(bits, ternary)`` for ``quant.pack`` of one shard's codes (``in_local`` input rows).

    Three-valued codes (ternary, and 1 bit, whose training forward keeps ``sign(0) = 0``) use
    whichever ternary layout is smaller for the shard: base 3 (1.6 bits a code) or 2 bits a
    code (on a tie: 2 bits, cheaper to unpack). Other widths pack at ``spec.storage_bits``.
    """
    if spec.qmax - spec.qmin + 1 > 3:
        return spec.bits, "2bit"
    sizes = {
        t: math.prod(quant.packed_shape((in_local, 1), 1.58, ternary=t)) for t in ("2bit", "base3")
    }
    return 1.58, min(sizes, key=lambda t: (sizes[t], t != "2bit"))


def gathered_bytes(
    spec: quant.QuantSpec,
    shape: tuple[int, ...],
    *,
    in_split: int = 1,
    out_split: int = 1,
    gather_in: int = 1,
    gather_out: int = 1,
    scale_itemsize: int = 4,
) -> tuple[int, int]:
    """``(code bytes, scale bytes)`` that one device's all-gathers produce for one forward of a
    quantized kernel ``shape`` ``(..., in, out)`` split ``in_split`` x ``out_split`` ways, of
    which ``gather_in`` x ``gather_out`` ways are gathered (the sizes of the gathered mesh axes).
    Needs no devices: a planner can size hypothetical meshes with it. The float path gathers
    ``in * out / (in_split * out_split) * gather_in * gather_out`` weights per layer instead.
    """
    lead = math.prod(shape[:-2])
    in_local, out_local = shape[-2] // in_split, shape[-1] // out_split
    bits, ternary = pack_layout(spec, in_local)
    packed = math.prod(quant.packed_shape((in_local, out_local), bits, ternary=ternary))
    codes = lead * packed * gather_in * gather_out
    scales = lead * out_local * gather_out * scale_itemsize if gather_out > 1 else 0
    return codes, scales


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gathered(w: Array, scale: Array, spec: quant.QuantSpec, plan: CodeGather) -> Array:
    return plan.forward(w, scale, spec)


def _gathered_fwd(w, scale, spec, plan):
    return plan.forward(w, scale, spec), (w, scale)


def _gathered_bwd(spec, plan, res, g):
    w, scale = res
    return quant.fake_quant_vjp(w, scale, g, spec)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def gathered_fake_quant(
    w: Array, scale: Array | None, spec: quant.QuantSpec, plan: CodeGather
) -> Array:
    """``quant.fake_quant(w, scale, spec)`` (same value, same gradients) computed from integer
    codes gathered as ``plan`` says. ``w`` is the (sharded) master kernel ``(..., in, out)``."""
    if spec.learned:
        if scale is None or scale.shape != w.shape[:-2] + w.shape[-1:]:
            got = None if scale is None else scale.shape
            raise ValueError(
                f"{spec.method} at {spec.bits} bits needs a learned scale of shape "
                f"{w.shape[:-2] + w.shape[-1:]} for kernel {w.shape}, got {got}"
            )
        return _gathered(w, scale, spec, plan)
    return _gathered(w, quant.effective_scale(w, scale, spec), spec, plan)


def plan_for(
    kernel: nnx.Variable, mesh: Mesh, rules: ShardingRules | None = None, *, keep: bool = True
) -> CodeGather | None:
    """The :class:`CodeGather` of a kernel ``(..., in, out)`` placed by ``rules`` on ``mesh``;
    ``None`` when no gathered mesh axis splits it (nothing to gather). The gathered codes are
    unpacked by the Pallas kernel on TPU meshes, by XLA ops elsewhere."""
    spec = variable_sharding(kernel, mesh, rules).spec
    spec = tuple(spec) + (None,) * (kernel.ndim - len(spec))
    if any(_axes(e) for e in spec[:-2]):
        return None  # a split stacked-layer dimension: not a layout this module gathers
    in_axes, out_axes = _axes(spec[-2]), _axes(spec[-1])
    gather = tuple(a for a in in_axes + out_axes if a not in KEEP_AXES and mesh.shape[a] > 1)
    if not gather or not (_suffix_gathered(in_axes, gather) and _suffix_gathered(out_axes, gather)):
        return None  # nothing to gather, or a layout whose gathered blocks are not contiguous
    unpack = "pallas" if mesh.devices.flat[0].platform == "tpu" else "xla"
    return CodeGather(mesh, in_axes, out_axes, gather, unpack, keep)


def gather_mode(value: bool | str) -> GatherMode:
    """``"auto"``, ``"on"`` or ``"off"`` from a config value (YAML reads on/off as booleans)."""
    mode = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if mode not in GATHER_MODES:
        raise ValueError(f"gather_codes={value!r}: choose auto, on (true) or off (false)")
    return mode


def pays_on(mesh: Mesh) -> bool:
    """Whether gathering codes can save time on ``mesh``'s platform: on accelerators a
    collective crosses an interconnect (ICI, NVLink, DCN) while each device's unpacking runs
    on its own cores. On CPU devices the collectives are copies in one host's memory and the
    devices share its cores; measured there (8 host devices, fsdp = 8, 2 cores; docs/
    fsdp-code-gather.md) code gathering made the step 1.19x slower (tiny) and 1.16x
    (SmolLM2-135M), so ``auto`` leaves CPU meshes on float kernels."""
    return mesh.devices.flat[0].platform != "cpu"


def configure(
    model: nnx.Module,
    mesh: Mesh | None,
    mode: GatherMode | bool = "auto",
    rules: ShardingRules | None = None,
    *,
    keep: bool = True,
) -> int:
    """Make every quantized linear of ``model`` gather packed codes (``mode`` auto / on) or float
    kernels (off, or ``mesh=None``) under ``mesh``; in place. Returns how many gather codes.

    ``auto``: wherever a gathered mesh axis (e.g. ``fsdp > 1``) splits the kernel, on TPU and
    GPU meshes (the result is exact for every bit-width and method); float kernels on CPU
    meshes (:func:`pays_on`: host "devices" share the cores and their collectives are memory
    copies, so each device unpacking every full kernel costs time and saves none).
    ``on``: gather codes wherever a gathered axis splits a kernel, on any platform, and raise
    if no linear would (e.g. ``fsdp = 1``), so a run asking for it does not silently train
    without it. ``keep``: :attr:`CodeGather.keep` (``mesh.keep_codes``).
    """
    mode = gather_mode(mode)
    if mode == "auto" and mesh is not None and not pays_on(mesh):
        mode = "off"
    count = 0
    for module in quant_linears(model, quantized=False).values():
        plan = None
        if mode != "off" and mesh is not None and module.spec is not None:
            plan = plan_for(module.kernel, mesh, rules, keep=keep)
        module.gather = plan
        count += plan is not None
    if mode == "on" and count == 0:
        shape = dict(mesh.shape) if mesh is not None else None
        raise ValueError(
            f"gather_codes=on but no quantized linear is split over a gathered mesh axis "
            f"(mesh {shape}, bits of the model's linears): use mesh.fsdp > 1 with a quantized "
            "model, or gather_codes=auto/off"
        )
    return count


def weight_gather_bytes(
    hlo_text: str, model: nnx.Module, mesh: Mesh, rules: ShardingRules | None = None
) -> dict[str, int]:
    """Per-step bytes of the all-gathers that feed ``model``'s quantized linears in a compiled
    step's HLO text: ``codes`` (uint8, from this module), ``scales`` (this module's float
    gathers) and ``floats`` (float all-gathers of as many elements as a gathered quantized
    kernel, one layer's or the whole stack's, whatever shape XLA gives them (e.g. ``(heads,
    head_dim, in)`` for a projection it reshapes into heads): the plain path's weight traffic;
    ``float_weights`` counts their elements, so ``2 * float_weights`` is that traffic in bf16)."""
    sizes = set()
    for m in quant_linears(model).values():
        plan = plan_for(m.kernel, mesh, rules)
        if plan is None:
            continue
        *lead, n_in, n_out = m.kernel.shape
        keep_in = plan._size(tuple(a for a in plan.in_axes if a not in plan.gather))
        keep_out = plan._size(tuple(a for a in plan.out_axes if a not in plan.gather))
        one = (n_in // keep_in) * (n_out // keep_out)
        sizes |= {one, math.prod(lead) * one}
    out = {"codes": 0, "scales": 0, "floats": 0, "float_weights": 0}
    for c in hlo.collectives(hlo_text):
        if c.kind != "all-gather":
            continue
        if SCOPE in c.op_name:
            out["codes" if c.dtype == "u8" else "scales"] += c.total_bytes
        elif c.dtype in ("f32", "bf16", "f16") and math.prod(c.shapes[0]) in sizes:
            out["floats"] += c.total_bytes
            out["float_weights"] += math.prod(c.shapes[0]) * c.count
    return out
