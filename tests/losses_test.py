"""Tests for guidedflow.losses: label dropout, time samplers, oracle losses, jit safety."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import losses
from guidedflow import paths

NUM_CLASSES = 10
NULL = NUM_CLASSES


def _point_mass_batch(batch=256, seed=0):
  z0 = jax.random.normal(jax.random.PRNGKey(seed), (4, 4, 1))
  labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
  return z0, {'image': jnp.broadcast_to(z0, (batch, 4, 4, 1)), 'label': labels}


@pytest.mark.parametrize('label_dropout', [0.1, 0.5])
def test_label_dropout_rate_within_binomial_tolerance(label_dropout):
  n = 20_000
  labels = jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES
  dropped_labels, mask = losses.drop_labels(jax.random.PRNGKey(1), labels, label_dropout, NULL)
  count = int(jnp.sum(dropped_labels == NULL))
  assert count == int(jnp.sum(mask))
  sd = np.sqrt(n * label_dropout * (1 - label_dropout))
  assert abs(count - n * label_dropout) < 5 * sd, (count, n * label_dropout)
  # Kept labels are untouched.
  np.testing.assert_array_equal(dropped_labels[~mask], labels[~mask])


def test_no_null_label_without_dropout_and_all_null_with_full_dropout():
  labels = jnp.arange(5000, dtype=jnp.int32) % NUM_CLASSES
  kept, _ = losses.drop_labels(jax.random.PRNGKey(2), labels, 0.0, NULL)
  assert not bool(jnp.any(kept == NULL))
  gone, _ = losses.drop_labels(jax.random.PRNGKey(2), labels, 1.0, NULL)
  assert bool(jnp.all(gone == NULL))


def test_time_samplers():
  key = jax.random.PRNGKey(3)
  uniform = losses.sample_time(key, (20_000,), 'uniform')
  assert 0.0 <= float(uniform.min()) and float(uniform.max()) < 1.0
  assert abs(float(uniform.mean()) - 0.5) < 0.01
  logit = losses.sample_time(key, (20_000,), 'logit_normal', {'mean': 1.0, 'std': 0.5})
  # t = sigmoid(1 + 0.5 n): the median is sigmoid(1) ≈ 0.731.
  assert abs(float(jnp.median(logit)) - float(jax.nn.sigmoid(1.0))) < 0.01
  logits = jnp.log(logit) - jnp.log1p(-logit)
  assert abs(float(jnp.std(logits)) - 0.5) < 0.02


@pytest.mark.parametrize('name', paths.SCHEDULES)
def test_cfm_loss_is_zero_for_the_point_mass_oracle(name):
  path = paths.get_path(name)
  z0, batch = _point_mass_batch()
  # For a point mass, the marginal velocity IS the conditional one.
  oracle = lambda x, t, y: path.conditional_velocity(x, z0, t)
  loss, metrics = losses.loss_fn(oracle, batch, jax.random.PRNGKey(0), path=path,
                                 parameterization='velocity', null_label=NULL)
  wrong, _ = losses.loss_fn(lambda x, t, y: 0.9 * oracle(x, t, y), batch,
                            jax.random.PRNGKey(0), path=path, parameterization='velocity',
                            null_label=NULL)
  assert float(loss) < 1e-3 * float(wrong), (float(loss), float(wrong))
  assert float(wrong) > 1e-3
  assert float(metrics['loss']) == float(loss)


@pytest.mark.parametrize('name', paths.SCHEDULES)
@pytest.mark.parametrize('parameterization,dsm_weighting',
                         [('score', 'none'), ('score', 'noise'), ('noise', 'noise'),
                          ('noise', 'none')])
def test_dsm_loss_is_zero_for_the_point_mass_oracle(name, parameterization, dsm_weighting):
  path = paths.get_path(name)
  z0, batch = _point_mass_batch()

  def oracle(x, t, y):
    score = path.conditional_score(x, z0, t)
    return score if parameterization == 'score' else path.noise_from_score(score, t)

  kwargs = dict(path=path, parameterization=parameterization, null_label=NULL,
                dsm_weighting=dsm_weighting)
  loss, _ = losses.loss_fn(oracle, batch, jax.random.PRNGKey(0), **kwargs)
  wrong, _ = losses.loss_fn(lambda x, t, y: 0.9 * oracle(x, t, y), batch,
                            jax.random.PRNGKey(0), **kwargs)
  assert float(loss) < 1e-3 * float(wrong), (float(loss), float(wrong))


def test_loss_is_a_mean_over_elements():
  # z = 0, linear path, zero model: CFM target −eps, ε-DSM target eps, both E[eps²] = 1 per element.
  batch = {'image': jnp.zeros((512, 8, 8, 1)), 'label': jnp.zeros((512,), jnp.int32)}
  zero = lambda x, t, y: jnp.zeros_like(x)
  for parameterization in ('velocity', 'noise'):
    loss, _ = losses.loss_fn(zero, batch, jax.random.PRNGKey(5), path='linear',
                             parameterization=parameterization, null_label=NULL)
    assert loss.shape == ()
    assert abs(float(loss) - 1.0) < 0.03, (parameterization, float(loss))


def test_model_sees_dropped_labels_and_clipped_times():
  _, batch = _point_mass_batch(batch=4096)
  seen = {}

  def model_fn(x, t, y):
    seen.update(t=t, y=y)
    assert x.shape == batch['image'].shape and t.shape == (4096,) and y.shape == (4096,)
    return jnp.zeros_like(x)

  _, metrics = losses.loss_fn(model_fn, batch, jax.random.PRNGKey(6), path='linear',
                              parameterization='score', null_label=NULL, label_dropout=0.25,
                              t_eps=0.05)
  dropped = np.asarray(seen['y'] == NULL)
  assert abs(dropped.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 4096)
  np.testing.assert_allclose(float(metrics['label_dropped_fraction']), dropped.mean())
  assert float(seen['t'].max()) <= 0.95 and float(seen['t'].min()) >= 0.0
  np.testing.assert_allclose(float(metrics['t_mean']), float(seen['t'].mean()), rtol=1e-6)


@pytest.mark.parametrize('parameterization', ['velocity', 'noise'])
def test_loss_is_jit_safe_and_differentiable(parameterization):
  _, batch = _point_mass_batch()

  def loss_of(scale, batch, key):
    model_fn = lambda x, t, y: scale * x + t[:, None, None, None]
    return losses.loss_fn(model_fn, batch, key, path='cosine', parameterization=parameterization,
                          null_label=NULL, time_sampler='logit_normal',
                          time_sampler_kwargs={'mean': 0.0, 'std': 1.0})

  fn = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
  (loss, metrics), grad = fn(jnp.float32(0.3), batch, jax.random.PRNGKey(7))
  (eager, _), _ = jax.value_and_grad(loss_of, has_aux=True)(
      jnp.float32(0.3), batch, jax.random.PRNGKey(7))
  np.testing.assert_allclose(float(loss), float(eager), rtol=1e-5)
  assert np.isfinite(float(grad)) and float(grad) != 0.0
  assert set(metrics) >= {'loss', 't_mean', 'label_dropped_fraction'}


def test_cfm_and_dsm_entry_points_match_dispatch():
  _, batch = _point_mass_batch()
  model_fn = lambda x, t, y: 0.5 * x
  key = jax.random.PRNGKey(8)
  common = dict(path='vp', null_label=NULL)
  np.testing.assert_allclose(
      losses.cfm_loss(model_fn, batch, key, **common)[0],
      losses.loss_fn(model_fn, batch, key, parameterization='velocity', **common)[0])
  np.testing.assert_allclose(
      losses.dsm_loss(model_fn, batch, key, parameterization='score', dsm_weighting='none',
                      **common)[0],
      losses.loss_fn(model_fn, batch, key, parameterization='score', dsm_weighting='none',
                     **common)[0])


@pytest.mark.parametrize('kwargs,argument', [
    (dict(parameterization='x0'), 'parameterization'),
    (dict(time_sampler='beta'), 'time_sampler'),
    (dict(dsm_weighting='snr'), 'dsm_weighting'),
    (dict(label_dropout=1.5), 'label_dropout'),
    (dict(path='ddpm'), 'path'),
    (dict(time_sampler='logit_normal', time_sampler_kwargs={'loc': 0.0}), 'time_sampler_kwargs'),
])
def test_bad_arguments_raise(kwargs, argument):
  _, batch = _point_mass_batch(batch=4)
  call = functools.partial(losses.loss_fn, lambda x, t, y: x, batch, jax.random.PRNGKey(0),
                           null_label=NULL)
  full = dict(path='linear', parameterization='velocity')
  full.update(kwargs)
  with pytest.raises(ValueError, match=argument):
    call(**full)


@pytest.mark.parametrize('parameterization', ['velocity', 'noise'])
def test_mask_weights_out_padding(parameterization):
  """Padded rows (mask 0) do not count: their content cannot change the loss, and the masked
  loss is the mean of the real rows' per-sample losses."""
  batch_size, real = 16, 10
  images = jax.random.normal(jax.random.PRNGKey(3), (batch_size, 4, 4, 1))
  mask = (jnp.arange(batch_size) < real).astype(jnp.float32)
  labels = jnp.arange(batch_size, dtype=jnp.int32) % NUM_CLASSES
  model_fn = lambda x, t, y: 0.5 * x  # pylint: disable=unnecessary-lambda-assignment
  kw = dict(path='linear', parameterization=parameterization, null_label=NULL)
  key = jax.random.PRNGKey(4)
  loss_fn = functools.partial(losses.loss_fn, model_fn, key=key, **kw)

  masked, _ = loss_fn({'image': images, 'label': labels, 'mask': mask})
  garbage = images.at[real:].set(1e3)
  masked_garbage, _ = loss_fn({'image': garbage, 'label': labels, 'mask': mask})
  np.testing.assert_allclose(masked, masked_garbage, rtol=1e-6)
  # All-ones mask = the unmasked mean.
  full, _ = loss_fn({'image': images, 'label': labels})
  full_masked, _ = loss_fn({'image': images, 'label': labels, 'mask': jnp.ones(batch_size)})
  np.testing.assert_allclose(full, full_masked, rtol=1e-6)
  # Unmasked, the garbage rows dominate.
  unmasked_garbage, _ = loss_fn({'image': garbage, 'label': labels})
  assert float(unmasked_garbage) > 100 * float(masked)


