"""FSDP code gathering: weight all-gather bytes per step (read from the compiled HLO) and step
time, ``mesh.gather_codes`` on vs off, on 8 host CPU devices with fsdp = 8 (or a given mesh).

Both steps are built from the same run config, weights and batch in one process; timed blocks
alternate (on, off, on, off, ...) so that machine load drifts hit both alike; medians of wall and
process CPU time per step. Bytes: ``codes`` / ``scales`` are the u8 / f32 gathers of the
gathered-codes op, ``floats`` the plain path's float gathers of quantized kernels
(``code_gather.weight_gather_bytes``); ``bf16`` is the plain path's weight traffic at 2 bytes a
weight (the f32 gathers halved when the compute dtype is f32, as on CPU). Goal (issue 16): the
code path's bytes <= 1/6 of bf16 at 2 bits, <= 1/3 at 4 bits; step time no slower than plain.
Timings on a shared, loaded machine mean nothing; the bytes do not depend on load.

    python benchmarks/bench_code_gather.py --config configs/tiny.yaml
    python benchmarks/bench_code_gather.py --config configs/smollm2-135m.yaml \\
        model.init=random model.scan_layers=true train.batch_size=8 data.seq_len=256
    python benchmarks/bench_code_gather.py --config configs/tiny.yaml --no-time model.bits=4 \\
        model.method=lsq
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor (default 1,8,1)")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per variant")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--no-time", action="store_true", help="bytes only (compile, do not run)")
    p.add_argument("--dump", help="write each variant's optimized HLO text to DUMP.{on,off}.hlo")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from paretoq_jax import hlo
    from paretoq_jax.config import load_config
    from paretoq_jax.parallel import code_gather
    from paretoq_jax.run.build import build_mesh, build_model
    from paretoq_jax.run.config import RunConfig
    from paretoq_jax.train.loop import build_trainer

    d, f, t = (int(x) for x in args.mesh.split(","))
    base = ["run_dir=/tmp/bench_code_gather", f"mesh.data={d}", f"mesh.fsdp={f}",
            f"mesh.tensor={t}", *args.overrides]  # fmt: skip
    variants, report = {}, {"devices": jax.device_count(), "mesh": [d, f, t]}
    for mode in ("on", "off"):
        cfg = load_config(RunConfig, args.config, [*base, f"mesh.gather_codes={mode == 'on'}"])
        mesh = build_mesh(cfg)
        model = build_model(cfg, mesh)
        state, step, _ = build_trainer(cfg, mesh, model)
        b, s, vocab = cfg.train.batch_size, cfg.data.seq_len, model.config.vocab_size
        tokens = np.random.RandomState(0).randint(0, vocab, (b, s)).astype(np.int32)
        batch = {"tokens": jax.device_put(tokens, step.batch_sharding)}
        t0 = time.perf_counter()
        compiled = step.fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        text = compiled.as_text()
        if args.dump:
            Path(f"{args.dump}.{mode}.hlo").write_text(text)
        gathered = code_gather.weight_gather_bytes(text, model, mesh)
        by_kind: dict[str, int] = {}
        for c in hlo.collectives(text):
            key = f"{c.kind} {c.dtype}"
            by_kind[key] = by_kind.get(key, 0) + c.total_bytes
        report[mode] = {"compile_s": round(compile_s, 1), **gathered, "collectives": by_kind}
        report["bits"], report["method"] = cfg.model.bits, cfg.model.method
        variants[mode] = [compiled, state, batch]
        del model
    on, off = report["on"], report["off"]
    bf16 = 2 * off["float_weights"]
    code_bytes = on["codes"] + on["scales"]
    report["bf16_weight_gather_bytes"] = bf16
    report["code_weight_gather_bytes"] = code_bytes
    report["ratio_vs_bf16"] = round(code_bytes / bf16, 4) if bf16 else None

    if not args.no_time:
        for v in variants.values():  # warm up (first run allocates)
            v[1], _ = v[0](v[1], v[2])
            jax.block_until_ready(v[1])
        times = {m: ([], []) for m in variants}
        for _ in range(args.blocks):
            for mode, v in variants.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    v[1], metrics = v[0](v[1], v[2])
                jax.block_until_ready(metrics)
                times[mode][0].append((time.perf_counter() - w0) / args.steps)
                times[mode][1].append((time.process_time() - c0) / args.steps)
        for mode, (wall, cpu) in times.items():
            report[mode]["step_wall_s"] = round(statistics.median(wall), 4)
            report[mode]["step_cpu_s"] = round(statistics.median(cpu), 4)
        report["wall_on_over_off"] = round(
            report["on"]["step_wall_s"] / report["off"]["step_wall_s"], 3
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
