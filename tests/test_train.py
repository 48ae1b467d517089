"""Train step, optimizer and an end-to-end run of configs/tiny.yaml (in-process, seconds)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from paretoq_jax.config import ConfigError, load_config
from paretoq_jax.models import Llama, LlamaConfig, resolve_rules
from paretoq_jax.run.checkpoint import Checkpointer
from paretoq_jax.run.config import OptimizerConfig
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.run.optim import make_optimizer, make_schedule
from paretoq_jax.run.state import init_state, state_shardings
from paretoq_jax.sharding import make_mesh, shard_model
from paretoq_jax.train import NonFiniteLossError, RunConfig, TrainConfig, train
from paretoq_jax.train.step import make_train_step, split_batch, token_kl_sum, token_nll_sum

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(
        RunConfig,
        TINY,
        [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides],
    )


def test_token_nll_matches_float64_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)) * 4
    labels = rng.integers(0, 11, size=(2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ref = -(np.take_along_axis(logp, labels[..., None], -1)[..., 0] * mask).sum()
    s, n = token_nll_sum(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
    assert float(n) == mask.sum()
    np.testing.assert_allclose(float(s), ref, rtol=1e-5)


def test_split_batch_shifts_labels_and_masks_last():
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    b = split_batch(tokens)
    np.testing.assert_array_equal(b["inputs"], tokens)
    np.testing.assert_array_equal(b["labels"][:, :-1], tokens[:, 1:])
    np.testing.assert_array_equal(b["mask"][:, -1], 0)
    assert float(b["mask"].sum()) == 10


def _tcfg(steps: int, batch_size: int, grad_accum: int = 1, **optimizer) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        optimizer=OptimizerConfig(**optimizer),
    )  # fmt: skip


def test_schedules():
    base = dict(steps=10, lr=1.0, batch_size=1)
    cos = make_schedule(_tcfg(**base, schedule="cosine"))
    np.testing.assert_allclose([cos(0), cos(5), cos(10)], [1.0, 0.5, 0.0], atol=1e-6)
    lin = make_schedule(_tcfg(**base, schedule="linear", min_lr_ratio=0.1))
    np.testing.assert_allclose([lin(0), lin(5), lin(10)], [1.0, 0.55, 0.1], atol=1e-6)
    const = make_schedule(_tcfg(**base, schedule="constant", warmup_steps=4))
    np.testing.assert_allclose([const(0), const(2), const(4), const(9)], [0, 0.5, 1, 1], atol=1e-6)
    warm_cos = make_schedule(_tcfg(**base, warmup_steps=2))
    np.testing.assert_allclose([warm_cos(1), warm_cos(2), warm_cos(6)], [0.5, 1.0, 0.5], atol=1e-6)


def test_bad_train_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size=6 is not divisible"):
        tiny_cfg(tmp_path, "train.batch_size=6", "train.grad_accum=4")
    with pytest.raises(ConfigError, match="did you mean 'train.optimizer.lr'"):
        tiny_cfg(tmp_path, "train.lrr=1")
    with pytest.raises(ConfigError, match="unsupported bits"):
        tiny_cfg(tmp_path, "model.bits=5")


def _tiny_state(accum: int, grad_clip: float = 1.0, bits: float = 2):
    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    model = Llama(config, quant=resolve_rules(bits), rngs=nnx.Rngs(0), scan_layers=False)
    mesh = make_mesh(1, 1, 1)
    shard_model(model, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tcfg = _tcfg(4, 4, accum, lr=1e-3, grad_clip=grad_clip, schedule="constant")
    tx = make_optimizer(tcfg)
    shardings = state_shardings(mesh, jax.tree.map(lambda x: x.sharding, params), tx, params)
    state = init_state(params, tx, shardings, seed=0)
    return make_train_step(graphdef, rest, tx, mesh, shardings, grad_accum=accum), state


def _tiny_distill_state(accum: int):
    """A 2-bit student and its float teacher, with layer-wise distillation on."""
    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    mesh = make_mesh(1, 1, 1)
    teacher = Llama(config, rngs=nnx.Rngs(3), scan_layers=False)
    student = Llama(config, quant=resolve_rules(2), rngs=nnx.Rngs(0), scan_layers=False)
    shard_model(teacher, mesh)
    shard_model(student, mesh)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    params, t_params = nnx.to_pure_dict(params), nnx.to_pure_dict(t_params)
    tx = make_optimizer(_tcfg(4, 4, accum, lr=1e-3))
    shardings = state_shardings(mesh, jax.tree.map(lambda x: x.sharding, params), tx, params)
    state = init_state(params, tx, shardings, seed=0)
    step = make_train_step(
        graphdef, rest, tx, mesh, shardings, grad_accum=accum, teacher_graphdef=t_graphdef,
        teacher_rest=t_rest, teacher_shardings=jax.tree.map(lambda x: x.sharding, t_params),
        distill=True, layer_weight=1.0,
    )  # fmt: skip
    return step, state, t_params


def test_grad_accumulation_equals_full_batch_with_layer_distillation():
    """The layer term is a ratio of batch sums: accumulating it must still give the full-batch
    loss and gradients (averaging per-micro-batch ratios would not)."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 512)
    mask = jnp.ones((4, 16)).at[1, 5:].set(0)
    results = []
    for accum in (1, 2):
        step, state, t_params = _tiny_distill_state(accum)
        state, m = step(state, {"tokens": tokens, "mask": mask}, t_params)
        results.append((float(m["loss"]), float(m["grad_norm"]), state["params"]))
    for loss, gn, params in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
        np.testing.assert_allclose(gn, results[0][1], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params,
                     results[0][2])  # fmt: skip


