"""The LM head and its token loss over chunks of the sequence: no ``(B, S, V)`` logits in memory.

``head_loss_sum(h, W, labels, mask, chunk=c)`` equals ``token_nll_sum(h @ W, labels, mask)``
(and, given the teacher's hidden states and head, ``token_kl_sum``), with the same FLOPs as
autodiff of that, but it never holds more than one chunk's ``(B, c, V)`` logits. Forward and
backward are one pass (a custom VJP, the "fused linear cross entropy" of Liger-Kernel): for each
chunk of ``c`` positions it computes the float32 logits ``z = h W``, the loss, and at once the
loss's gradient with respect to the logits,

- cross entropy ``logsumexp(z) - z[label]``:  ``dz = softmax(z) - onehot(label)``,
- distillation ``KL(p || q)``, ``q = softmax(z)``, ``p`` the teacher's:  ``dz = q - p``,

(masked), contracted right away into ``dh = dz W^T`` and ``dW += h^T dz``; those are the
residuals, which the backward pass scales by the incoming cotangent. For SmolLM2-135M at
4 x 256 tokens one logits-sized float32 buffer is 192 MiB, and autodiff of the unchunked loss
keeps several (``docs/performance.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from paretoq_jax.models.llama import LOGITS
from paretoq_jax.sharding import constrain

__all__ = ["head_loss_sum", "chunk_size"]


def chunk_size(seq: int, chunk: int) -> int:
    """The largest divisor of ``seq`` that is at most ``chunk`` (``chunk <= 0``: ``seq``)."""
    if chunk <= 0 or chunk >= seq:
        return seq
    return max(d for d in range(1, chunk + 1) if seq % d == 0)


def _dot(a: jax.Array, b: jax.Array, spec: str, dtype) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _chunk(h, w, labels, mask, th, tw, dtype):
    """Loss sum and its gradients ``(dh, dW)`` for one chunk ``h (B, c, D)``."""
    z = constrain(_dot(h, w, "bcd,dv->bcv", dtype), LOGITS)
    log_q = jax.nn.log_softmax(z, axis=-1)
    q = jnp.exp(log_q)
    m = mask.astype(jnp.float32)
    if th is None:
        label = jnp.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]
        loss = -jnp.sum(label * m)
        target = jnp.arange(z.shape[-1]) == labels[..., None]  # one-hot, fused, never stored
        dz = (q - target) * m[..., None]
    else:
        tz = _dot(th, tw, "bcd,dv->bcv", dtype)
        log_p = jax.nn.log_softmax(tz, axis=-1)
        p = jnp.exp(log_p)
        loss = jnp.sum(jnp.sum(p * (log_p - log_q), axis=-1) * m)
        dz = (q - p) * m[..., None]
    dh = _dot(dz, w, "bcv,dv->bcd", dtype).astype(h.dtype)
    dw = _dot(h, dz, "bcd,bcv->dv", dtype)
    return loss, dh, dw


def _chunks(x: jax.Array | None, c: int) -> jax.Array | None:
    """``(B, S, ...)`` -> ``(S // c, B, c, ...)``."""
    if x is None:
        return None
    b, s = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, s // c, c, *x.shape[2:]), 1, 0)


def _loss_and_grads(hidden, kernel, labels, mask, t_hidden, t_kernel, chunk, dtype):
    c = chunk_size(hidden.shape[1], chunk)
    xs = tuple(_chunks(x, c) for x in (hidden, labels, mask, t_hidden))
    tw = None if t_kernel is None else jax.lax.stop_gradient(t_kernel)

    def body(carry, x):
        loss, dw = carry
        h, lab, m, th = x
        l_c, dh_c, dw_c = _chunk(h, kernel, lab, m, th, tw, dtype)
        return (loss + l_c, dw + dw_c), dh_c

    init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (loss, dw), dh = jax.lax.scan(body, init, xs)
    dh = jnp.moveaxis(dh, 0, 1).reshape(hidden.shape)
    return loss, jnp.sum(mask.astype(jnp.float32)), dh, dw.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _head_loss(hidden, kernel, labels, mask, t_hidden, t_kernel, chunk, dtype):
    loss, count, _, _ = _loss_and_grads(hidden, kernel, labels, mask, t_hidden, t_kernel, chunk,
                                        dtype)  # fmt: skip
    return loss, count


def _head_loss_fwd(hidden, kernel, labels, mask, t_hidden, t_kernel, chunk, dtype):
    loss, count, dh, dw = _loss_and_grads(
        hidden, kernel, labels, mask, t_hidden, t_kernel, chunk, dtype
    )
    return (loss, count), (dh, dw)


def _head_loss_bwd(chunk, dtype, residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0]
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None, None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def head_loss_sum(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk: int,
    dtype=jnp.float32,
    teacher_hidden: jax.Array | None = None,
    teacher_kernel: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked token loss, number of unmasked tokens) of the LM head ``kernel``
    ``(D, V)`` on the final normed ``hidden (B, S, D)``, ``chunk`` positions at a time (the
    largest divisor of ``S`` up to ``chunk``); both multiplied in ``dtype`` with float32
    accumulation, as ``Llama.lm_logits``. The loss is the next-token cross entropy, or with
    ``teacher_hidden`` / ``teacher_kernel`` (no gradient) ``KL(teacher || student)``.
    Differentiable in ``hidden`` and ``kernel``."""
    if (teacher_hidden is None) != (teacher_kernel is None):
        raise ValueError("give both teacher_hidden and teacher_kernel, or neither")
    return _head_loss(hidden, kernel, labels, mask, teacher_hidden, teacher_kernel, chunk, dtype)
