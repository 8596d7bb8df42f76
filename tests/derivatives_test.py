"""Hand-written derivatives (models/attention.py, layers.gelu_tanh, layers.layer_norm_f32): the
same values and gradients as JAX's derivative of the plain formulas, and only the residuals
they claim to keep."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow.models import attention, layers

B, N, H, D = 2, 12, 3, 8


def _qkv(dtype):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (B, N, H, D)) for key in keys[:3])
  weight = jax.random.normal(keys[3], (B, N, H, D))
  return (q / math.sqrt(D)).astype(dtype), k.astype(dtype), v.astype(dtype), weight


def _einsum_attention(q, k, v):
  """The formula, differentiated by JAX (f32 logits and softmax, operands upcast)."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  probs = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def _value_and_grads(fn, q, k, v, weight):
  loss = lambda q, k, v: jnp.sum(weight * fn(q, k, v).astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize('merge', [True, False], ids=['cpu-layout', 'heads-axis'])
def test_attention_matches_formula_f32(merge):
  q, k, v, weight = _qkv(jnp.float32)
  value, grads = _value_and_grads(lambda *a: attention._attention(*a, merge), q, k, v, weight)
  ref_value, ref_grads = _value_and_grads(_einsum_attention, q, k, v, weight)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  out = attention._attention(q, k, v, merge)
  np.testing.assert_allclose(out, _einsum_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_attention_bf16_close_to_f32_formula_and_keeps_dtypes():
  q, k, v, weight = _qkv(jnp.bfloat16)
  _, grads = _value_and_grads(attention.dot_product_attention, q, k, v, weight)
  _, ref_grads = _value_and_grads(_einsum_attention, q, k, v, weight)
  assert attention.dot_product_attention(q, k, v).dtype == jnp.float32
  for got, want in zip(grads, ref_grads):
    assert got.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(want)))
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < 0.02 * scale


def _residual_bytes(fn, *args):
  pullback = jax.vjp(fn, *args)[1]
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pullback))


@pytest.mark.parametrize('merge', [True, False], ids=['cpu-layout', 'heads-axis'])
def test_fused_qkv_attention_matches_formula_of_slices(merge):
  q, k, v, weight = _qkv(jnp.float32)
  qkv = jnp.stack([q, k, v], axis=3)  # (B, N, H, 3, D)
  scale = 0.37

  def formula(qkv):
    return _einsum_attention(qkv[:, :, :, 0] * scale, qkv[:, :, :, 1], qkv[:, :, :, 2])

  loss = lambda fn: lambda qkv: jnp.sum(weight * fn(qkv))
  got = jax.value_and_grad(loss(lambda x: attention._qkv_attention(x, scale, merge)))(qkv)
  want = jax.value_and_grad(loss(formula))(qkv)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert got[1].shape == qkv.shape
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
  assert _residual_bytes(lambda x: attention.qkv_attention(x, scale), qkv) == (
      _residual_bytes(attention.dot_product_attention, q, k, v))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_attention_keeps_qkv_and_f32_probabilities_only(dtype):
  q, k, v, _ = _qkv(dtype)
  c = jnp.dtype(dtype).itemsize
  kept = _residual_bytes(attention.dot_product_attention, q, k, v)
  assert kept == 3 * B * N * H * D * c + 4 * B * H * N * N
  # JAX's derivative of the formula keeps more: the f32 exp and the probabilities.
  assert _residual_bytes(_einsum_attention, q, k, v) > kept


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_tanh_matches_jax_and_keeps_its_input_only(dtype):
  x = (3 * jax.random.normal(jax.random.PRNGKey(1), (4, 64))).astype(dtype)
  weight = jax.random.normal(jax.random.PRNGKey(2), (4, 64))
  ref = lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=True)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(layers.gelu_tanh(x).astype(jnp.float32), ref(x), rtol=tol, atol=tol)
  grad = jax.grad(lambda x: jnp.sum(weight * layers.gelu_tanh(x).astype(jnp.float32)))(x)
  want = jax.grad(lambda x: jnp.sum(weight * ref(x)))(x.astype(jnp.float32))
  assert grad.dtype == dtype
  # XLA:CPU's tanh differs by ~1e-6 between its fusion emitters (tests/conftest.py selects the
  # loop emitters) and the two gradients fuse it differently.
  np.testing.assert_allclose(grad.astype(jnp.float32), want, rtol=tol, atol=max(tol, 5e-6))
  assert _residual_bytes(layers.gelu_tanh, x) == x.size * x.dtype.itemsize + x.dtype.itemsize
  assert _residual_bytes(ref, x) >= 4 * x.size * x.dtype.itemsize


def test_gelu_tanh_of_f32_input_returns_and_keeps_the_compute_dtype():
  """The DiT's use: fc1's f32 output in, bf16 out; the kept input is rounded to bf16 and the
  gradient comes back in f32 (for fc1's f32 output)."""
  x = 3 * jax.random.normal(jax.random.PRNGKey(1), (4, 64))
  out, vjp = jax.vjp(lambda x: layers.gelu_tanh(x, jnp.bfloat16), x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, jax.nn.gelu(x, approximate=True).astype(jnp.bfloat16))
  (grad,) = vjp(jnp.ones_like(out))
  assert grad.dtype == jnp.float32
  x_kept = x.astype(jnp.bfloat16).astype(jnp.float32)
  np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True)))(
      x_kept), rtol=1e-5, atol=5e-6)  # atol: XLA:CPU's tanh, as above
  assert _residual_bytes(lambda x: layers.gelu_tanh(x, jnp.bfloat16), x) == 2 * x.size + 4


def test_layer_norm_matches_formula_and_keeps_one_f32_tensor():
  x = 5 * jax.random.normal(jax.random.PRNGKey(3), (4, 6, 32)) + 2
  weight = jax.random.normal(jax.random.PRNGKey(4), (4, 6, 32))

  def formula(x, eps=1e-6):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + eps)

  np.testing.assert_allclose(layers.layer_norm_f32(x), formula(x), rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(weight * layers.layer_norm_f32(x)))(x)
  want = jax.grad(lambda x: jnp.sum(weight * formula(x)))(x)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
  # The output (f32, x's shape), 1/σ per row and a scalar that carries the input dtype.
  rows = x.size // x.shape[-1]
  assert _residual_bytes(layers.layer_norm_f32, x) == 4 * x.size + 4 * rows + 4
  assert _residual_bytes(formula, x) >= 2 * 4 * x.size
  assert jax.grad(lambda x: jnp.sum(layers.layer_norm_f32(x)))(x.astype(jnp.bfloat16)).dtype == (
      jnp.bfloat16)
