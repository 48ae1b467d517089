"""The train step: one ``jax.jit`` function, pure over pytrees, sharded over Mesh(data, fsdp, tensor).

The train state is ``paretoq_jax.run.state``'s dict of arrays (``params`` is the model's
``nnx.Param`` state as a pure dict, float32 master weights). The model is rebuilt from
its ``graphdef`` inside the step (``nnx.merge``), so the jitted function takes and returns only
arrays and can donate the state.

Loss: masked next-token cross entropy ``logsumexp(z) - z[label]`` averaged over the unmasked
tokens of the global batch (no full log-softmax over the vocabulary is materialized). With
``train.distill.logits`` the loss is ``KL(teacher || student)`` on the logits of a frozen float
teacher.
Gradient accumulation scans over micro-batches and sums token-loss sums and gradients, so the
result equals the one-shot step over the whole global batch. The layer-reconstruction term of
block-wise distillation is a ratio of batch sums, not a sum over tokens: with accumulation a
first scan computes the teacher's per-layer denominators over the whole batch (one extra teacher
forward per micro-batch), so that this term is exact too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "BATCH_AXES",
    "token_nll_sum",
    "token_kl_sum",
    "split_batch",
    "TrainStep",
    "make_train_step",
]

# The batch dimension is split over both data-parallel axes (FSDP is data parallel too).
BATCH_AXES = ("data", "fsdp")


def token_nll_sum(
    logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of masked next-token NLL, number of unmasked tokens).

    ``nll = logsumexp(z) - z[label]``: the cross entropy without a ``(B, S, V)`` log-softmax.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((lse - label_logit) * mask), jnp.sum(mask)


def token_kl_sum(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum over unmasked tokens of ``KL(p_teacher || p_student)``, number of tokens)."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(kl * mask), jnp.sum(mask)


def layer_power(teacher_stream: jax.Array) -> jax.Array:
    """``|h_{l+1} - h_l|^2`` per decoder layer ``(L,)``: what each teacher layer adds to the
    residual stream ``(L + 1, B, S, D)``, summed over the batch."""
    t = teacher_stream.astype(jnp.float32)
    return jnp.sum(jnp.square(t[1:] - t[:-1]), axis=tuple(range(1, t.ndim)))


def layer_reconstruction(
    student_out: jax.Array, teacher_stream: jax.Array, power: jax.Array | None = None
) -> jax.Array:
    """Mean over decoder layers of ``|f_l^S(h_l) - h_{l+1}|^2 / |h_{l+1} - h_l|^2``.

    ``teacher_stream`` ``(L + 1, B, S, D)``: the float teacher's residual stream ``h``;
    ``student_out`` ``(L, B, S, D)``: the student's layer ``l`` applied to the teacher's ``h_l``.
    Each layer's error is relative to what that teacher layer adds to the stream, so every
    layer weighs alike whatever the stream's scale (block-wise reconstruction, as in BRECQ /
    EfficientQAT's Block-AP, here for all layers in parallel and alongside end-to-end QAT).
    ``power`` ``(L,)``: the denominators (default ``layer_power(teacher_stream)``); gradient
    accumulation passes the whole global batch's, so that the micro-batches' terms sum to the
    global batch's ratio.
    """
    t_out = teacher_stream[1:].astype(jnp.float32)
    axes = tuple(range(1, t_out.ndim))
    err = jnp.sum(jnp.square(student_out.astype(jnp.float32) - t_out), axis=axes)
    power = layer_power(teacher_stream) if power is None else power
    return jnp.mean(err / jnp.maximum(power, 1e-12))


def split_batch(tokens: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Blocks ``(B, S)`` -> model inputs, next-token labels and the label mask.

    As in HF causal-LM training, position ``t`` predicts token ``t + 1``: the inputs are the whole
    block and the last position has no label (mask 0). ``mask`` (optional, ``(B, S)``) marks the
    tokens that count as labels.
    """
    labels = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    valid = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)
    if mask is not None:
        shifted = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
        valid = valid * shifted.astype(jnp.float32)
    return {"inputs": tokens, "labels": labels, "mask": valid}


