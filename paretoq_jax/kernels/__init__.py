"""Native CPU kernels called from jitted JAX code through ``jax.ffi`` (docs/performance.md).

``packed_linear.cc`` computes ``y = x @ W`` with ``W`` stored as packed integer codes
(docs/packed-format.md) at the speed of reading the packed bytes, where XLA's CPU emitter
unpacks codes far below memory bandwidth. It ships as source and is compiled on first use
with the system C++ compiler (``$CXX`` or ``g++``/``c++``/``clang++``, ``-O3 -march=native``)
into a per-user cache, ``$PARETOQ_KERNEL_CACHE`` or ``~/.cache/paretoq_jax/kernels/<hash>``
(the hash covers the source, the flags, the compiler, the CPU and jaxlib). Nothing requires a
compiler: without one, or when the build fails, :func:`resolve` falls back to the XLA path and
says so once on stderr.

Which path runs is chosen by a kernel name:

* ``"auto"`` (default): native on a CPU backend when the kernel builds and the product has at
  most ``AUTO_MAX_ROWS`` rows (decoding; a long prefill is a matrix product, where XLA's
  GEMM is faster), else XLA;
* ``"native"``: the native kernel, an error if it cannot be built;
* ``"xla"``: the XLA formulation (``quant.packed_matmul``), never compiling anything.

``$PARETOQ_KERNEL`` sets the default in place of ``"auto"``; ``$PARETOQ_KERNEL_THREADS`` the
kernel's thread count (default: the CPUs this process may use).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AUTO_MAX_ROWS",
    "KERNELS",
    "NativeUnavailable",
    "native_available",
    "native_error",
    "packed_linear",
    "resolve",
]

KERNELS = ("auto", "native", "xla")
AUTO_MAX_ROWS = 16  # "auto" runs products of more activation rows than this by XLA
SOURCE = Path(__file__).with_name("packed_linear.cc")
TARGET = "paretoq_packed_linear"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": loaded CDLL, or "error": why not; "noticed": bool


class NativeUnavailable(RuntimeError):
    """The native kernel was asked for (``kernel="native"``) but cannot be built or loaded."""


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """The CPU's model and flags (``-march=native`` code is only valid on the same CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("PARETOQ_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paretoq_jax" / "kernels"