def test_grad_accumulation_equals_full_batch():
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 512)
    mask = jnp.ones((4, 16)).at[1, 5:].set(0)  # unequal token counts per micro-batch
    results = []
    for accum in (1, 4):
        step, state = _tiny_state(accum)
        state, m = step(state, {"tokens": tokens, "mask": mask})
        results.append((float(m["loss"]), float(m["grad_norm"]), state["params"]))
    for loss, gn, params in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        np.testing.assert_allclose(gn, results[0][1], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params,
                     results[0][2])  # fmt: skip


def test_clipping_and_adamw_match_optax_reference():
    """Two steps of our step function equal hand-written clip + AdamW updates on the same
    grads. Adam's first update, lr * g / |g|, is blind to a global rescaling of g, so the clip
    only shows from the second step on (when the two steps' clip factors differ); the test
    checks that dropping the clip would miss the tolerance by far."""
    clip = 0.05  # below every step's gradient norm: each step is clipped, by its own factor
    # float weights: with 2-bit fake quantization, float noise in step 1 flips codes and
    # changes step 2's gradients (the optimizer is the same for both)
    step, state = _tiny_state(1, grad_clip=clip, bits=16)
    # the second batch is one repeated token, so its gradient norm, and clip factor, differ from the first
    batches = [jax.random.randint(jax.random.PRNGKey(2), (4, 16), 0, 512),
               jnp.full((4, 16), 7, jnp.int32)]  # fmt: skip
    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    model = Llama(config, quant=resolve_rules(16), rngs=nnx.Rngs(0), scan_layers=False)
    g, _, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, tokens):
        logits = nnx.merge(g, p, rest)(tokens)
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    def reference(tx):
        p = jax.tree.map(jnp.copy, state["params"])
        opt, norms = tx.init(p), []
        for tokens in batches:
            grads = jax.grad(loss_fn)(p, tokens)
            norms.append(float(optax.tree.norm(grads)))
            updates, opt = tx.update(grads, opt, p)
            p = optax.apply_updates(p, updates)
        return p, norms

    adamw = optax.adamw(1e-3, 0.9, 0.999, 1e-8, 0.0)
    expected, norms = reference(optax.chain(optax.clip_by_global_norm(clip), adamw))
    unclipped, _ = reference(adamw)
    got_norms = []
    for tokens in batches:
        state, m = step(state, {"tokens": tokens})
        got_norms.append(float(m["grad_norm"]))
    np.testing.assert_allclose(got_norms, norms, rtol=1e-4)  # reported before clipping
    assert min(norms) > 2 * clip and max(norms) / min(norms) > 1.05, norms

    def dist(a, b):  # global L2 distance between two parameter trees
        return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)))

    p0 = _tiny_state(1, bits=16)[1]["params"]
    moved = dist(expected, p0)  # the two updates' size
    err, skip_clip = dist(state["params"], expected) / moved, dist(unclipped, expected) / moved
    assert err < 1e-4, err  # float-order noise (measured 1.1e-5)
    assert skip_clip > 100 * 1e-4, skip_clip  # unclipped: 0.27, far outside the bound above


