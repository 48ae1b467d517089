"""Packed linear vs dense f32 / bf16 ``jnp.dot`` on Llama-3-8B layer shapes, side by side.

For each kernel shape ``(in, out)`` and batch size, times (median of ``--reps`` runs after a
warm-up) ``x @ W`` with a dense float32 kernel, a dense bfloat16 kernel (bf16 activations) and
the packed product at each ``--bits`` (float32 activations) by each ``--kernels`` path (``xla``:
``quant.packed_matmul``; ``native``: the ``jax.ffi`` CPU kernel of ``paretoq_jax.kernels``),
and prints beside each the bytes it must read, the rate it reads the weight bytes at (GB/s) and
the physical limit ``bytes / bandwidth``, with the bandwidth of this machine measured in the
same run by copying a large array (read + write bytes counted). The load average is printed.

    python benchmarks/bench_packed_linear.py            # ~2-3 minutes on 2 CPU cores
    python benchmarks/bench_packed_linear.py --bits 1 1.58 2 3 4 --ternary base3 --reps 10
    python benchmarks/bench_packed_linear.py --shapes 576x1536 1536x576 --bits 2   # SmolLM2
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax import kernels, quant
from paretoq_jax.models.packed import PackedLinear, use_kernel
from paretoq_jax.quant.packing import pack, pack_format

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # q/o proj, gate/up proj, down proj


@partial(jax.jit, static_argnums=0)
def apply(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def median_seconds(fn, *args, reps: int) -> float:
    """Median wall time of ``fn(*args)`` over ``reps`` runs, after one warm-up (compile) run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth(n_bytes: int, reps: int) -> float:
    """Bytes per second of a jitted copy ``a + 1`` of an ``n_bytes`` float32 array.

    One read and one write of every element; the input buffer is donated so that the output
    reuses it (a fresh output buffer would measure page faults, not memory bandwidth).
    """
    step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = step(jnp.zeros(n_bytes // 4, jnp.float32))  # compile + first touch
    x.block_until_ready()
    times = []
    for _ in range(max(reps, 3)):
        t0 = time.perf_counter()
        x = step(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / float(np.median(times))


def random_codes(rng: np.random.Generator, bits: float, shape: tuple[int, int]) -> np.ndarray:
    fmt = pack_format(bits)
    c = rng.integers(fmt.kmin, fmt.kmax + 1, size=shape, dtype=np.int8)
    return np.where(c >= 0, 1, -1).astype(np.int8) if fmt.mult == 2 else c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", nargs="+", default=["1.58", "2", "4"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES])
    ap.add_argument("--ternary", default="2bit", choices=["2bit", "base3"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--copy-mib", type=int, default=512, help="array size for the bandwidth test")
    ap.add_argument("--kernels", nargs="+", default=["xla", "native"], choices=["xla", "native"])
    args = ap.parse_args()
    if "native" in args.kernels and not kernels.native_available():
        print(f"native kernel unavailable, skipped: {kernels.native_error()}")
        args.kernels = [k for k in args.kernels if k != "native"]

    bw = copy_bandwidth(args.copy_mib << 20, reps=args.reps)
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}; jax {jax.__version__}")
    print(f"copy bandwidth ({args.copy_mib} MiB array, read+write): {bw / 1e9:.1f} GB/s")
    print(f"medians of {args.reps} runs; limit = bytes read / copy bandwidth; weight GB/s = "
          f"weight bytes / median time; load average {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| in x out | batch | kernel | median ms | MB read | weight GB/s | limit ms | x limit "
          "| vs f32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    for shape in args.shapes:
        n_in, n_out = (int(s) for s in shape.split("x"))
        w32 = jnp.asarray(rng.standard_normal((n_in, n_out), dtype=np.float32) * 0.02)
        w16 = w32.astype(jnp.bfloat16)
        scale = jnp.full((n_out,), 0.02, jnp.float32)
        packed = {}
        for b in args.bits:
            bits = float(b) if b != "ternary" else 1.58
            packed[b] = jnp.asarray(pack(random_codes(rng, bits, (n_in, n_out)), bits,
                                         ternary=args.ternary))  # fmt: skip
        for batch in args.batches:
            x32 = jnp.asarray(rng.standard_normal((batch, n_in), dtype=np.float32))
            x16 = x32.astype(jnp.bfloat16)
            rows = [
                ("dense f32", dot, (x32, w32), w32.nbytes, 4),
                ("dense bf16", dot, (x16, w16), w16.nbytes, 2),
            ]
            for b, p in packed.items():
                bits = float(b) if b != "ternary" else 1.58
                lin = PackedLinear(p, scale, spec=quant.resolve(bits), in_features=n_in,
                                   ternary=args.ternary)  # fmt: skip
                for kernel in args.kernels:
                    graphdef, state = nnx.split(use_kernel(lin, kernel))  # kernel: static
                    name = f"packed {b}b" + (f" {args.ternary}" if bits == 1.58 else "")
                    rows.append((f"{name} {kernel}", partial(apply, graphdef), (state, x32),
                                 p.nbytes + scale.nbytes, 4))  # fmt: skip
            t_f32 = None
            for name, fn, fargs, w_bytes, act_bytes in rows:
                t = median_seconds(fn, *fargs, reps=args.reps)
                t_f32 = t if t_f32 is None else t_f32
                n_bytes = w_bytes + act_bytes * batch * (n_in + n_out)
                limit = n_bytes / bw
                print(
                    f"| {n_in}x{n_out} | {batch} | {name} | {t * 1e3:.2f} | {n_bytes / 1e6:.1f} "
                    f"| {w_bytes / t / 1e9:.2f} | {limit * 1e3:.2f} | {t / limit:.1f} "
                    f"| {t / t_f32:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