def _build(cxx: str) -> Path:
    """The compiled library, built into the cache if missing (temp file + rename under a file
    lock, so concurrent processes build it once and never load a half-written file)."""
    import fcntl  # POSIX only: imported here so that the package imports anywhere

    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), " ".join(FLAGS), version, _cpu_id(), jaxlib.__version__]
        ).encode()
    ).hexdigest()[:16]
    out_dir = _cache_dir() / key
    lib = out_dir / "packed_linear.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_file():  # another process built it while we waited
            return lib
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        try:
            cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise NativeUnavailable(
                    f"compiling {SOURCE.name} failed ({' '.join(cmd)}): {r.stderr.strip()[-600:]}"
                )
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL:
    """Build (once per process) and register the kernel; raises :class:`NativeUnavailable`."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        if "error" in _state:
            raise NativeUnavailable(_state["error"])
        try:
            if sys.platform != "linux" and sys.platform != "darwin":
                raise NativeUnavailable(f"no native kernel build on {sys.platform}")
            cxx = _compiler()
            if cxx is None:
                raise NativeUnavailable("no C++ compiler found (set $CXX or install g++)")
            lib = ctypes.CDLL(str(_build(cxx)))
            jax.ffi.register_ffi_target(
                TARGET, jax.ffi.pycapsule(lib.PareToQPackedLinear), platform="cpu"
            )
        except (NativeUnavailable, OSError) as e:
            _state["error"] = str(e)
            raise NativeUnavailable(str(e)) from None
        _state["lib"] = lib
        return lib


def native_available() -> bool:
    """Whether the native kernel is built and registered (builds it on the first call)."""
    try:
        _load()
        return True
    except NativeUnavailable:
        return False


def native_error() -> str | None:
    """Why the native kernel is unavailable (``None`` when it loaded or was never tried)."""
    return _state.get("error")  # type: ignore[return-value]


def resolve(kernel: str | None = None, rows: int | None = None) -> str:
    """``"native"`` or ``"xla"`` for a kernel name (``None``: ``$PARETOQ_KERNEL`` or
    ``"auto"``) and a product of ``rows`` activation rows. ``"auto"`` takes XLA for more than
    ``AUTO_MAX_ROWS`` rows, off CPU, or when the kernel cannot be built (then with a one-line
    notice); ``"native"`` raises :class:`NativeUnavailable` where it cannot run."""
    name = kernel if kernel is not None else os.environ.get("PARETOQ_KERNEL", "auto")
    if name not in KERNELS:
        source = "kernel" if kernel is not None else "$PARETOQ_KERNEL"
        raise ValueError(f"{source}={name!r}: choose one of {KERNELS}")
    if name == "xla":
        return "xla"
    if name == "native":
        if jax.default_backend() != "cpu":
            raise NativeUnavailable(
                f"the native kernel runs on CPU; the default backend is {jax.default_backend()}"
            )
        _load()
        return "native"
    if jax.default_backend() != "cpu" or (rows is not None and rows > AUTO_MAX_ROWS):
        return "xla"
    if native_available():
        return "native"
    if not _state.get("noticed"):
        _state["noticed"] = True
        print(
            f"paretoq_jax: native CPU kernel unavailable, using the XLA path ({native_error()})",
            file=sys.stderr,
        )
    return "xla"


def packed_linear(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    *,
    layout: str,
    in_features: int,
    mult: float,
    offset: float,
    n: float,
    eps: float,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """``(max(scale, eps) / n) * (mult * (x @ u) + offset * sum(x))`` by the native kernel.

    ``u`` are the unsigned codes of ``packed`` (uint8 ``(P, R, out)``) in ``layout``: the
    field widths ``"1"``, ``"2"``, ``"4"``, ``"2,1"``, or ``"base3"`` (docs/packed-format.md),
    or ``"int8"`` (one plane of signed int8 values ``(in, out)``, dtype int8; the others
    uint8). ``x``: ``(..., in)``; the result is float32 ``(..., out)``. Traceable (jit, scan,
    while_loop); CPU only.

    With ``layer`` (an int32 scalar, traced or not), ``packed`` is a stack ``(L, P, R, out)``
    and ``scale`` ``(L, out)``, and the product is layer ``layer``'s, read in place: slicing
    the stack in XLA instead would copy the layer's codes into a buffer of their own first.
    """
    _load()
    stacked = layer is not None
    if packed.ndim != 3 + stacked or scale.ndim != 1 + stacked:
        raise ValueError(
            f"packed {packed.shape} and scale {scale.shape} must be (P, R, out) and (out,)"
            + (", stacked over layers (with layer=)" if stacked else "")
        )
    lead = x.shape[:-1]
    x2 = jnp.reshape(x.astype(jnp.float32), (-1, in_features))
    out = packed.shape[-1]
    codes_dtype = jnp.int8 if layout == "int8" else jnp.uint8
    if packed.dtype != codes_dtype:
        raise ValueError(
            f"layout {layout!r} needs {codes_dtype.__name__} codes, got {packed.dtype}"
        )
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((x2.shape[0], out), jnp.float32), vmap_method="sequential"
    )
    at = jnp.asarray(0 if layer is None else layer, jnp.int32)
    y = call(
        x2, packed, scale.astype(jnp.float32), at, layout=layout,
        in_features=np.int64(in_features), mult=np.float32(mult), offset=np.float32(offset),
        n=np.float32(n), eps=np.float32(eps),
    )  # fmt: skip
    return y.reshape(*lead, out)
