"""Process-level settings for the command-line entry points.

XLA's CPU runtime allocates its large temporary buffers afresh on every execution. glibc serves
allocations above its mmap threshold (at most 32 MiB by default) with fresh ``mmap`` pages, so
every train step page-faults its whole working set in again and gives it back with ``munmap``.
Raising glibc's mmap and trim thresholds keeps those pages in the heap for reuse: measured on
SmolLM2-135M 2-bit QAT, 4x256 tokens, 2 CPU cores: 11.8 s -> 10.0 s per step
(``benchmarks/bench_train.py``). glibc reads ``GLIBC_TUNABLES`` only at process start, so the
entry points re-execute themselves once with it set.
"""

from __future__ import annotations

import os
import sys

__all__ = ["MALLOC_TUNABLES", "reexec_with_malloc_tunables"]

MALLOC_TUNABLES = (
    "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
    ":glibc.malloc.top_pad=1073741824"
)


def reexec_with_malloc_tunables() -> None:
    """Re-execute this process with ``GLIBC_TUNABLES`` set, unless it is set already, or
    ``PARETOQ_NO_REEXEC=1``, or this is not Linux. Call first thing in a ``__main__`` block."""
    if (
        not sys.platform.startswith("linux")
        or "GLIBC_TUNABLES" in os.environ
        or os.environ.get("PARETOQ_NO_REEXEC") == "1"
        or not getattr(sys, "orig_argv", None)
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