def test_dsm_weighting_none_is_noise_weighting_over_beta_squared():
  """At a pinned t (every draw clipped to 1 − t_eps = 0.7, so β = 0.3 on the linear path) and the
  same draws, ‖s_θ − s‖² = ‖ε_θ − ε‖² / β²: the ratio of the two weightings is 1/β² = 11.1."""
  batch = {'image': jax.random.normal(jax.random.PRNGKey(1), (16, 4, 4, 1)),
           'label': jnp.arange(16) % 3}
  common = dict(path='linear', null_label=3, parameterization='noise', label_dropout=0.0,
                time_sampler='logit_normal', time_sampler_kwargs=dict(mean=30.0, std=0.01),
                t_eps=0.3)
  zero = lambda x, t, y: jnp.zeros_like(x)  # ε_θ = 0, so s_θ = 0
  key = jax.random.PRNGKey(2)
  noise, metrics = losses.dsm_loss(zero, batch, key, dsm_weighting='noise', **common)
  raw, _ = losses.dsm_loss(zero, batch, key, dsm_weighting='none', **common)
  assert float(metrics['t_mean']) == pytest.approx(0.7, abs=1e-6)
  assert float(raw) / float(noise) == pytest.approx(1 / 0.3 ** 2, rel=1e-5)
  assert float(noise) == pytest.approx(1.0, abs=0.3)  # E ε² = 1


def test_caption_dropout_flags_null_rows_of_a_text_condition_at_the_rate_eta():
  """A text batch carries its condition under 'text'; dropout sets its 'null' flags (the label
  path's rate), keeps rows already null, and hands the model the rest unchanged."""
  seen = {}

  def model_fn(x, t, y):
    seen.update(y)
    return jnp.zeros_like(x)

  n = 4000
  tokens = jnp.arange(n * 3, dtype=jnp.int32).reshape(n, 3)
  already = (jnp.arange(n) % 10 == 0).astype(jnp.int32)
  batch = {'image': jnp.ones((n, 2)), 'text': {'tokens': tokens, 'null': already}}
  _, metrics = losses.loss_fn(model_fn, batch, jax.random.PRNGKey(0), path='linear',
                              parameterization='velocity', null_label=10, label_dropout=0.25)
  null = np.asarray(seen['null'])
  np.testing.assert_array_equal(np.asarray(seen['tokens']), tokens)
  assert null[np.asarray(already) == 1].all()
  dropped = null[np.asarray(already) == 0].mean()
  assert abs(dropped - 0.25) < 4 * np.sqrt(0.25 * 0.75 / (0.9 * n))
  assert abs(float(metrics['label_dropped_fraction']) - 0.25) < 0.03
