"""The KL autoencoder (SD-VAE family): shapes, the SD-VAE's size, the KL closed form, the
resamplers' arithmetic and a reconstruction loss that falls in a short run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow.models import autoencoder as ae
from guidedflow.models.layers import param_count


def _tiny(**kwargs):
  args = dict(in_channels=1, channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
              norm_groups=4, rngs=nnx.Rngs(0))
  args.update(kwargs)
  return ae.AutoencoderKL(**args)


def test_shapes_28_to_7_and_back():
  model = _tiny()
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1), minval=-1, maxval=1)
  mean, logvar = model.encode(x)
  assert mean.shape == logvar.shape == (2, 7, 7, 4) and mean.dtype == jnp.float32
  assert model.downsample_factor == 4
  reconstruction, _, _ = model(x, jax.random.PRNGKey(1))
  assert reconstruction.shape == x.shape and reconstruction.dtype == jnp.float32
  assert model.decode(mean).shape == x.shape


def test_sd_vae_architecture_has_its_parameter_count():
  """sd-vae-ft-ema / -mse: 83,653,863 parameters (diffusers AutoencoderKL, 256 → 32)."""
  model = nnx.eval_shape(lambda: ae.AutoencoderKL(rngs=nnx.Rngs(0)))
  assert param_count(model) == 83_653_863
  mean, _ = jax.eval_shape(lambda x: ae.AutoencoderKL(rngs=nnx.Rngs(0)).encode(x),
                           jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert mean.shape == (1, 32, 32, 4)


def test_logvar_is_clipped_to_the_ldm_range():
  model = _tiny()
  for bias, expected in ((1e3, 20.0), (-1e3, -30.0)):
    model.quant_conv.bias[...] = jnp.asarray([0.0] * 4 + [bias] * 4)  # the log-variance half
    mean, logvar = model.encode(jnp.ones((1, 28, 28, 1)))
    np.testing.assert_array_equal(np.asarray(logvar), expected)
    assert np.all(np.isfinite(np.asarray(mean)))


def test_kl_against_closed_form():
  """KL(N(μ, σ²) ‖ N(0, 1)) = log(1/σ) + (σ² + μ²)/2 − 1/2 per element, summed per example."""
  mean = jnp.array([[0.0, 1.0], [2.0, -0.5]])
  sigma = jnp.array([[1.0, 0.5], [2.0, 0.1]])
  kl = ae.kl_divergence(mean, 2 * jnp.log(sigma))
  expected = np.sum(np.log(1 / sigma) + (sigma ** 2 + mean ** 2) / 2 - 0.5, axis=1)
  np.testing.assert_allclose(np.asarray(kl), expected, rtol=1e-6)
  assert float(ae.kl_divergence(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0]) == 0.0


def test_sampling_uses_the_standard_deviation():
  mean, logvar = jnp.full((4000,), 1.5), jnp.full((4000,), np.log(0.25))  # σ = 0.5
  z = np.asarray(ae.sample(mean, logvar, jax.random.PRNGKey(0)))
  assert abs(z.mean() - 1.5) < 0.03 and abs(z.std() - 0.5) < 0.03


def test_downsample_pads_right_and_bottom_then_valid_conv():
  """The SD-VAE's asymmetric pad: output (i, j) sees input rows 2i..2i+2, cols 2j..2j+2, the
  row/column past the edge being zero."""
  down = ae.Downsample(1, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  kernel = np.zeros((3, 3, 1, 1), np.float32)
  kernel[2, 2, 0, 0] = 1.0  # picks input (2i + 2, 2j + 2)
  down.conv.kernel[...] = jnp.asarray(kernel)
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  out = np.asarray(down(x))[0, :, :, 0]
  np.testing.assert_array_equal(out, [[10.0, 0.0], [0.0, 0.0]])  # x[2, 2]; then padding
  up = ae.Upsample(1, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  identity = np.zeros((3, 3, 1, 1), np.float32)
  identity[1, 1, 0, 0] = 1.0
  up.conv.kernel[...] = jnp.asarray(identity)
  np.testing.assert_array_equal(np.asarray(up(jnp.array([[[[1.0], [2.0]]]])))[0, :, :, 0],
                                [[1, 1, 2, 2], [1, 1, 2, 2]])  # nearest ×2


def test_attention_is_single_head_softmax_with_residual():
  """Against NumPy: x + proj(softmax(q kᵀ / √C) v) of the GroupNorm'd positions."""
  attn = ae.Attention(8, groups=4, dtype=jnp.float32, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 2, 3, 8))
  out = np.asarray(attn(x))
  h = np.asarray(attn.norm(x)).reshape(1, 6, 8)
  dense = lambda layer, v: v @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
  q, k, v = dense(attn.query, h), dense(attn.key, h), dense(attn.value, h)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.asarray(x) + dense(attn.proj, weights @ v).reshape(1, 2, 3, 8)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_reconstruction_loss_falls_in_a_short_run():
  model = _tiny()
  images = images_lib.to_model(jnp.asarray(input_pipeline.load_fashion_mnist(None, 'test')[0][:8]))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, key):
    def loss_fn(model):
      reconstruction, mean, logvar = model(images, key)
      return jnp.mean(jnp.abs(reconstruction - images)) + 1e-6 * jnp.mean(
          ae.kl_divergence(mean, logvar))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, jax.random.PRNGKey(i))) for i in range(40)]
  assert losses[-1] < 0.7 * losses[0], losses


def test_bad_widths_are_refused():
  with pytest.raises(ValueError, match='GroupNorm'):
    _tiny(channels=(8, 10))
  with pytest.raises(ValueError, match='at least one level'):
    _tiny(channels=())
