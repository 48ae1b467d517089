"""Sharding: logical-name table, meshes, and a sharded model on 8 CPU devices (in a subprocess,
since the device-count flag must be set before JAX starts)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from paretoq_jax.sharding import DEFAULT_SHARDING_RULES, logical_to_spec, make_mesh, shard_model

FIXTURES = Path(__file__).parent / "fixtures"


class FakeMesh:
    """Only ``.shape`` is read by logical_to_spec: test the table without 8 devices."""

    shape = {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_to_spec_table_and_divisibility():
    mesh = FakeMesh()
    assert logical_to_spec(("layers", "embed", "heads"), mesh) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", "length"), mesh) == P(("data", "fsdp"), None)
    # 9 heads of 64 = 576 divides; 3 does not: replicated instead of an uneven split
    assert logical_to_spec(("embed", "heads"), mesh, shape=(576, 3)) == P("fsdp", None)
    # a mesh axis is used once per array
    assert logical_to_spec(("heads", "mlp"), mesh) == P("tensor", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("nonsense",), mesh)
    custom = {**DEFAULT_SHARDING_RULES, "embed": None}
    assert logical_to_spec(("embed", "mlp"), mesh, custom) == P(None, "tensor")


def test_single_device_mesh_and_bad_sizes():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=2, devices=jax.devices()[:1])
    from paretoq_jax.io import load_pretrained

    model = load_pretrained(FIXTURES / "tiny_llama_gqa", mesh=mesh)
    shardings = shard_model(model, mesh)
    assert shardings["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, None, None)


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from paretoq_jax.io import load_pretrained
    from paretoq_jax.sharding import make_mesh, shard_model
    assert len(jax.devices()) == 8
    d = "{fixture}"
    ids = jnp.asarray(np.load(d + "/input_ids.npy")); ref = np.load(d + "/logits.npy")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = load_pretrained(d, bits=2, mesh=mesh)  # placed sharded while loading
    k = model.layers.self_attn.q_proj.kernel[...]
    assert k.sharding.spec == P(None, "fsdp", "tensor"), k.sharding
    assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape == (2, 16, 16)
    assert model.layers.mlp.up_proj.scale[...].sharding.spec == P(None, "tensor")
    single = load_pretrained(d, bits=2)
    want = np.asarray(single(ids))
    batch = jax.device_put(ids, jax.NamedSharding(mesh, P("data")))
    out = nnx.jit(lambda m, x: m(x))(model, batch)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    fresh = load_pretrained(d)  # shard_model on a model built unsharded
    shardings = shard_model(fresh, mesh)
    assert fresh.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    assert shardings["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    rel = np.abs(np.asarray(nnx.jit(lambda m, x: m(x))(fresh, batch)) - ref).max()
    assert rel / np.abs(ref).max() < 1e-4
    print("OK")
    """
)


def test_eight_cpu_devices():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    code = SCRIPT.format(fixture=FIXTURES / "tiny_llama_gqa")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    np.testing.assert_equal(res.stdout.strip().splitlines()[-1], "OK")
