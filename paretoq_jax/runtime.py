"""Process-level settings for the command-line entry points.

XLA's CPU runtime allocates its large temporary buffers afresh on every execution. glibc serves
allocations above its mmap threshold (at most 32 MiB by default) with fresh ``mmap`` pages, so
every train step page-faults its whole working set in again and gives it back with ``munmap``.
Raising glibc's mmap and trim thresholds keeps those pages in the heap for reuse: measured on
SmolLM2-135M 2-bit QAT, 4x256 tokens, 2 CPU cores: 11.8 s -> 10.0 s per step
(``benchmarks/bench_train.py``). glibc reads ``GLIBC_TUNABLES`` only at process start, so the
entry points re-execute themselves once with it set.

The price is that freed memory stays in the heap: after an evaluation or an (async) checkpoint
the heap keeps their buffers too, and a SmolLM2-135M sweep cell grew from 5.9 to 13.3 GB and was
OOM-killed. :class:`HeapGuard` returns free heap pages (``malloc_trim``) whenever the resident
size grows well past the training steps' own working set, so steady steps keep the speed-up.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MALLOC_TUNABLES", "HeapGuard", "reexec_with_malloc_tunables", "release_free_memory"]

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


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); False where
    there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


class HeapGuard:
    """Call once per training step: the first call records the resident size of the steps'
    working set; a later call that finds it grown by more than ``slack`` (fraction) plus
    ``floor`` bytes trims the heap, then raises the baseline to what is still resident (memory
    in real use is never trimmed twice). Costs one read of ``/proc/self/statm`` per call."""

    def __init__(self, slack: float = 0.25, floor: int = 512 << 20):
        self.slack, self.floor = slack, floor
        self.base: int | None = None
        self.trims = 0

    def __call__(self) -> bool:
        rss = _rss_bytes()
        if rss is None:
            return False
        if self.base is None:
            self.base = rss
            return False
        if rss <= self.base * (1 + self.slack) + self.floor:
            return False
        release_free_memory()
        self.trims += 1
        self.base = max(self.base, _rss_bytes() or rss)
        return True
