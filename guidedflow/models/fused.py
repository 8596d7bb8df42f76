"""A transformer block's matmul prologues as single ops whose derivatives keep less.

What JAX's derivative keeps of a Linear is its input. Two of a DiT block's Linears take an
input that is a cheap function of something the backward pass keeps anyway:

* `norm_modulate_dense`: LayerNorm → adaLN modulation → Linear (qkv, fc1, the final layer).
  The LayerNorm's own derivative keeps its output y; the modulated y·(1 + scale) + shift,
  the Linear's input, is recomputed from it.
* `gelu_dense`: tanh-GeLU → Linear (fc2). The GeLU's derivative keeps its input; the GeLU's
  output, the Linear's input and r = 4 times the width, is recomputed from it.

The recomputation is one elementwise pass in the backward pass, which replaces the forward
pass's copy of the dropped tensor into the saved residuals and the backward pass's read of it
(the weight-gradient matmul then takes the recomputed input as it took the kept one:
untransposed in f32; for bf16 the cotangent is transposed instead;
`precision.dot_f32_grads`, benchmarks/README.md). Per block and sample
that drops the two modulated inputs (c·s·h bytes each) and the GeLU output (r·c·s·h): a block
keeps 32·s·h + 4·a·s² bytes for bf16 instead of 44·s·h, 48·s·h instead of 72 for f32
(`benchmarks/memory.py`), and a scanned train step stacks and reads back that much less.

Values and gradients are those of the composition of `layers.layer_norm_f32`, the modulation,
`layers.gelu_tanh` and a `precision.mixed_dot_general` Linear — the same roundings to the
compute dtype in the same places — except that with a bf16 compute dtype fc2's weight gradient
multiplies by GeLU(round(u)) rounded, where the forward pass used GeLU(u) rounded (u is kept
in the compute dtype, as `gelu_tanh` keeps it). Matmuls are `precision.dot_f32`'s:
compute-dtype operands, f32 accumulation and output, in the layouts XLA:CPU runs fastest.
"""

import functools

import jax
import jax.numpy as jnp

from guidedflow.models import layers, precision, stash


def _dims(ndim: int):
  """Dimension numbers of x (…, K) · W (K, N), as `nnx.Linear` contracts them."""
  return (((ndim - 1,), (0,)), ((), ()))


def _dense(h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  return precision.dot_f32(h, kernel, _dims(h.ndim)) + bias  # f32 + bias promoted to f32


def _sum_to(x: jax.Array, shape) -> jax.Array:
  """`x` summed over the axes it was broadcast along from `shape` (same rank)."""
  axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True)


def _modulated(y: jax.Array, shift: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return (y * (1.0 + scale) + shift).astype(dtype)


def _linear_grads(h, kernel, d_out):
  """(dh, dkernel) in the compute dtype, as `precision.mixed_dot_general`'s derivative gives
  them, and dbias in f32, of `_dense(h, kernel, bias)` given the f32 cotangent of its output."""
  d_h, d_kernel = precision.dot_f32_grads(h, kernel, _dims(h.ndim), d_out.astype(kernel.dtype))
  d_bias = jnp.sum(d_out, axis=tuple(range(d_out.ndim - 1)))
  return d_h.astype(kernel.dtype), d_kernel.astype(kernel.dtype), d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def norm_modulate_dense(x: jax.Array, shift: jax.Array, scale: jax.Array, kernel: jax.Array,
                        bias: jax.Array, eps: float = 1e-6) -> jax.Array:
  """(LayerNorm(x)·(1 + scale) + shift) · kernel + bias → float32.

  Args:
    x: (B, N, D) float32, normalised over D (no affine parameters, statistics in f32).
    shift, scale: float32, broadcastable to x ((B, 1, D): per-sample adaLN modulation).
    kernel, bias: (D, F) and (F,) in the compute dtype; the modulated input is rounded to it.
    eps: the LayerNorm's epsilon.
  Returns:
    (B, N, F) float32. The derivative keeps the LayerNorm output y (f32), 1/σ, shift, scale
    and the kernel, not the modulated input.
  """
  return _norm_modulate_dense_fwd(x, shift, scale, kernel, bias, eps)[0]


def _norm_modulate_dense_fwd(x, shift, scale, kernel, bias, eps):
  y, (_, inv_std, x_like) = layers.layer_norm_f32_fwd(x, eps)
  out = _dense(_modulated(y, shift, scale, kernel.dtype), kernel, bias)
  return out, (y, inv_std, x_like, shift, scale, kernel, jnp.zeros((), bias.dtype))


def _norm_modulate_dense_bwd(eps, residuals, d_out):
  y, inv_std, x_like, shift, scale, kernel, bias_like = residuals
  h = _modulated(y, shift, scale, kernel.dtype)  # recomputed, as the forward pass made it
  d_h, d_kernel, d_bias = _linear_grads(h, kernel, d_out)
  d_h = d_h.astype(jnp.float32)  # the modulation and the LayerNorm are f32
  d_shift = _sum_to(d_h, shift.shape)
  d_scale = _sum_to(d_h * y, scale.shape)
  (d_x,) = layers.layer_norm_f32_bwd(eps, (y, inv_std, x_like), d_h * (1.0 + scale))
  return (d_x, d_shift.astype(shift.dtype), d_scale.astype(scale.dtype), d_kernel,
          d_bias.astype(bias_like.dtype))


norm_modulate_dense.defvjp(*stash.kept(_norm_modulate_dense_fwd, _norm_modulate_dense_bwd))


@jax.custom_vjp
def gelu_dense(u: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """GeLU(u) · kernel + bias → float32; u (…, F) float32, kernel (F, D) and bias (D,) in the
  compute dtype. GeLU (tanh) is evaluated in f32 and rounded to the compute dtype, as
  `layers.gelu_tanh(u, dtype)`. The derivative keeps u in the compute dtype and the kernel,
  not the GeLU's output."""
  return _gelu_dense_fwd(u, kernel, bias)[0]


def _gelu_dense_fwd(u, kernel, bias):
  a, gelu_residuals = layers.gelu_tanh_fwd(u, kernel.dtype)
  return _dense(a, kernel, bias), (gelu_residuals, kernel, jnp.zeros((), bias.dtype))


def _gelu_dense_bwd(residuals, d_out):
  gelu_residuals, kernel, bias_like = residuals
  u_kept = gelu_residuals[0]
  a = layers.gelu_tanh_fwd(u_kept, kernel.dtype)[0]  # recomputed from the kept input
  d_a, d_kernel, d_bias = _linear_grads(a, kernel, d_out)
  (d_u,) = layers.gelu_tanh_bwd(kernel.dtype, gelu_residuals, d_a)
  return d_u, d_kernel, d_bias.astype(bias_like.dtype)


gelu_dense.defvjp(*stash.kept(_gelu_dense_fwd, _gelu_dense_bwd))


def linear_weights(linear) -> tuple[jax.Array, jax.Array]:
  """An `nnx.Linear`'s (kernel, bias) in its compute dtype, as its `__call__` promotes them."""
  return linear.kernel[...].astype(linear.dtype), linear.bias[...].astype(linear.dtype)
