"""What quantization adds to a training step: fake_quant forward+backward on one kernel, as a
ratio to the matmuls that kernel takes part in.

    python benchmarks/bench_quant.py [--in 4096 --out 14336 --tokens 256 --bits 2 --reps 7]

Prints medians over ``--reps`` timed calls (after a warm-up) of, side by side in one run:
- ``fake_quant fwd+bwd``: Wq = fake_quant(W, s) and its VJP (dW, ds) for a given dL/dWq;
- ``matmul fwd``: one (tokens, in) @ (in, out) matmul;
- ``matmul fwd+bwd``: the three matmuls of a linear layer in training (y, dx, dW).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from bench_packed_linear import median_seconds as median_time  # one timing helper

from paretoq_jax.quant import fake_quant, init_scale, resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="fin", type=int, default=4096)
    ap.add_argument("--out", dest="fout", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--bits", default="2")
    ap.add_argument("--method", default=None)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    spec = resolve(args.bits, args.method)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, (args.fin, args.fout), jnp.float32) * 0.02
    s = init_scale(w, spec)
    g = jax.random.normal(k2, w.shape, jnp.float32)
    x = jax.random.normal(k3, (args.tokens, args.fin), jnp.float32)
    dy = jnp.ones((args.tokens, args.fout), jnp.float32)

    @jax.jit
    def quant_fwd_bwd(w, s, g):
        wq, vjp = jax.vjp(lambda w, s: fake_quant(w, s, spec), w, s)
        dw, ds = vjp(g)
        return wq, dw, ds

    @jax.jit
    def mm_fwd(x, w):
        return x @ w

    @jax.jit
    def mm_fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: x @ w, x, w)
        return y, *vjp(dy)

    tq = median_time(quant_fwd_bwd, w, s, g, reps=args.reps)
    tm = median_time(mm_fwd, x, w, reps=args.reps)
    tmb = median_time(mm_fwd_bwd, x, w, dy, reps=args.reps)
    print(
        f"kernel {args.fin}x{args.fout}, {args.tokens} tokens, {spec.bits}-bit {spec.method}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), median of {args.reps}"
    )
    print(f"{'fake_quant fwd+bwd':<22}{tq * 1e3:9.1f} ms")
    print(f"{'matmul fwd':<22}{tm * 1e3:9.1f} ms   fake_quant / matmul = {tq / tm:.3f}")
    print(
        f"{'matmul fwd+bwd (x3)':<22}{tmb * 1e3:9.1f} ms   fake_quant / (fwd+bwd) = {tq / tmb:.3f}"
    )


if __name__ == "__main__":
    main()
