"""models/stash.py: bf16 residuals kept as their bits, so that a scan stacks them in place."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from guidedflow.models import layers, stash


def test_keep_and_restore_round_trip_bit_for_bit():
  tree = {'bf16': jax.random.normal(jax.random.key(0), (3, 5)).astype(jnp.bfloat16),
          'f16': jnp.array([1.5, -0.0, jnp.inf], jnp.float16),
          'f32': jnp.arange(4.0), 'ints': jnp.arange(3), 'empty': jnp.zeros((0,), jnp.bfloat16),
          'none': None}
  kept = stash.keep(tree)
  # On XLA:CPU the 16-bit floats travel as uint16; f32, ints and empty arrays as they are.
  assert kept['bf16'].bits.dtype == kept['f16'].bits.dtype == jnp.uint16
  assert kept['f32'] is tree['f32'] and kept['ints'] is tree['ints']
  restored = stash.restore(kept)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  for name in ('bf16', 'f16', 'f32', 'ints', 'empty'):
    assert restored[name].dtype == tree[name].dtype
    np.testing.assert_array_equal(np.asarray(restored[name].view(np.uint8)),
                                  np.asarray(tree[name].view(np.uint8)))


def _plain_gelu():
  """`layers.gelu_tanh`'s derivative without `stash.kept`: bf16 residuals as they are."""
  gelu = jax.custom_vjp(lambda x: layers.gelu_tanh_fwd(x, None)[0])
  gelu.defvjp(lambda x: layers.gelu_tanh_fwd(x, None),
              functools.partial(layers.gelu_tanh_bwd, None))
  return gelu


def _scanned_grad(gelu):
  def loss(weights, x):
    def layer(h, w):
      return gelu((h.astype(jnp.float32) * w).astype(jnp.bfloat16)), None
    return jnp.sum(jax.lax.scan(layer, x, weights)[0].astype(jnp.float32))
  return jax.jit(jax.grad(loss))


def test_scanned_bf16_residuals_are_stacked_in_place_with_the_same_gradient():
  """A scan stacks a (depth, …) buffer of each residual. XLA:CPU float-normalises a bf16
  dynamic-update-slice to convert → f32 update → convert, rewriting the whole buffer per layer;
  uint16 bits are updated in place. The gradient is bit-for-bit the plain derivative's."""
  weights = 1.0 + 0.1 * jax.random.normal(jax.random.key(1), (6, 8, 64))
  x = jax.random.normal(jax.random.key(2), (8, 64)).astype(jnp.bfloat16)
  kept_grad, plain_grad = _scanned_grad(layers.gelu_tanh), _scanned_grad(_plain_gelu())
  np.testing.assert_array_equal(kept_grad(weights, x), plain_grad(weights, x))
  hlo = kept_grad.lower(weights, x).compile().as_text()
  updated = re.findall(r'= (\w+)\[6,8,64\]\{[0-9,]*\} dynamic-update-slice\(', hlo)
  assert 'u16' in updated, updated   # the residual's bits, stacked
  assert 'bf16[6,8,64]' not in hlo   # and no bf16 stack to convert to f32 and back