def _micro_batches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """``(B, ...)`` -> ``(n, B // n, ...)`` without moving data between devices.

    Row ``r`` of the batch goes to micro-batch ``r % n``: each device keeps its own rows, since
    the data-parallel sharding is over contiguous row ranges.
    """

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced with ``mesh`` as the ambient mesh, so that the model's activation
    sharding constraints (``paretoq_jax.sharding.constrain``) apply."""

    def wrapped(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return wrapped


@dataclasses.dataclass
class TrainStep:
    """The compiled step, the shardings it was built with and the optimizer it applies."""

    fn: Callable[..., tuple[dict, dict]]
    state_shardings: dict[str, Any]
    batch_sharding: NamedSharding
    tx: optax.GradientTransformation

    def __call__(self, state: dict, batch: dict, *extra) -> tuple[dict, dict]:
        return self.fn(state, batch, *extra)


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    shardings: dict[str, Any],
    *,
    grad_accum: int = 1,
    teacher_graphdef: nnx.GraphDef | None = None,
    teacher_rest: nnx.State | None = None,
    teacher_shardings: Any = None,
    distill: bool | None = None,
    layer_weight: float = 0.0,
) -> TrainStep:
    """Build the jitted ``step(state, batch[, teacher_params]) -> (state, metrics)``.

    ``batch`` holds ``tokens`` int32 ``(B, seq_len)`` and optionally ``mask`` (same shape,
    1 where a token counts as a label), sharded over ``BATCH_AXES``. The state is donated.
    Metrics: ``loss`` (mean over tokens), ``grad_norm`` (before clipping), ``tokens``.

    With a teacher: ``distill`` (default: whenever a teacher is given) makes the token loss
    ``KL(teacher || student)`` instead of the cross entropy, and ``layer_weight > 0`` adds
    ``layer_weight * layer_reconstruction(...)`` to the per-token loss.
    """
    if distill is None:
        distill = teacher_graphdef is not None
    uses_teacher = teacher_graphdef is not None
    if (distill or layer_weight > 0) and not uses_teacher:
        raise ValueError("distill / layer_weight > 0 need the teacher (teacher_graphdef)")

    def micro_loss(params, micro, teacher_params, layer_norm=None):
        """(loss sum, token count) of one micro-batch. ``layer_norm``: ``(power (L,), token
        count)`` of the whole global batch for the layer term (None: this batch's own)."""
        model = nnx.merge(graphdef, params, rest)
        inputs = micro["inputs"]
        logits = model(inputs)
        if not uses_teacher:
            return token_nll_sum(logits, micro["labels"], micro["mask"])
        teacher = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
        if layer_weight > 0:
            stream = jax.lax.stop_gradient(teacher.residual_stream(inputs))
        if distill:
            t_logits = (
                teacher.lm_logits(teacher.norm(stream[-1])) if layer_weight > 0 else teacher(inputs)
            )
            t_logits = jax.lax.stop_gradient(t_logits)
            loss_sum, count = token_kl_sum(logits, t_logits, micro["mask"])
        else:
            loss_sum, count = token_nll_sum(logits, micro["labels"], micro["mask"])
        if layer_weight > 0:
            power, total = (None, count) if layer_norm is None else layer_norm
            rec = layer_reconstruction(model.layers_on(inputs, stream[:-1]), stream, power)
            loss_sum = loss_sum + layer_weight * rec * total
        return loss_sum, count

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def global_layer_norm(micro, teacher_params):
        """The whole batch's per-layer teacher power and token count (a teacher-only pass)."""

        def power(inputs):
            teacher = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
            return layer_power(teacher.residual_stream(inputs))

        total = jnp.sum(jax.lax.map(power, micro["inputs"]), axis=0)
        return jax.lax.stop_gradient(total), jnp.sum(micro["mask"])

    def step(state, batch, teacher_params=None):
        params = state["params"]
        data = split_batch(batch["tokens"], batch.get("mask"))
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(params, data, teacher_params)
        else:
            micro = _micro_batches(data, grad_accum)
            norm = global_layer_norm(micro, teacher_params) if layer_weight > 0 else None

            def body(carry, m):
                (s, n), g = grad_fn(params, m, teacher_params, norm)
                return jax.tree.map(jnp.add, carry, (s, n, g)), None

            zero = jnp.zeros((), jnp.float32)
            init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
            (loss_sum, count, grads), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": count}
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    in_shardings = [shardings, batch_sharding]
    if uses_teacher:
        in_shardings.append(teacher_shardings)
    jitted = jax.jit(
        on_mesh(step, mesh),
        in_shardings=tuple(in_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    return TrainStep(jitted, shardings, batch_sharding, tx)