def test_train_seq_len_trains_short_and_scores_the_usual_blocks(tmp_path):
    """data.train_seq_len=32: steps see 8 x 32 tokens; validation is on the 64-token blocks."""
    base = tiny_cfg(
        tmp_path, "train.steps=2", "train.logging.eval_every=2", "run_dir=" + str(tmp_path / "a")
    )
    short = tiny_cfg(tmp_path, "train.steps=2", "train.logging.eval_every=2",
                     "data.train_seq_len=32",
                     "run_dir=" + str(tmp_path / "b"))  # fmt: skip
    train(base, progress=False)
    train(short, progress=False)
    a = read_metrics(Path(base.run_dir) / "metrics.jsonl")
    b = read_metrics(Path(short.run_dir) / "metrics.jsonl")
    assert [r["tokens"] for r in a] == [8 * 64, 16 * 64]
    assert [r["tokens"] for r in b] == [8 * 32, 16 * 32]
    # both runs score the same 64-token validation blocks (tests/test_data.py checks the blocks)
    assert np.isfinite(b[-1]["val_loss"]) and b[-1]["val_loss"] != a[-1]["val_loss"]


def test_tiny_run_end_to_end(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2",
                   "train.logging.quant_stats_every=3", "train.logging.eval_every=3")  # fmt: skip
    out = train(cfg, progress=False)
    run = Path(cfg.run_dir)
    assert out["step"] == 6
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["model"]["bits"] == 2
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert rows[-1]["val_ppl"] == pytest.approx(np.exp(rows[-1]["val_loss"]))
    q1, q3 = rows[0]["quant"], rows[2]["quant"]
    assert set(q1) == {f"layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert q1["layers.0.self_attn.q_proj"]["codes_changed"] is None
    stats = q3["layers.1.mlp.up_proj"]
    assert 0 <= stats["outside_clip"] <= 1 and 0 < stats["codes_changed"] < 1
    assert stats["scale_mean"] > 0
    ckpt = Checkpointer(run / "checkpoints")
    assert ckpt.all_steps() == [4, 6]  # keep=2
    ckpt.close()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.steps=6", "train.optimizer.lr=1e30",
                   "train.optimizer.grad_clip=0",
                   "checkpoint.every=1", "train.logging.quant_stats_every=0")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss.*last good checkpoint is step"):
        train(cfg, progress=False)
    ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints")
    steps = ckpt.all_steps()
    ckpt.close()
    rows = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert steps and steps[-1] == rows[-1]["step"]  # nothing saved for the bad step
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_token_kl_matches_float64():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 3, 7)) * 3, rng.normal(size=(2, 3, 7)) * 3
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float64)

    def logp(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ref = ((np.exp(logp(t)) * (logp(t) - logp(s))).sum(-1) * mask).sum()
    got, n = token_kl_sum(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                          jnp.asarray(mask))  # fmt: skip
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    assert float(n) == 4


def test_distillation_from_saved_float_teacher(tmp_path):
    """Load a saved HF folder as the pretrained model; distill its 2-bit student from it."""
    from transformers import AutoTokenizer

    from paretoq_jax.io import save_pretrained

    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    teacher = Llama(config, rngs=nnx.Rngs(3), scan_layers=False)
    tok = AutoTokenizer.from_pretrained(str(ROOT / "configs/models/tiny-llama"))
    save_pretrained(teacher, tmp_path / "teacher", tokenizer=tok)
    cfg = tiny_cfg(tmp_path, f"model.path={tmp_path / 'teacher'}", "model.init=pretrained",
                   "train.distill.logits=true", "train.steps=4",
                   "train.logging.quant_stats_every=0",
                   "checkpoint.every=100")  # fmt: skip
    train(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl")]
    assert len(losses) == 4 and losses[0] > 0 and losses[-1] < losses[0]


def test_weight_decay_mask_covers_kernels_and_embedding_only():
    """Decay: projection kernels and the token embedding; never norms or learned scales."""
    from paretoq_jax.run.optim import decay_mask

    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    model = Llama(config, quant=resolve_rules(2), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])  # layers stacked: 2-D norms
    mask = {
        jax.tree_util.keystr(p, simple=True, separator="."): m
        for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    }
    assert mask.pop("embed_tokens") is True
    for name, decayed in mask.items():
        assert decayed == name.endswith(".kernel"), name
    assert sum(mask.values()) == 7  # q, k, v, o, gate, up, down
    # Behaviour: with zero gradients AdamW's update is the decay alone, -lr * wd * p.
    tx = make_optimizer(_tcfg(1, 1, lr=0.1, weight_decay=0.5))
    zeros = jax.tree.map(jnp.zeros_like, params)
    new = optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])
    np.testing.assert_allclose(new["embed_tokens"], params["embed_tokens"] * 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new["norm"]["weight"], params["norm"]["weight"])
    q, q0 = new["layers"]["self_attn"]["q_proj"], params["layers"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(q["kernel"], q0["kernel"] * 0.95, rtol=1e-6)
    np.testing.assert_array_equal(q["scale"], q0["scale"])
