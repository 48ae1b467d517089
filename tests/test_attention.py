"""Splash attention (the fused Pallas TPU kernel, run in interpret mode on CPU) and the cuDNN
call's plumbing (``jax.nn.dot_product_attention`` through its XLA implementation on CPU) against
the XLA formulation: outputs, gradients, a model under a sharded mesh, a training run; the
planner's count of the kernel's FLOPs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paretoq_jax.config import ConfigError, load_config
from paretoq_jax.models import attention
from paretoq_jax.run.metrics import read_metrics
from paretoq_jax.train import RunConfig, train

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def _qkv(b=2, s=256, kv=2, g=2, d=32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s, kv, g, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32) for _ in range(2))
    return q, k, v


def _assert_equals_dot_attention(fused, q, k, v, window):
    """``fused(q, k, v)`` and its gradients equal ``dot_attention`` with the causal mask."""
    mask = attention.causal_mask(q.shape[1], window)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    ref = lambda q, k, v: attention.dot_attention(q, k, v, mask, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(fused(q, k, v), ref(q, k, v), atol=2e-5, rtol=1e-5)
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 100])
def test_splash_equals_dot_attention_and_its_gradients(window):
    fused = attention.Splash(window, interpret=True, block=128)  # 2 x 2 blocks, one skipped
    _assert_equals_dot_attention(fused, *_qkv(), window)


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("s", [256, 96])
def test_cudnn_call_equals_dot_attention_and_its_gradients(window, s):
    """``Cudnn`` hands ``jax.nn.dot_product_attention`` our layout, GQA groups and window; with
    ``implementation="xla"`` (no GPU here) the result must be ``dot_attention``'s."""
    fused = attention.Cudnn(window, implementation="xla")
    assert fused.takes(s)
    _assert_equals_dot_attention(fused, *_qkv(s=s), window)


def test_block_size_and_a_sequence_splash_cannot_take():
    assert [attention.block_size(s) for s in (128, 256, 384, 2048, 100)] == [128, 256, 384, 512,
                                                                              None]  # fmt: skip
    assert attention.block_size(640) == 128 and attention.block_size(1536, 256) == 256
    q, k, v = _qkv(s=96)
    with pytest.raises(ValueError, match="multiple of 128.*model.attention=xla"):
        attention.Splash(interpret=True)(q, k, v)
    assert not attention.Splash(strict=False).takes(96)  # auto: such a layer runs XLA's path
    assert attention.Splash(strict=False).takes(256) and attention.Splash().takes(96)


