"""Softmax attention with a hand-written backward pass: what it keeps, and the layout of its dots.

`dot_product_attention(q, k, v)` computes softmax(q·kᵀ)·v per head, q already scaled, with the
logits and the softmax in f32 and the dots taking the compute dtype with f32 accumulation
(`precision.py`'s policy). Its backward pass is FlashAttention's (Dao et al. 2022, eqs. in §3.1
without the tiling): from the kept probabilities P, dV = Pᵀ·dO, dP = dO·Vᵀ,
dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = dS·K, dK = dSᵀ·Q (computed as dVᵀ = dOᵀ·P and
dKᵀ = Qᵀ·dS, see below). Two things follow:

* Memory: it keeps q, k, v and P in f32, 4·a·s² bytes per sample and block, where JAX's
  derivative of the softmax kept exp(logits − max) in f32 and the probabilities in the compute
  dtype ((4 + c)·a·s², `benchmarks/memory.py`).
* Speed on XLA:CPU: every dot is a (batch, M, K) × (batch, K, N) matmul with the batch and
  head axes merged into one batch axis, the one layout XLA:CPU runs at matmul speed (and the
  only one it runs bf16 × bf16 → f32 in). JAX's own transposes of the two einsums gave
  batched dots with contracting or output axes in other places, which XLA:CPU ran at a fifth
  of its matmul peak; on a 2-core Xeon (AMX) DiT-S/2 attention fwd+bwd went from 145 to 108 ms
  in f32 and the bf16 forward (the sampler's) from 60 to 21 ms (benchmarks/README.md).
  A transposed operand must be made by one transpose of a (B, N, H, D) array (`_heads_last`:
  kᵀ, vᵀ, qᵀ, dOᵀ): a bf16 operand in any other transposed layout is one XLA:CPU converts to
  f32 and multiplies in f32. Hence dVᵀ and dKᵀ, which need no transpose of P or dS.
  On other platforms the head axis stays its own axis, so that a 'tensor' mesh axis splitting
  heads keeps splitting every dot (merging it with the batch would make XLA gather the heads).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from guidedflow.models import precision, stash


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q·kᵀ)·v per head: q, k, v (B, N, H, Dh), q pre-scaled → float32 (B, N, H, Dh)."""
  return _attention(q, k, v, precision.target_platform() == 'cpu')


def qkv_attention(qkv: jax.Array, scale: float) -> jax.Array:
  """`dot_product_attention` of q·scale, k, v given fused as qkv (B, N, H, 3, Dh) → f32 (B, N, H, Dh).

  Its gradient is one (B, N, H, 3, Dh) array written once; slicing q, k and v out of qkv before
  the attention made JAX's derivative pad each slice's gradient to qkv's shape and add the
  three, twice (once for the input gradient, once transposed for the weight gradient).
  """
  return _qkv_attention(qkv, scale, precision.target_platform() == 'cpu')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _qkv_attention(qkv, scale, merge):
  return _qkv_attention_fwd(qkv, scale, merge)[0]


def _qkv_attention_fwd(qkv, scale, merge):
  q = qkv[:, :, :, 0] * jnp.asarray(scale, qkv.dtype)
  return _attention_fwd(q, qkv[:, :, :, 1], qkv[:, :, :, 2], merge)


def _qkv_attention_bwd(scale, merge, residuals, d_out):
  d_q, d_k, d_v = _attention_bwd(merge, residuals, d_out)
  d_q = d_q * jnp.asarray(scale, d_q.dtype)
  return (jnp.stack([d_q, d_k, d_v], axis=3),)


_qkv_attention.defvjp(*stash.kept(_qkv_attention_fwd, _qkv_attention_bwd))


def _heads_first(x, merge):
  """(B, N, H, D) → (B·H, N, D) when `merge`, else (B, H, N, D)."""
  x = jnp.transpose(x, (0, 2, 1, 3))
  return x.reshape((-1,) + x.shape[2:]) if merge else x


def _heads_last(x, merge):
  """(B, N, H, D) → (B·H, D, N) when `merge`, else (B, H, D, N): a transposed dot operand made
  by one transpose of the input. Swapping the last two axes of a (B·H, N, D) array instead gave
  XLA:CPU a dot operand in a transposed layout, which it runs in f32 for bf16 operands (convert,
  f32 dot): half of attention's dots in the bf16 train step (benchmarks/README.md)."""
  x = jnp.transpose(x, (0, 2, 3, 1))
  return x.reshape((-1,) + x.shape[2:]) if merge else x


def _heads_back(x, shape, merge, transposed=False):
  """Inverse of `_heads_first` for a (…, N, D) result, or of `_heads_last` for a (…, D, N) one
  (`transposed`); `shape` is the (B, N, H, D) input's."""
  batch, tokens, heads, _ = shape
  x = x.reshape((batch, heads) + x.shape[-2:]) if merge else x
  return jnp.transpose(x, (0, 3, 1, 2) if transposed else (0, 2, 1, 3))


def _matmul(a, b, transpose_a=False):
  """Batched a·b (aᵀ·b with `transpose_a`) over the leading axes, low-precision operands
  accumulated in f32."""
  batch = tuple(range(a.ndim - 2))
  contract_a = a.ndim - 2 if transpose_a else a.ndim - 1
  return lax.dot_general(a, b, (((contract_a,), (b.ndim - 2,)), (batch, batch)),
                         preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, merge):
  return _attention_fwd(q, k, v, merge)[0]


def _attention_fwd(q, k, v, merge):
  probs = jax.nn.softmax(_matmul(_heads_first(q, merge), _heads_last(k, merge)), axis=-1)  # f32
  out = _matmul(probs.astype(v.dtype), _heads_first(v, merge))
  return _heads_back(out, q.shape, merge), (q, k, v, probs)


def _attention_bwd(merge, residuals, d_out):
  """dQ = dS·K and dP = dO·Vᵀ as they are; dVᵀ = dOᵀ·P and dKᵀ = Qᵀ·dS, so that every
  transposed operand is a `_heads_last` of a (B, N, H, D) array (none of P or dS); in f32 on
  XLA:CPU dK = dSᵀ·Q and dV = Pᵀ·dO directly."""
  q, k, v, probs = residuals
  dtype = q.dtype
  d_out = d_out.astype(dtype)
  d_probs = _matmul(_heads_first(d_out, merge), _heads_last(v, merge))         # f32
  d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  d_logits = d_logits.astype(dtype)
  d_q = _heads_back(_matmul(d_logits, _heads_first(k, merge)), q.shape, merge)
  if merge and dtype == jnp.float32:
    # dK = dSᵀ·Q and dV = Pᵀ·dO as XLA:CPU's f32 GEMM takes them, the transpose in the
    # GEMM: no transposed copies of q and dO in or of dKᵀ and dVᵀ out (DiT-S/2 attention
    # fwd+bwd 108–114 → 91–96 ms, benchmarks/README.md). bf16 GEMMs in that layout run in f32.
    d_k = _heads_back(_matmul(d_logits, _heads_first(q, merge), transpose_a=True), q.shape, merge)
    d_v = _heads_back(_matmul(probs, _heads_first(d_out, merge), transpose_a=True), q.shape,
                      merge)
  else:
    d_k = _heads_back(_matmul(_heads_last(q, merge), d_logits), q.shape, merge, transposed=True)
    d_v = _heads_back(_matmul(_heads_last(d_out, merge), probs.astype(dtype)), q.shape, merge,
                      transposed=True)
  return tuple(g.astype(dtype) for g in (d_q, d_k, d_v))


_attention.defvjp(*stash.kept(_attention_fwd, _attention_bwd))
