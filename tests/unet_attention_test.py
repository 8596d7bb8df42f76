"""The U-Net's optional self-attention at the lowest resolution (model.unet_attention_heads)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import fashion_mnist
from guidedflow.models import unet
from guidedflow.models import factory


def test_attention_starts_as_identity_and_then_sees_every_position():
  block = unet.SelfAttention(16, 4, dtype=jnp.float32, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 7, 16))
  np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(x))  # zero output projection
  block.out.kernel[...] = jax.random.normal(jax.random.PRNGKey(2), (16, 16))
  # The output at the top-left position depends on the bottom-right input (a conv's 3×3 would
  # not), and a batch element does not see another.
  grad = jax.grad(lambda v: block(v)[0, 0, 0].sum())(x)
  assert float(jnp.abs(grad[0, 6, 6]).max()) > 0
  assert float(jnp.abs(grad[1]).max()) == 0
  # Permuting the positions permutes the output (attention has no notion of place).
  perm = np.random.default_rng(0).permutation(49)
  flat = x.reshape(2, 49, 16)
  out = block(flat[:, perm].reshape(2, 7, 7, 16)).reshape(2, 49, 16)
  np.testing.assert_allclose(np.asarray(out), np.asarray(block(x).reshape(2, 49, 16)[:, perm]),
                             atol=1e-5)


def test_config_key_builds_the_attention_in_the_midcoder():
  config = fashion_mnist.get_config()
  config.model.unet_attention_heads = 4
  model = factory.generator(config, (28, 28, 1))()
  assert len(model.midcoder.attention) == config.model.unet_num_residual_layers - 1
  config.model.unet_attention_heads = 0
  plain = factory.generator(config, (28, 28, 1))()
  assert plain.midcoder.attention is None
  assert model.flops_per_example() > plain.flops_per_example()
  x = jnp.zeros((2, 28, 28, 1))
  assert model(x, jnp.full((2,), 0.5), jnp.array([1, 10])).shape == x.shape