def test_configure_modes(tmp_path, monkeypatch):
    from flax import nnx

    from paretoq_jax.models import Llama, LlamaConfig
    from paretoq_jax.models.layers import Attention

    config = LlamaConfig.from_json(FIXTURES / "tiny_llama_mistral" / "config.json")
    model = Llama(config, rngs=nnx.Rngs(0))
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, Attention)]
    assert attention.configure(model, None, "auto") == 0  # CPU: XLA
    assert all(m.fused is None for m in layers)
    assert attention.configure(model, None, "splash") == len(layers) > 0
    assert all(m.fused == attention.Splash(config.sliding_window, interpret=True) for m in layers)
    assert attention.configure(model, None, "auto") == 0 and all(m.fused is None for m in layers)
    assert (
        attention.resolve("auto", "tpu") == "splash" and attention.resolve("auto", "cpu") == "xla"
    )
    assert (
        attention.resolve("auto", "gpu") == "cudnn" and attention.resolve("auto", "rocm") == "xla"
    )
    assert attention.resolve("cudnn", "gpu") == "cudnn" and attention.resolve("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="cudnn is cuDNN's GPU kernel.*cannot run on cpu"):
        attention.configure(model, None, "cudnn")
    # what auto gives a layer on a GPU: cuDNN's flash kernel takes bf16 / fp16, head_dim % 8 == 0
    # and <= 128; other layers keep XLA's attention
    layer = layers[0]
    assert layer.head_dim % 8 == 0 and layer.head_dim <= 128
    monkeypatch.setattr(attention, "cudnn_available", lambda: True)
    for dtype, takes in ((jnp.bfloat16, True), (jnp.float16, True), (jnp.float32, False)):
        layer.dtype = dtype
        assert attention.cudnn_takes(layer) is takes
    monkeypatch.setattr(attention, "cudnn_available", lambda: False)  # no cuDNN library: XLA
    assert not attention.cudnn_takes(layer)
    monkeypatch.setattr(attention, "cudnn_available", lambda: True)
    layer.dtype, layer.head_dim = jnp.bfloat16, 12
    assert not attention.cudnn_takes(layer)
    with pytest.raises(ValueError, match="model.attention must be one of"):
        attention.configure(model, None, "flash")
    with pytest.raises(ConfigError, match="attention"):
        load_config(RunConfig, ROOT / "configs" / "tiny.yaml", ["model.attention=flash"])
    with pytest.raises((ConfigError, ValueError), match="multiples of 128.*64"):  # seq_len 64
        load_config(RunConfig, ROOT / "configs" / "tiny.yaml", ["model.attention=splash"])


def _tiny(tmp_path, name, *overrides):
    return load_config(
        RunConfig,
        ROOT / "configs" / "tiny.yaml",
        [f"run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=128",
         "train.steps=3", "train.batch_size=4", "train.logging.eval_every=3",
         "checkpoint.every=100", *overrides],
    )  # fmt: skip


def test_training_with_splash_equals_xla(tmp_path):
    """The whole train step (remat, scanned layers, validation) with the fused kernel."""
    common = ("model.remat=true", "model.scan_layers=true")
    a = train(_tiny(tmp_path, "xla", "model.attention=xla", *common), progress=False)
    b = train(_tiny(tmp_path, "splash", "model.attention=splash", *common), progress=False)
    assert a["step"] == b["step"] == 3
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-5)
    val = [[r["val_loss"] for r in read_metrics(Path(run["run_dir"]) / "metrics.jsonl") if "val_loss" in r]
           for run in (a, b)]  # fmt: skip
    assert len(val[0]) == len(val[1]) >= 1
    np.testing.assert_allclose(val[1], val[0], rtol=2e-5)


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from paretoq_jax.io import load_pretrained
    from paretoq_jax.models import attention
    from paretoq_jax.sharding import make_mesh
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (4, 128)))
    ids = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))

    def loss_and_grads(mode):
        model = load_pretrained("{fixture}", bits=2, mesh=mesh)
        if mode == "cudnn-call":  # Cudnn's shard_map and call, through JAX's XLA implementation
            assert attention.configure(model, mesh, "xla") == 0
            for _, m in nnx.iter_graph(model):
                if hasattr(m, "fused"):
                    m.fused = attention.Cudnn(m.sliding_window, implementation="xla")
        else:
            assert attention.configure(model, mesh, mode) == (mode == "splash")

        def loss(m):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return value, jax.tree.leaves(nnx.to_pure_dict(grads))

    va, ga = loss_and_grads("xla")
    for mode in ("splash", "cudnn-call"):
        vb, gb = loss_and_grads(mode)
        np.testing.assert_allclose(vb, va, rtol=1e-5)
        for a, b in zip(ga, gb, strict=True):
            np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)
    print("OK")
    """
)


def test_fused_attention_under_a_data_fsdp_tensor_mesh():
    """Splash and the cuDNN call's ``shard_map``: heads split over ``tensor`` (2 of 4 query heads
    with their key head on each device), the batch over ``data`` x ``fsdp``: the same loss and
    gradients as the XLA formulation."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")  # fmt: skip
    code = SHARDED.format(fixture=FIXTURES / "tiny_llama_gqa")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


@pytest.mark.parametrize("window", [None, 300])
def test_kernel_cost_counts_the_blocks_the_mask_keeps(window):
    b, h, s, d, kv, blk = 2, 4, 1024, 64, 2, 256
    n = s // blk
    # the reference: a block pair is computed iff the mask itself keeps some entry of it
    kept = np.asarray(attention.causal_mask(s, window)).reshape(n, blk, n, blk).any(axis=(1, 3))
    pairs = int(kept.sum())
    assert pairs == (10 if window is None else 9)  # 4 x 4 blocks: causal 10; window 300: 9
    for kind, matmuls in (("fwd", 2), ("dq", 3), ("dkv", 4)):
        flops, nbytes = attention.kernel_cost(kind, b, h, s, d, kv, window, blk)
        assert flops == matmuls * 2 * b * h * pairs * blk * blk * d
        assert nbytes > 2 * b * kv * s * d * 2  # at least reads keys and values once
    # one block of the whole sequence: the dense formulation's 2 matmuls, 4 B H S^2 d FLOPs
    assert attention.kernel_cost("fwd", b, h, s, d, kv, None, s)[0] == 4 * b * h * s * s * d


def test_layerwise_distillation_path_fuses_too():
    """``layers_on`` (block-wise distillation: every layer on its own input, vmapped over the
    stacked layers) through the kernel equals the XLA formulation."""
    from flax import nnx

    from paretoq_jax.io import load_pretrained

    model = load_pretrained(str(FIXTURES / "tiny_llama_gqa"), bits=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 128)))
    inputs = model.residual_stream(ids)[:-1]
    want = model.layers_on(ids, inputs)
    assert attention.configure(model, None, "splash") == 1
    got = nnx.jit(lambda m: m.layers_on(ids, inputs))(model)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
