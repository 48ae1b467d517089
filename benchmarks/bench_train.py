"""Train-step speed: a QAT step vs the same step with quantization off, tokens/s, peak memory.

Both steps are built from the same run config, model weights and batch, in one process; timed
blocks alternate (QAT, float, QAT, float, ...) so machine load drifts hit both alike. Reports
medians over blocks, of wall time and of process CPU time (the latter is robust to other
processes sharing the machine; on an idle machine wall time is what counts). Goal (docs/anchors): QAT/float step time <= 1.05x at >= 256 tokens per
device per step; SmolLM2-135M 4x256 fp32 >= 190 tok/s on the 2-core CPU.

    python benchmarks/bench_train.py --config configs/tiny.yaml
    python benchmarks/bench_train.py --config configs/smollm2-135m.yaml train.batch_size=4 \\
        data.seq_len=256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time

import jax
import numpy as np


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per variant")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--float-only", action="store_true", help="skip QAT (peak memory of float)")
    p.add_argument("--qat-only", action="store_true", help="skip float (peak memory of QAT)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from paretoq_jax.config import load_config
    from paretoq_jax.run.build import build_mesh, build_model
    from paretoq_jax.run.config import RunConfig
    from paretoq_jax.train.loop import build_trainer

    cfg = load_config(RunConfig, args.config, args.overrides)
    mesh = build_mesh(cfg)
    b, s = cfg.train.batch_size, cfg.data.seq_len
    vocab = None
    variants = {}
    names = ["qat", "float"]
    if args.float_only:
        names = ["float"]
    if args.qat_only:
        names = ["qat"]
    for name in names:
        bits = cfg.model.bits if name == "qat" else 32
        vcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, bits=bits))
        t0 = time.perf_counter()
        model = build_model(vcfg, mesh)
        load_s = time.perf_counter() - t0
        rss_load = _peak_rss_gib()  # peak so far: the process + loading the weights
        vocab = model.config.vocab_size
        state, step, teacher = build_trainer(vcfg, mesh, model)
        extra = () if teacher is None else (teacher,)  # distillation's frozen teacher
        del model
        tokens = np.random.default_rng(0).integers(0, vocab, (b, s), dtype=np.int32)
        batch = {"tokens": jax.device_put(tokens, step.batch_sharding)}
        t0 = time.perf_counter()
        state, m = step(state, batch, *extra)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        rss_compile = _peak_rss_gib()  # ... + building the state, compiling, the first step
        state, m = step(state, batch, *extra)  # one more warm-up
        jax.block_until_ready(m)
        variants[name] = {"state": state, "step": step, "batch": batch, "extra": extra, "times": [], "cpu": [],
                          "load_s": load_s, "compile_s": compile_s,
                          "peak_rss_after_load_gib": round(rss_load, 3),
                          "peak_rss_after_first_step_gib": round(rss_compile, 3)}  # fmt: skip

    for _ in range(args.blocks):
        for v in variants.values():
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                v["state"], m = v["step"](v["state"], v["batch"], *v["extra"])
                jax.block_until_ready(m)
                v["times"].append(time.perf_counter() - t0)
                v["cpu"].append(time.process_time() - c0)

    out = {
        "config": args.config,
        "overrides": args.overrides,
        "bits": cfg.model.bits,
        "dtype": cfg.model.dtype,
        "tokens_per_step": b * s,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "peak_rss_gib": round(_peak_rss_gib(), 3),
    }
    for name, v in variants.items():
        med = statistics.median(v["times"])
        out[name] = {
            "median_step_s": round(med, 5),
            "tokens_per_sec": round(b * s / med, 1),
            # CPU-seconds per step: robust to other processes sharing the cores.
            "median_cpu_s": round(statistics.median(v["cpu"]), 5),
            "compile_s": round(v["compile_s"], 2),
            "load_s": round(v["load_s"], 2),
            "peak_rss_after_load_gib": v["peak_rss_after_load_gib"],
            "peak_rss_after_first_step_gib": v["peak_rss_after_first_step_gib"],
        }
    if len(variants) == 2:
        q, f = out["qat"], out["float"]
        out["qat_over_float"] = round(q["median_step_s"] / f["median_step_s"], 4)
        out["qat_over_float_cpu"] = round(q["median_cpu_s"] / f["median_cpu_s"], 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
