"""The KL autoencoder (SD-VAE family): shapes, the SD-VAE's size, the KL closed form, the
resamplers' arithmetic and a reconstruction loss that falls in a short run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from guidedflow import errors
from guidedflow import feature_networks
from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow import train
from guidedflow.models import autoencoder as ae
from guidedflow.tasks import autoencoder as autoencoder_task
from guidedflow.models.layers import param_count
from guidedflow.tasks import registry
from guidedflow import trained
from guidedflow.models import factory


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


# ----------------------------------------------------------------------------- the task


def _task_config(**loss):
  from configs import fmnist_autoencoder  # pylint: disable=g-import-not-at-top
  config = fmnist_autoencoder.get_config()
  config.model.channels = (8, 16, 16)
  config.model.norm_groups = 4
  config.model.latent_channels = 4
  config.input.num_train_examples = 512
  config.eval.num_examples = 200
  config.eval.batch_size = 100
  config.eval.num_latent_examples = 300
  config.eval.num_quality_examples = 100
  config.eval.feature_network = 'none'
  config.train.num_steps = 30
  config.train.batch_size = 32
  config.train.log_every_steps = 10
  config.optim.warmup_steps = 2
  config.optim.learning_rate = 3e-3
  config.loss.feature_weight = 0.0  # the feature loss has its own test
  for key, value in loss.items():
    config.loss[key] = value
  return config


@pytest.fixture(scope='module')
def trained_autoencoder(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('autoencoder'))
  state, result = train.train_and_evaluate(_task_config(), workdir)
  return workdir, state, result


def test_task_trains_and_reports_psnr_and_latent_statistics(trained_autoencoder):
  workdir, state, result = trained_autoencoder
  assert result['task'] == 'autoencoder' and result['step'] == 30
  assert 8 < result['test_psnr'] < 60 and result['test_mse'] > 0
  # PSNR is 10 log10(4 / MSE) per image: at most the PSNR of the mean MSE (Jensen).
  assert result['test_psnr'] >= 10 * np.log10(4 / result['test_mse']) - 1e-3
  assert result['latent_shape'] == [7, 7, 4]
  assert result['latent_scale'] == pytest.approx(1 / result['latent_std'], rel=1e-4)
  assert 'ema_params' in state
  assert os.path.exists(os.path.join(workdir, 'samples', 'reconstructions.png'))
  model, loaded, _ = trained.load(workdir, 'autoencoder', 'train it')
  assert loaded['step'] == 30 and model.latent_channels == 4
  # The loaded weights are the EMA's, which result.json (PSNR, latent scale) reports on.
  loaded_leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  for name, other in (('ema_params', True), ('params', False)):
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(loaded_leaves, jax.tree.leaves(state[name])))
    assert same == other, name


class _Affine(nnx.Module):
  """encode: mean = 2x + 1 on the first 4×4 pixels, log-variance at the clip −30 (σ ≈ 3e-7)."""

  def __init__(self):
    self.w = nnx.Param(jnp.ones(()))

  def encode(self, x):
    mean = 2 * self.w[...] * x[:, :4, :4, :] + 1
    return mean, jnp.full(mean.shape, -30.0)


def test_latent_scale_is_one_over_the_std_of_known_latents():
  images = np.random.default_rng(0).integers(0, 256, (300, 28, 28, 1), dtype=np.uint8)
  dataset = input_pipeline.ArrayDataset(images, np.zeros(300, np.int64), num_classes=10)
  stats = autoencoder_task.latent_statistics(_Affine(), dataset, _task_config())
  x = images_lib.to_model(images[:, :4, :4, :]).astype(np.float64)
  assert stats['latent_std'] == pytest.approx(2 * x.std(), rel=1e-4)
  assert stats['latent_shift'] == pytest.approx(2 * x.mean() + 1, abs=1e-4)
  assert stats['latent_scale'] == pytest.approx(1 / (2 * x.std()), rel=1e-4)


def test_loss_terms_add_up_with_their_weights():
  config = _task_config(kl_weight=0.5, reconstruction='l2')
  task = registry.get_task(config)
  model = factory.autoencoder_kl(config, (28, 28, 1))()
  x = images_lib.to_model(jnp.asarray(input_pipeline.load_fashion_mnist(None, 'test')[0][:4]))
  batch = {'image': x, 'label': jnp.zeros(4, jnp.int32)}
  key = jax.random.PRNGKey(3)
  total, metrics = task.loss(model, batch, key)
  reconstruction, mean, logvar = model(x, key)
  rec = float(jnp.mean(jnp.square(reconstruction - x)))
  kl = float(jnp.mean(ae.kl_divergence(mean, logvar))) / (28 * 28)
  assert float(metrics['reconstruction']) == pytest.approx(rec, rel=1e-5)
  assert float(metrics['kl']) == pytest.approx(kl, rel=1e-5)
  assert float(total) == pytest.approx(rec + 0.5 * kl, rel=1e-5)


def test_autoencoder_config_errors_name_the_key():
  config = _task_config(reconstruction='l3')
  with pytest.raises(errors.ConfigError, match="loss.reconstruction='l3'"):
    registry.validate(config)
  config = _task_config()
  config.model.channels = (8, 16, 16, 16)  # 28 does not divide by 8
  with pytest.raises(errors.ConfigError, match='does not divide'):
    factory.autoencoder_kl(config, (28, 28, 1))


def test_feature_loss_compares_classifier_features(tmp_path):
  """With loss.feature_weight > 0 the loss adds weight · ‖φ(x̂) − φ(x)‖² of the classifier's
  features (a tiny classifier trained here, loaded from its workdir)."""
  from configs import fmnist_classifier  # pylint: disable=g-import-not-at-top
  clf = fmnist_classifier.get_config()
  clf.model.channels, clf.model.feature_dim = (8, 8), 16
  clf.input.num_train_examples, clf.eval.num_examples = 256, 100
  clf.train.num_steps, clf.train.batch_size, clf.eval.batch_size = 4, 32, 100
  train.train_and_evaluate(clf, str(tmp_path / 'clf'))
  config = _task_config(feature_weight=2.0)
  config.loss.feature_workdir = str(tmp_path / 'clf')  # not the evaluation's classifier
  config.eval.classifier_workdir = str(tmp_path / 'missing')
  task = registry.get_task(config)
  model = factory.autoencoder_kl(config, (28, 28, 1))()
  x = images_lib.to_model(jnp.asarray(input_pipeline.load_fashion_mnist(None, 'test')[0][:4]))
  batch = {'image': x, 'label': jnp.zeros(4, jnp.int32)}
  total, metrics = task.loss(model, batch, jax.random.PRNGKey(0))
  reconstruction, _, _ = model(x, jax.random.PRNGKey(0))
  classifier = trained.load(str(tmp_path / 'clf'), 'classifier', 'x')[0]
  feature = float(jnp.mean(jnp.square(classifier.features(reconstruction) -
                                      classifier.features(x))))
  assert float(metrics['feature']) == pytest.approx(feature, rel=1e-4) and feature > 0
  expected = float(metrics['reconstruction']) + 1e-6 * float(metrics['kl']) + 2.0 * feature
  assert float(total) == pytest.approx(expected, rel=1e-5)
  # The program trains with it (the classifier is restored before the step is traced under
  # the training mesh; restoring it inside the trace failed on its sharding names).
  config.train.num_steps, config.eval.every_steps = 2, 0
  _, result = train.train_and_evaluate(config, str(tmp_path / 'ae'))
  assert result['step'] == 2 and np.isfinite(result['test_psnr'])
  # Unset, the feature loss falls back to the evaluation's classifier: a missing one fails
  # before the first step.
  config.loss.feature_workdir = None
  with pytest.raises(feature_networks.FeatureNetworkNotFoundError, match='missing'):
    train.train_and_evaluate(config, str(tmp_path / 'ae2'))
  assert not (tmp_path / 'ae2' / 'checkpoints').exists() or not any(
      (tmp_path / 'ae2' / 'checkpoints').iterdir())
