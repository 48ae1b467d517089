"""Accelerator facts the planner's roofline uses (per chip; see ``docs/scale.md`` for sources).

``ici_GBps``: bytes per second one chip can send to its neighbours (one direction, all links):
the rate the planner divides a collective's ring bytes by. ``dcn_GBps``: the same across
slices (data-center network) for TPUs, across nodes (InfiniBand) for GPUs.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Chip", "CHIPS", "chip_for"]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's peak numbers."""

    name: str
    bf16_tflops: float  # dense bf16 matmul peak
    hbm_bytes: float
    hbm_GBps: float
    ici_GBps: float
    dcn_GBps: float
    source: str

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12


CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip("v4", 275, 32 * GiB, 1200, 300, 6.25,
             "cloud.google.com/tpu/docs/v4; ICI: 6 links x 400 Gbps per direction (Jouppi et al., "
             "ISCA 2023); DCN assumed as v5p"),
        Chip("v5e", 197, 16 * GiB, 819, 200, 3.125,
             "cloud.google.com/tpu/docs/v5e and /v6e (ICI 1600 Gbps; 2 x 100 Gbps NIC per "
             "8-chip host)"),
        Chip("v5p", 459, 95 * GiB, 2765, 600, 6.25,
             "cloud.google.com/tpu/docs/v5p (ICI 4800 Gbps = 1200 GBps bidirectional; DCN 50 "
             "Gbps per chip)"),
        Chip("v6e", 918, 32 * GiB, 1640, 400, 12.5,
             "cloud.google.com/tpu/docs/v6e (ICI 800 GBps bidirectional; 4 x 200 Gbps NIC per "
             "8-chip host)"),
        Chip("h100", 989, 80 * GiB, 3350, 450, 50,
             "NVIDIA H100 SXM datasheet (989 TFLOPS dense bf16, 80 GB HBM3 3.35 TB/s, NVLink "
             "900 GB/s bidirectional); 8 x 400 Gbps InfiniBand per node"),
        Chip("h200", 989, 141e9, 4800, 450, 50,
             "NVIDIA H200 SXM datasheet (989 TFLOPS dense bf16, 141 GB HBM3e 4.8 TB/s, NVLink "
             "900 GB/s bidirectional); 8 x 400 Gbps InfiniBand per node"),
    )
}  # fmt: skip


def chip_for(topology: str) -> Chip:
    """The chip of a topology name (``v5p:4x4x4``, ``v5e:16x16``, ``h100:1x2x8``)."""
    kind = topology.split(":")[0].lower()
    kind = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "tpu v4": "v4"}.get(kind, kind)
    if kind not in CHIPS:
        raise ValueError(
            f"no chip facts for {topology!r}; known chips: {sorted(CHIPS)} "
            "(paretoq_jax/plan/chips.py)"
        )
    return CHIPS[kind]
