"""Child process of tests/test_code_gather.py and benchmarks/bench_code_gather.py: runs on 8 host
CPU devices (the parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and prints
``RESULT<json>``.

    python tests/code_gather_child.py '{"op": {...}, "train": [...]}'

``op``: every (bits, method) on a 2x2x2 mesh and on fsdp=8, a kernel split on its ``in`` and on
its ``out`` dimension: whether the gathered forward equals ``fake_quant`` bit for bit, and the
largest relative difference of the loss and gradients (``unpack``: the unpack paths to run,
``rows``: the kernels' input dimension).
``train``: cases ``{bits, method, mesh: [d, f, t], remat, scan, steps, grads}``: the tiny model
trained ``steps`` steps with code gathering on and off on the same batches; per-step losses and
grad norms, the final parameters' largest difference, optionally the first batch's full
gradients, and the all-gather bytes of both compiled steps (``paretoq_jax.hlo``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from paretoq_jax import hlo, quant
from paretoq_jax.parallel import code_gather
from paretoq_jax.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
COMBOS = [
    (1, "elastic"), (1, "absmean"), (1, "minmax"),
    *[(b, m) for b in (1.58, 2, 3, 4) for m in ("seq", "lsq", "absmean", "minmax")],
]  # fmt: skip


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _op_loss(w, scale, x, spec, plan, gathered):
    if gathered:
        wq = code_gather.gathered_fake_quant(w, scale, spec, plan)
    else:
        wq = quant.fake_quant(w, scale, spec)
    y = jnp.einsum("lbi,lio->lbo", x, wq)
    return jnp.sum(jnp.tanh(y) * jnp.cos(y)), wq


_op_grad = jax.value_and_grad(_op_loss, argnums=(0, 1), has_aux=True)


def op_mesh(mesh_shape, combos, unpack: str = "xla", rows: int = 80) -> dict:
    """One jitted program holding every combo, plain or gathered, a kernel ``(2, rows, 48)``
    split along in and one split along out; exact zeros in the kernels (1 bit keeps sign(0) =
    0). ``unpack``: how the gathered codes are unpacked (``CodeGather.unpack``; ``interpret``
    runs the TPU kernel interpreted); ``rows`` not a multiple of 8 per shard pads the packing."""
    mesh = make_mesh(*mesh_shape)
    key = jax.random.PRNGKey(0)
    layouts = {"in": (None, "fsdp", "tensor"), "out": (None, "tensor", "fsdp")}
    args, specs = {}, {}
    for li, (layout, names) in enumerate(layouts.items()):
        plan = code_gather.CodeGather(
            mesh,
            in_axes=(names[1],) if mesh.shape[names[1]] > 1 else (),
            out_axes=(names[2],) if mesh.shape[names[2]] > 1 else (),
            gather=("fsdp",),
            unpack=unpack,
        )
        kspec = P(*(a if a in plan.in_axes + plan.out_axes else None for a in names))
        for ci, (bits, method) in enumerate(combos):
            spec = quant.resolve(bits, method)
            w = 0.02 * jax.random.normal(jax.random.fold_in(key, 100 * li + ci), (2, rows, 48))
            w = w.at[0, 0, :4].set(0.0)
            scale = quant.init_scale(w, spec) * 0.7 if spec.learned else None
            w = jax.device_put(w, NamedSharding(mesh, kspec))
            if scale is not None:
                scale = jax.device_put(scale, NamedSharding(mesh, P(None, kspec[2])))
            args[f"{layout}/{bits}/{method}"] = (w, scale)
            specs[f"{layout}/{bits}/{method}"] = (spec, plan)
    x = jax.random.normal(key, (2, 6, rows))

    def run(args, gathered):
        return {
            name: _op_grad(w, scale, x, *specs[name], gathered) for name, (w, scale) in args.items()
        }

    fn = jax.jit(run, static_argnums=1)
    plain, gath = fn(args, False), fn(args, True)
    out = {}
    for name in args:
        ((l0, w0), g0), ((l1, w1), g1) = plain[name], gath[name]
        grads = [_rel(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True)]
        tag = "" if unpack == "xla" else f"{unpack}:"
        out[f"{tag}{'x'.join(map(str, mesh_shape))}/{name}"] = {
            "forward_equal": bool(jnp.all(w0 == w1)),
            "loss": _rel(l1, l0),
            "grads": max(grads),
            "grad_leaves": len(grads),
        }
    return out


def _tokens(step: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    return np.random.RandomState(step).randint(0, vocab, (batch, seq)).astype(np.int32)


def _loss(graphdef, params, rest, tokens):
    from paretoq_jax.train.step import split_batch, token_nll_sum

    data = split_batch(tokens)
    logits = nnx.merge(graphdef, params, rest)(data["inputs"])
    total, count = token_nll_sum(logits, data["labels"], data["mask"])
    return total / count


def train_case(case: dict) -> dict:
    from paretoq_jax.config import load_config
    from paretoq_jax.run.build import build_mesh, build_model
    from paretoq_jax.train import RunConfig
    from paretoq_jax.train.loop import build_trainer

    d, f, t = case["mesh"]
    base = [
        "run_dir=/tmp/unused", f"model.bits={case['bits']}", f"model.method={case['method']}",
        f"model.remat={case.get('remat', False)}", f"model.scan_layers={case.get('scan', False)}",
        f"model.dtype={case.get('dtype', 'float32')}", f"mesh.data={d}", f"mesh.fsdp={f}",
        f"mesh.tensor={t}", *case.get("overrides", []),
    ]  # fmt: skip
    config = case.get("config", str(ROOT / "configs" / "tiny.yaml"))
    steps, result = case.get("steps", 3), {}
    for mode in ("on", "off"):
        cfg = load_config(RunConfig, config, [*base, f"mesh.gather_codes={mode == 'on'}"])
        mesh = build_mesh(cfg)
        model = build_model(cfg, mesh)
        # auto leaves CPU meshes on float kernels (code_gather.pays_on): nothing gathers codes
        n_auto = code_gather.configure(model, mesh, "auto")
        n_gather = code_gather.configure(model, mesh, mode, keep=cfg.mesh.keep_codes)
        quantized = [m for _, m in nnx.iter_modules(model) if getattr(m, "spec", None) is not None]
        state, step, _ = build_trainer(cfg, mesh, model)
        b, s = cfg.train.batch_size, cfg.data.seq_len
        vocab = model.config.vocab_size
        batches = [
            {"tokens": jax.device_put(_tokens(i, b, s, vocab), step.batch_sharding)}
            for i in range(steps)
        ]
        compiled = step.fn.lower(state, batches[0]).compile()
        text = compiled.as_text()
        weight = code_gather.weight_gather_bytes(text, model, mesh)
        expected = []  # per quantized linear and layer: (code bytes, scale bytes, weights, bits)
        for m in quantized:
            plan = code_gather.plan_for(m.kernel, mesh)
            if plan is None:
                continue
            *lead, n_in, n_out = m.kernel.shape
            codes, scales = plan.gathered_bytes(m.spec, (n_in, n_out))
            keep = [plan._size(tuple(a for a in axes if a not in plan.gather))
                    for axes in (plan.in_axes, plan.out_axes)]  # fmt: skip
            in_local = n_in // plan._size(plan.in_axes)
            fmt = quant.pack_format(*code_gather.pack_layout(m.spec, in_local))
            n = n_in // keep[0] * (n_out // keep[1])
            expected += [(codes, scales, n, fmt.bits_per_code)] * int(np.prod(lead))
        r = {
            "gathering": n_gather,
            "gathering_auto": n_auto,
            "weights": sum(m.kernel.size for m in quantized),
            "scales": sum(m.kernel.shape[-1] * int(np.prod(m.kernel.shape[:-2])) for m in quantized),
            "u8_gather_bytes": hlo.collective_bytes(text, where=lambda c: c.dtype == "u8"),
            "scope_gather_bytes": hlo.collective_bytes(
                text, where=lambda c: code_gather.SCOPE in c.op_name
            ),
            "scope_non_u8": sorted(
                {c.dtype for c in hlo.collectives(text)
                 if code_gather.SCOPE in c.op_name and c.kind == "all-gather"} - {"u8"}
            ),
            "all_gather_bytes": hlo.collective_bytes(text),
            "expected": expected,
            "u8_gathers": [[c.bytes, c.count] for c in hlo.collectives(text)
                           if c.kind == "all-gather" and c.dtype == "u8"],
            "float_kernel_gather_bytes": weight["floats"],
            "float_weights": weight["float_weights"],
            "all_gathers": [
                [c.dtype, list(c.shapes[0]), c.count, c.op_name[-60:]]
                for c in hlo.collectives(text) if c.kind == "all-gather"
            ],
            "exact_counts": all(c.exact for c in hlo.collectives(text)),
        }  # fmt: skip
        if case.get("grads"):
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            grads = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(
                graphdef, params, rest, batches[0]["tokens"]
            )
            r["grads"] = jax.tree.map(np.asarray, nnx.to_pure_dict(grads))
        losses, norms = [], []
        for batch in batches:
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        r.update(losses=losses, grad_norms=norms)
        r["params"] = jax.tree.map(np.asarray, state["params"])
        result[mode] = r
        del state, compiled, model
    on, off = result["on"], result["off"]
    summary = {
        "gathering": on["gathering"],
        "gathering_off": off["gathering"],
        "gathering_auto_cpu": on["gathering_auto"],
        "losses_on": on["losses"],
        "losses_off": off["losses"],
        "loss": _rel(on["losses"], off["losses"]),
        "grad_norm": _rel(on["grad_norms"], off["grad_norms"]),
        "params": max(_rel(a, b) for a, b in
                      zip(jax.tree.leaves(on["params"]), jax.tree.leaves(off["params"]), strict=True)),
    }  # fmt: skip
    summary["params_detail"] = {
        jax.tree_util.keystr(path): [_rel(a, b), float(np.max(np.abs(a - b))),
                                     int(np.sum(np.abs(a - b) > 1e-6)), int(a.size),
                                     float(np.mean(np.abs(a - b)))]
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(on["params"]),
                                jax.tree.leaves(off["params"]), strict=True)
    }  # fmt: skip
    # where each leaf drifts most: the parameters there and (with grads) the first step's
    # gradients on both paths against the leaf's largest gradient (Adam's sensitivity)
    summary["params_argmax"] = {}
    g_on = dict(jax.tree_util.tree_leaves_with_path(on.get("grads", {})))
    g_off = dict(jax.tree_util.tree_leaves_with_path(off.get("grads", {})))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(on["params"]),
                            jax.tree.leaves(off["params"]), strict=True):  # fmt: skip
        i = np.unravel_index(int(np.argmax(np.abs(a - b))), a.shape) if a.ndim else ()
        row = {"index": [int(x) for x in i], "on": float(a[i]), "off": float(b[i])}
        gpath = next(
            (k for k in g_on if jax.tree_util.keystr(k) == jax.tree_util.keystr(path)), None
        )
        if gpath is not None:
            ga, gb = np.asarray(g_on[gpath]), np.asarray(g_off[gpath])
            row.update(grad_on=float(ga[i]), grad_off=float(gb[i]),
                       grad_leaf_max=float(np.max(np.abs(gb))),
                       grad_leaf_max_diff=float(np.max(np.abs(ga - gb))))  # fmt: skip
        summary["params_argmax"][jax.tree_util.keystr(path)] = row
    if case.get("grads"):
        summary["grads"] = max(
            _rel(a, b)
            for a, b in zip(
                jax.tree.leaves(on["grads"]), jax.tree.leaves(off["grads"]), strict=True
            )
        )
    for mode in ("on", "off"):
        for k in ("weights", "scales", "u8_gather_bytes", "scope_gather_bytes", "scope_non_u8",
                  "all_gather_bytes", "float_kernel_gather_bytes", "float_weights", "exact_counts",
                  "expected", "u8_gathers"):  # fmt: skip
            summary[f"{k}_{mode}"] = result[mode][k]
    summary["all_gathers_off"] = result["off"]["all_gathers"]
    summary["all_gathers_on"] = result["on"]["all_gathers"]
    return summary


def main() -> None:
    spec = json.loads(sys.argv[1])
    assert len(jax.devices()) == 8, "set XLA_FLAGS=--xla_force_host_platform_device_count=8"
    out = {}
    if "op" in spec:
        combos = [tuple(c) for c in spec["op"].get("combos", COMBOS)]
        out["op"] = {}
        rows = spec["op"].get("rows", 80)
        for mesh_shape in spec["op"].get("meshes", [[2, 2, 2], [1, 8, 1]]):
            for unpack in spec["op"].get("unpack", ["xla"]):
                out["op"].update(op_mesh(mesh_shape, combos, unpack, rows))
    out["train"] = [train_case(c) for c in spec.get("train", [])]
    print("RESULT" + json.dumps(out))


if __name__ == "__main__":
    main()
