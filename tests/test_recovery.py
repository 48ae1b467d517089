"""Low-budget recovery options: least-squares scale init and block-wise (per-layer) distillation."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paretoq_jax import quant
from paretoq_jax.models import Llama, LlamaConfig, resolve_rules
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig
from paretoq_jax.train.step import layer_reconstruction

ROOT = Path(__file__).resolve().parents[1]
LEARNED = [(1, "elastic"), (1.58, "seq"), (2, "seq"), (3, "lsq"), (4, "lsq"), (2, "lsq")]


def _heavy_tailed(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)


def _err(w, a, spec) -> np.ndarray:
    q = np.asarray(quant.fake_quant(jnp.asarray(w), jnp.asarray(a, jnp.float32), spec))
    return ((w.astype(np.float64) - q) ** 2).sum(axis=-2)


@pytest.mark.parametrize("bits,method", LEARNED)
def test_mse_scale_never_worse_than_init_and_near_brute_force(bits, method):
    spec = quant.resolve(bits, method)
    w = _heavy_tailed((96, 7))
    a0 = np.asarray(quant.init_scale(jnp.asarray(w), spec))
    a = np.asarray(quant.mse_scale(jnp.asarray(w), spec))
    assert a.shape == a0.shape and np.all(a > 0)
    e0, e = _err(w, a0, spec), _err(w, a, spec)
    assert np.all(e <= e0 * (1 + 1e-6))
    # Independent brute force: 4,000 candidate scales per row in (0, a0].
    fracs = np.linspace(1 / 4000, 1, 4000)
    brute = np.min([_err(w, a0 * f, spec) for f in fracs], axis=0)
    np.testing.assert_array_less(e, brute * 1.01 + 1e-12)


def test_mse_scale_is_the_paper_init_at_one_bit_and_helps_seq():
    w = _heavy_tailed((256, 16), seed=1)
    spec1 = quant.resolve(1, "elastic")
    np.testing.assert_allclose(
        quant.mse_scale(jnp.asarray(w), spec1), quant.init_scale(jnp.asarray(w), spec1), rtol=1e-6
    )
    spec2 = quant.resolve(2, "seq")  # max|W| init: heavy tails put most weights on +-a/4
    a0 = quant.init_scale(jnp.asarray(w), spec2)
    a = quant.mse_scale(jnp.asarray(w), spec2)
    assert np.all(np.asarray(a) < np.asarray(a0))
    assert _err(w, a, spec2).sum() < 0.5 * _err(w, a0, spec2).sum()


def test_mse_scale_stacked_and_errors():
    w = _heavy_tailed((3, 40, 5), seed=2)
    spec = quant.resolve(2, "seq")
    a = quant.mse_scale(jnp.asarray(w), spec)
    for i in range(3):
        np.testing.assert_allclose(a[i], quant.mse_scale(jnp.asarray(w[i]), spec), rtol=1e-6)
    with pytest.raises(ValueError, match="learned method"):
        quant.mse_scale(jnp.asarray(w), 2, "absmean")


def test_scale_init_config_errors():
    base = {"run_dir": "r", "model": {"path": "x", "init": "random", "scale_init": "mse"},
            "train": {"steps": 1, "lr": 1e-3, "batch_size": 1}, "data": {"path": "default"}}  # fmt: skip
    from paretoq_jax.config import ConfigError, from_dict

    with pytest.raises((ConfigError, ValueError), match="scale_init"):
        from_dict(RunConfig, base)
    base["model"]["init"] = "pretrained"
    base["train"]["distill_layers"] = -1.0
    with pytest.raises((ConfigError, ValueError), match="distill_layers"):
        from_dict(RunConfig, base)


def _tiny(bits=16, scan=False) -> Llama:
    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    return Llama(config, quant=resolve_rules(bits, None), rngs=nnx.Rngs(0), scan_layers=scan)


@pytest.mark.parametrize("scan", [False, True])
def test_residual_stream_and_layers_on(scan):
    model = _tiny(scan=scan)
    ids = jnp.asarray(
        np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)), jnp.int32
    )
    stream = model.residual_stream(ids)
    n = model.config.num_hidden_layers
    assert stream.shape == (n + 1, 2, 12, model.config.hidden_size)
    np.testing.assert_allclose(
        model.lm_logits(model.norm(stream[-1])), model(ids), rtol=1e-5, atol=1e-5
    )
    out = model.layers_on(ids, stream[:-1])
    np.testing.assert_allclose(out, stream[1:], rtol=1e-5, atol=1e-5)
    assert float(layer_reconstruction(out, stream)) < 1e-8
    # A quantized student reconstructs each layer imperfectly, relative to the layer's update.
    student = _tiny(bits=2, scan=scan)
    rec = float(layer_reconstruction(student.layers_on(ids, stream[:-1]), stream))
    assert 1e-3 < rec < 1e3


def test_layer_reconstruction_matches_float64():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(4, 2, 3, 5))
    s = rng.normal(size=(3, 2, 3, 5))
    ref = np.mean(((s - t[1:]) ** 2).sum((1, 2, 3)) / ((t[1:] - t[:-1]) ** 2).sum((1, 2, 3)))
    got = layer_reconstruction(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_blockwise_distillation_trains(tmp_path):
    """distill_layers adds the per-layer loss: a float student equal to its teacher has ~0
    loss; a 2-bit student's loss falls."""
    from transformers import AutoTokenizer

    from paretoq_jax.config import load_config
    from paretoq_jax.io import save_pretrained
    from paretoq_jax.train import train

    config = LlamaConfig.from_json(ROOT / "configs/models/tiny-llama")
    teacher = Llama(config, rngs=nnx.Rngs(3), scan_layers=False)
    tok = AutoTokenizer.from_pretrained(str(ROOT / "configs/models/tiny-llama"))
    save_pretrained(teacher, tmp_path / "teacher", tokenizer=tok)

    def run(name, *overrides):
        cfg = load_config(RunConfig, ROOT / "configs/tiny.yaml", [
            f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
            f"model.path={tmp_path / 'teacher'}", "model.init=pretrained", "train.steps=4",
            "train.logging.quant_stats_every=0", "checkpoint.every=100",
            "train.distill.logits=true",
            "train.distill.layers=1.0", *overrides,
        ])  # fmt: skip
        train(cfg, progress=False)
        return [r["loss"] for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl")]

    same = run("float", "model.bits=16", "train.optimizer.lr=1e-9")
    assert max(same) < 1e-4
    losses = run("q2", "model.bits=2", "model.scale_init=mse", "train.optimizer.lr=5e-4")
    assert len(losses) == 4 and losses[0] > 1e-3 and losses[-1] < losses[0]
    assert all(np.isfinite(losses))
