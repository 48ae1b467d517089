"""Which XLA CPU flags speed up the train step: ``bench_train.py`` under each flag set.

XLA reads ``XLA_FLAGS`` once per process, so every flag set runs ``benchmarks/bench_train.py``
in its own subprocess; with ``--rounds > 1`` the sets alternate (A, B, C, A, B, C) so load
drifts hit all alike. Candidates are XLA's library paths for dots on CPU (XNNPACK, YNNPACK and
oneDNN, which has fast bf16 kernels for AVX-512 BF16 / AMX); the default is XLA's own dot
emitter (Eigen for float32). Prints a markdown table of the QAT step's tokens/s (wall and
CPU-time based), relative to the first set.

    python benchmarks/bench_xla_flags.py                       # SmolLM2-135M bf16 4x256, ~4 min
    python benchmarks/bench_xla_flags.py --dtype float32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAG_SETS = {
    "default": "",
    "xnn dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn custom call": "--xla_cpu_experimental_onednn_custom_call=true",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m.yaml"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--sets", default=",".join(FLAG_SETS), help="names from FLAG_SETS")
    p.add_argument("overrides", nargs="*", default=["train.batch_size=4", "data.seq_len=256"])
    args = p.parse_args()
    t_start = time.time()
    sets = args.sets.split(",")
    results: dict[str, list[dict]] = {s: [] for s in sets}
    for _ in range(args.rounds):
        for name in sets:
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       f"{FLAG_SETS[name]}".strip())  # fmt: skip
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--config",
                   args.config, "--qat-only", "--blocks", "2", "--steps", "2",
                   f"model.dtype={args.dtype}", *args.overrides]  # fmt: skip
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: failed: {r.stderr[-600:]}", file=sys.stderr)
                continue
            out = json.loads(r.stdout[r.stdout.index("{") :])
            results[name].append(out)
    print(f"\nQAT step, {args.config} {' '.join(args.overrides)} model.dtype={args.dtype}; "
          f"median over {args.rounds} round(s); load average {os.getloadavg()[0]:.2f}; "
          f"{time.time() - t_start:.0f} s\n")  # fmt: skip
    print("| XLA flags | tokens/s | tokens/CPU-s | vs first | peak RSS GiB |")
    print("|---|---|---|---|---|")
    base = None
    for name in sets:
        runs = results[name]
        if not runs:
            print(f"| {name} | failed | | | |")
            continue
        tps = statistics.median(r["qat"]["tokens_per_sec"] for r in runs)
        cpu = statistics.median(r["tokens_per_step"] / r["qat"]["median_cpu_s"] for r in runs)
        base = base or tps
        rss = max(r["peak_rss_gib"] for r in runs)
        print(f"| {name} `{FLAG_SETS[name]}` | {tps:.1f} | {cpu:.1f} | {tps / base:.2f}x | "
              f"{rss:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
