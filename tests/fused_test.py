"""models/fused.py: LayerNorm → modulate → Linear and GeLU → Linear as single ops have the values
and gradients of the composition they replace, and keep less for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow.models import fused, layers, precision

B, N, D, F = 3, 10, 16, 24


def _inputs(dtype):
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = 3 * jax.random.normal(keys[0], (B, N, D)) + 1
  shift = jax.random.normal(keys[1], (B, 1, D))
  scale = 0.5 * jax.random.normal(keys[2], (B, 1, D))
  kernel = (jax.random.normal(keys[3], (D, F)) / 4).astype(dtype)
  bias = jax.random.normal(keys[4], (F,)).astype(dtype)
  weight = jax.random.normal(keys[5], (B, N, F))
  return x, shift, scale, kernel, bias, weight


def _linear(h, kernel, bias):
  """`nnx.Linear(dot_general=precision.mixed_dot_general)` on inputs already in its dtype."""
  y = precision.mixed_dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())))
  return y + bias


def _composition(x, shift, scale, kernel, bias):
  """What the DiT computed before: layers.layer_norm_f32, the modulation, a Linear."""
  h = (layers.layer_norm_f32(x) * (1.0 + scale) + shift).astype(kernel.dtype)
  return _linear(h, kernel, bias)


def _value_and_grads(fn, weight, *args):
  loss = lambda *a: jnp.sum(weight * fn(*a).astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)


def _residual_bytes(fn, *args):
  pullback = jax.vjp(fn, *args)[1]
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pullback))


def _assert_close(got, want, dtype):
  assert got.dtype == want.dtype
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
  else:  # bf16 roundings of the same quantities may land one ulp apart
    assert np.max(np.abs(got - want)) <= 0.02 * np.max(np.abs(want))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_norm_modulate_dense_matches_the_composition(dtype):
  x, shift, scale, kernel, bias, weight = _inputs(dtype)
  args = (x, shift, scale, kernel, bias)
  out = fused.norm_modulate_dense(*args)
  assert out.dtype == jnp.float32 and out.shape == (B, N, F)
  value, grads = _value_and_grads(fused.norm_modulate_dense, weight, *args)
  ref_value, ref_grads = _value_and_grads(_composition, weight, *args)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  # x, shift (B, 1, D: summed over tokens), scale, kernel and bias, each in its own dtype.
  for got, want in zip(grads, ref_grads, strict=True):
    assert got.shape == want.shape
    _assert_close(got, want, dtype)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_norm_modulate_dense_keeps_the_norm_output_not_the_matmul_input(dtype):
  x, shift, scale, kernel, bias, _ = _inputs(dtype)
  args = (x, shift, scale, kernel, bias)
  c = jnp.dtype(dtype).itemsize
  kept = _residual_bytes(fused.norm_modulate_dense, *args)
  # y (f32, x's shape), 1/σ per token, shift, scale, the kernel, two dtype-carrying scalars.
  assert kept == 4 * x.size + 4 * B * N + 4 * shift.size + 4 * scale.size + c * D * F + 4 + c
  # The composition keeps the modulated input as well, in the compute dtype, but not the
  # (per-sample) shift nor one dtype-carrying scalar.
  assert _residual_bytes(_composition, *args) == kept + c * x.size - 4 * shift.size - c


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_dense_matches_the_composition(dtype):
  _, _, _, kernel, bias, weight = _inputs(dtype)
  u = 2 * jax.random.normal(jax.random.PRNGKey(7), (B, N, D))  # f32, as fc1's output
  composition = lambda u, kernel, bias: _linear(layers.gelu_tanh(u, kernel.dtype), kernel, bias)
  out = fused.gelu_dense(u, kernel, bias)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, composition(u, kernel, bias))
  value, grads = _value_and_grads(fused.gelu_dense, weight, u, kernel, bias)
  ref_value, ref_grads = _value_and_grads(composition, weight, u, kernel, bias)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for got, want in zip(grads, ref_grads, strict=True):
    _assert_close(got, want, dtype)
  c = jnp.dtype(dtype).itemsize
  kept = _residual_bytes(fused.gelu_dense, u, kernel, bias)
  # u in the compute dtype, the kernel, two dtype-carrying scalars; not GeLU(u).
  assert kept == c * u.size + c * D * F + 4 + c
  assert _residual_bytes(composition, u, kernel, bias) == kept + c * u.size - c


def test_linear_weights_are_the_layers_promoted_parameters():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  linear = nnx.Linear(4, 6, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                      bias_init=nnx.initializers.normal(1.0),
                      dot_general=precision.mixed_dot_general)
  kernel, bias = fused.linear_weights(linear)
  assert kernel.dtype == bias.dtype == jnp.bfloat16
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(_linear(x, kernel, bias), linear(x))
