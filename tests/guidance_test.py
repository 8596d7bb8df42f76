"""Tests for guidedflow.guidance: CFG combination, doubled forward, classifier guidance, intervals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import guidance
from guidedflow import paths
from guidedflow import sampling
from tests import gaussian_mixture as gm


def _points(seed, batch=256, t_lo=0.1, t_hi=0.9):
  kx, kt, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = 2.0 * jax.random.normal(kx, (batch, 2))
  t = jax.random.uniform(kt, (batch,), minval=t_lo, maxval=t_hi)
  y = jax.random.randint(ky, (batch,), 0, gm.NUM_CLASSES)
  return x, t, y


def test_cfg_combine_weights():
  cond, uncond = jnp.full((3, 2), 5.0), jnp.full((3, 2), 1.0)
  np.testing.assert_array_equal(guidance.cfg_combine(cond, uncond, 0.0), uncond)
  np.testing.assert_array_equal(guidance.cfg_combine(cond, uncond, 1.0), cond)
  np.testing.assert_allclose(guidance.cfg_combine(cond, uncond, 3.0), 3 * 5.0 - 2 * 1.0)
  per_sample = guidance.cfg_combine(cond, uncond, jnp.array([0.0, 1.0, 2.0]))
  np.testing.assert_allclose(per_sample[:, 0], [1.0, 5.0, 9.0])


def test_guided_prediction_uses_one_doubled_forward():
  calls = []

  def model_fn(x, t, y):
    calls.append((x.shape, t, y))
    return x * 0 + y[:, None].astype(x.dtype)  # the prediction reveals the label it saw

  x = jnp.zeros((4, 2))
  y = jnp.array([0, 1, 1, 0])
  out = guidance.guided_prediction(model_fn, x, 0.3, y, null_label=7, guidance_scale=2.0)
  assert len(calls) == 1
  shape, t, labels = calls[0]
  assert shape == (8, 2)
  np.testing.assert_allclose(t, 0.3)
  # each sample's two rows side by side (a batch split over devices keeps its rows local)
  np.testing.assert_array_equal(labels, [0, 7, 1, 7, 1, 7, 0, 7])
  np.testing.assert_allclose(out[:, 0], 2.0 * y - 7.0)


@pytest.mark.parametrize('name', ['linear', 'cosine', 'vp'])
@pytest.mark.parametrize('other', ['score', 'noise'])
def test_velocity_and_score_space_cfg_give_the_same_sde_drift(name, other):
  path = paths.get_path(name)
  x, t, y = _points(0)
  w, sigma = 2.5, 0.8
  drifts = {}
  for parameterization in ('velocity', other):
    prediction = guidance.guided_prediction(gm.model(path, parameterization), x, t, y,
                                            null_label=gm.NULL, guidance_scale=w)
    u = path.velocity_from_prediction(prediction, x, t, parameterization)
    s = path.score_from_prediction(prediction, x, t, parameterization)
    drifts[parameterization] = sampling.sde_drift(u, s, sigma)
  np.testing.assert_allclose(drifts['velocity'], drifts[other], rtol=2e-3, atol=2e-3)
  # Guidance does change the drift here, so the agreement is not vacuous.
  u1, s1 = gm.fields(path, x, t, y)
  assert float(jnp.max(jnp.abs(drifts['velocity'] - sampling.sde_drift(u1, s1, sigma)))) > 0.1


@pytest.mark.parametrize('w', [1.0, 2.5])
def test_classifier_guidance_equals_cfg_for_exact_fields(w):
  # Lecture: u(x) + w b_t ∇log p_t(y|x) = (1 − w) u(x|∅) + w u(x|y).
  path = paths.get_path('linear')
  x, t, y = _points(1)
  u_uncond, _ = gm.fields(path, x, t, jnp.full_like(y, gm.NULL))
  grad_fn = jax.grad(lambda x, t, y: jnp.sum(gm.classifier_log_prob(path, x, t, y)))
  guided = guidance.classifier_guided_velocity(u_uncond, t, x, y, grad_fn, w, path)
  cfg = guidance.guided_prediction(gm.model(path, 'velocity'), x, t, y, null_label=gm.NULL,
                                   guidance_scale=w)
  np.testing.assert_allclose(guided, cfg, rtol=2e-3, atol=2e-3)


def test_grad_log_prob_from_logits():
  weights = jnp.array([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]])  # (D=2, K=3)
  logits_fn = lambda x, t: x @ weights * (1.0 + t[:, None])
  x = jnp.array([[0.2, -0.4], [1.0, 0.5]])
  t = jnp.array([0.1, 0.7])
  y = jnp.array([2, 0])
  grad = guidance.grad_log_prob_from_logits(logits_fn)(x, t, y)
  for i in range(2):
    single = jax.grad(lambda xi, i=i: jax.nn.log_softmax(logits_fn(xi[None], t[i:i + 1]))[0, y[i]])
    np.testing.assert_allclose(grad[i], single(x[i]), rtol=1e-5)


def test_effective_scale_applies_only_inside_the_interval():
  t = jnp.array([0.0, 0.2, 0.5, 0.8, 1.0])
  np.testing.assert_allclose(guidance.effective_scale(3.0, t, (0.2, 0.8)),
                             [1.0, 3.0, 3.0, 3.0, 1.0])
  assert guidance.effective_scale(3.0, t, None) == 3.0


def test_guidance_active_compares_in_the_float32_of_the_grid():
  t = jnp.linspace(0.0, 1.0, 11, dtype=jnp.float32)
  interval = (0.3, 0.6)
  grid = np.asarray(t)
  expected = (grid >= np.float32(0.3)) & (grid <= np.float32(0.6))  # float32 bounds, closed
  np.testing.assert_array_equal(guidance.guidance_active(t, interval), expected)
  np.testing.assert_array_equal(guidance.effective_scale(3.0, t, interval) == 3.0, expected)
  assert not bool(guidance.guidance_active(0, (0.2, 0.5)))  # int time: the bounds stay floats
  assert bool(guidance.guidance_active(1, (0.5, 1.0)))
  assert bool(jnp.all(guidance.guidance_active(t, None)))
