"""Where a train step's memory goes: peak RSS after each stage and XLA's memory analysis.

    python benchmarks/mem_train_step.py --config configs/smollm2-135m.yaml \\
        train.batch_size=4 data.seq_len=256 [model.remat=true | model.bits=32]

Prints the process's resident set (VmRSS) and its peak (VmHWM) after loading the model, after
building the train state, after lowering and compiling the step, after two steps; and the
compiled step's argument / output / aliased / temporary bytes (``memory_analysis()``).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np


def _rss() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 2**20, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from paretoq_jax.config import load_config
    from paretoq_jax.run.build import build_mesh, build_model
    from paretoq_jax.run.config import RunConfig
    from paretoq_jax.train.loop import build_trainer

    cfg = load_config(RunConfig, args.config, args.overrides)
    mesh = build_mesh(cfg)
    model = build_model(cfg, mesh)
    print("model loaded (GiB)", _rss(), flush=True)
    vocab = model.config.vocab_size
    state, step, teacher = build_trainer(cfg, mesh, model)
    del model
    print("train state", _rss(), flush=True)
    b, s = cfg.train.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, vocab, (b, s), dtype=np.int32)
    batch = {"tokens": jax.device_put(tokens, step.batch_sharding)}
    extra = () if teacher is None else (teacher,)
    compiled = step.fn.lower(state, batch, *extra).compile()
    print("compiled", _rss(), flush=True)
    m = compiled.memory_analysis()
    gib = {k: round(getattr(m, f"{k}_size_in_bytes") / 2**30, 3)
           for k in ("argument", "output", "alias", "temp")}  # fmt: skip
    print("memory_analysis (GiB)", gib, flush=True)
    for i in (1, 2):
        state, metrics = compiled(state, batch, *extra)
        jax.block_until_ready(metrics)
        print(f"step {i}", _rss(), flush=True)


if __name__ == "__main__":
    main()
