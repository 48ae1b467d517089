"""Forward throughput of SmolLM2-135M (from its GGUF) in paretoq_jax next to HF transformers
(torch) on the same machine and weights: tokens/s at batch x seq (default 1 x 512).

    python benchmarks/bench_forward.py [--batch 1 --seq 512 --reps 5 --bits 16 2]

Each variant is compiled/warmed up first (compile time reported), then the variants are timed
interleaved, ``reps`` rounds; the medians and the ratio to torch come from this one run.
torch runs eagerly (``model(input_ids).logits`` under ``no_grad``) with transformers' default
attention; both sides use float32 unless ``--dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paretoq_jax.io import load_pretrained, save_pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M from assets)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bits", type=float, nargs="+", default=[16, 2])
    ap.add_argument("--modes", nargs="+", default=["scan", "unrolled"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    if args.gguf is None:
        from paretoq_jax.assets import smollm2_gguf

        args.gguf = str(smollm2_gguf())
    dtype = jnp.dtype(args.dtype)
    ids = np.random.default_rng(0).integers(0, 49152, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    fns: dict[str, callable] = {}
    compile_s: dict[str, float] = {}

    float_model = None
    for bits in args.bits:
        for mode in args.modes:
            model = load_pretrained(args.gguf, bits=bits, dtype=dtype, scan_layers=mode == "scan")
            float_model = model if bits == 16 and float_model is None else float_model
            graphdef, state = nnx.split(model)
            fwd = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
            x = jnp.asarray(ids)
            t0 = time.perf_counter()
            fwd(state, x).block_until_ready()
            name = f"jax {args.dtype} {bits:g}-bit {mode}"
            compile_s[name] = time.perf_counter() - t0
            fns[name] = lambda f=fwd, s=state, x=x: f(s, x).block_until_ready()

    if not args.no_torch:
        import torch
        import transformers

        with tempfile.TemporaryDirectory() as tmp:  # the same weights, through our HF export
            src = float_model or load_pretrained(args.gguf)
            save_pretrained(src, Path(tmp) / "hf")
            tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=tdtype)
        hf.eval()
        tids = torch.from_numpy(ids).long()

        def torch_fwd():
            with torch.no_grad():
                return hf(input_ids=tids).logits

        torch_fwd()
        fns[f"torch {args.dtype} float eager"] = torch_fwd

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    torch_name = next((k for k in fns if k.startswith("torch")), None)
    ref = statistics.median(times[torch_name]) if torch_name else None
    print(f"forward {args.batch}x{args.seq} tokens, median of {args.reps}, devices {jax.devices()}")
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {
            "variant": name,
            "tok_per_s": round(tokens / med, 1),
            "median_s": round(med, 4),
            "compile_s": round(compile_s.get(name, float("nan")), 2),
            "speed_vs_torch": round(ref / med, 3) if ref else None,
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
