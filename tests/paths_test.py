"""Tests for guidedflow.paths: schedule boundaries, derivatives and conversion identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import paths

SCHEDULES = paths.SCHEDULES


def _points(seed, batch=64, dim=3, t_lo=0.1, t_hi=0.95):
  kz, ke, kt = jax.random.split(jax.random.PRNGKey(seed), 3)
  z = jax.random.normal(kz, (batch, dim))
  eps = jax.random.normal(ke, (batch, dim))
  t = jax.random.uniform(kt, (batch,), minval=t_lo, maxval=t_hi)
  return z, eps, t


@pytest.mark.parametrize('name', SCHEDULES)
def test_boundaries_are_exact(name):
  path = paths.get_path(name)
  t = jnp.array([0.0, 1.0], jnp.float32)
  np.testing.assert_array_equal(np.asarray(path.alpha(t)), [0.0, 1.0])
  np.testing.assert_array_equal(np.asarray(path.beta(t)), [1.0, 0.0])


@pytest.mark.parametrize('name', SCHEDULES)
def test_derivatives_match_autodiff(name):
  path = paths.get_path(name)
  t = jnp.linspace(0.02, 0.98, 25)
  np.testing.assert_allclose(path.alpha_dot(t), jax.vmap(jax.grad(path.alpha))(t),
                             rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(path.beta_dot(t), jax.vmap(jax.grad(path.beta))(t),
                             rtol=2e-4, atol=1e-5)
  # alpha, beta monotone and positive inside: the path really goes from noise to data.
  assert np.all(np.diff(np.asarray(path.alpha(t))) > 0)
  assert np.all(np.diff(np.asarray(path.beta(t))) < 0)
  assert np.all(np.asarray(path.wronskian(t)) > 0)


@pytest.mark.parametrize('name', ['cosine', 'vp'])
def test_variance_preserving(name):
  path = paths.get_path(name)
  t = jnp.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(path.alpha(t) ** 2 + path.beta(t) ** 2, 1.0, atol=1e-6)


def test_vp_is_close_to_textbook_ddpm():
  # The exact-boundary rescaling moves alpha by at most exp(−B(1)/2) ≈ 6.6e-3.
  path = paths.get_path('vp')
  tau = 1.0 - jnp.linspace(0.0, 1.0, 11)
  textbook = jnp.exp(-0.5 * (0.1 * tau + 0.5 * 19.9 * tau**2))
  np.testing.assert_allclose(path.alpha(1.0 - tau), textbook, atol=7e-3)


@pytest.mark.parametrize('name', SCHEDULES)
def test_conditional_velocity_is_time_derivative_of_xt(name):
  path = paths.get_path(name)
  z, eps, t = _points(0, t_hi=0.9)
  d_dt = jax.jvp(lambda t: path.sample_xt(z, eps, t), (t,), (jnp.ones_like(t),))[1]
  x = path.sample_xt(z, eps, t)
  np.testing.assert_allclose(path.conditional_velocity_from_noise(z, eps, t), d_dt,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(path.conditional_velocity(x, z, t), d_dt, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(path.conditional_score(x, z, t),
                             path.conditional_score_from_noise(eps, t), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('name', SCHEDULES)
def test_conditional_velocity_equals_a_x_plus_b_score(name):
  path = paths.get_path(name)
  z, eps, t = _points(1)
  x = path.sample_xt(z, eps, t)
  a, b = path.velocity_coefficients(t[:, None])
  expected = a * x + b * path.conditional_score(x, z, t)
  np.testing.assert_allclose(path.conditional_velocity(x, z, t), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize('name', SCHEDULES)
def test_round_trips(name):
  path = paths.get_path(name)
  _, _, t = _points(2)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(k1, (64, 3))
  velocity = jax.random.normal(k2, (64, 3))
  score = jax.random.normal(k3, (64, 3))
  tol = dict(rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(
      path.velocity_from_score(path.score_from_velocity(velocity, x, t), x, t), velocity, **tol)
  np.testing.assert_allclose(
      path.score_from_velocity(path.velocity_from_score(score, x, t), x, t), score, **tol)
  np.testing.assert_allclose(path.score_from_noise(path.noise_from_score(score, t), t), score,
                             **tol)
  noise = path.noise_from_velocity(velocity, x, t)
  np.testing.assert_allclose(noise, path.noise_from_score(path.score_from_velocity(velocity, x, t),
                                                          t), **tol)
  np.testing.assert_allclose(path.velocity_from_noise(noise, x, t), velocity, **tol)
  # One clean-data estimate whichever prediction it comes from.
  x_hat = path.x_hat_from_score(path.score_from_velocity(velocity, x, t), x, t)
  np.testing.assert_allclose(path.x_hat_from_velocity(velocity, x, t), x_hat, **tol)
  np.testing.assert_allclose(path.x_hat_from_noise(noise, x, t), x_hat, **tol)


@pytest.mark.parametrize('name', SCHEDULES)
def test_x_hat_recovers_z_for_conditional_targets(name):
  path = paths.get_path(name)
  z, eps, t = _points(4)
  x = path.sample_xt(z, eps, t)
  tol = dict(rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(path.x_hat_from_noise(eps, x, t), z, **tol)
  np.testing.assert_allclose(path.x_hat_from_score(path.conditional_score(x, z, t), x, t), z, **tol)
  np.testing.assert_allclose(
      path.x_hat_from_velocity(path.conditional_velocity_from_noise(z, eps, t), x, t), z, **tol)
  for parameterization, prediction in [('velocity', path.conditional_velocity(x, z, t)),
                                       ('score', path.conditional_score(x, z, t)),
                                       ('noise', eps)]:
    np.testing.assert_allclose(
        path.velocity_from_prediction(prediction, x, t, parameterization),
        path.conditional_velocity_from_noise(z, eps, t), **tol)
    np.testing.assert_allclose(path.score_from_prediction(prediction, x, t, parameterization),
                               -eps / path.beta(t)[:, None], **tol)


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_safe_forms_are_finite_at_the_ends(name):
  # The documented ranges: these forms stay finite where the naive formula is 0/0.
  path = paths.get_path(name)
  x = jnp.ones((2, 3))
  t = jnp.array([0.0, 1.0])
  assert np.all(np.isfinite(path.noise_from_velocity(x, x, t)))
  assert np.all(np.isfinite(path.x_hat_from_velocity(x, x, t)))
  assert np.all(np.isfinite(path.velocity_from_noise(x, x, jnp.array([1.0, 1.0]))))
  assert np.all(np.isfinite(path.conditional_velocity_from_noise(x, x, t)))


def test_time_broadcasts_over_image_axes():
  path = paths.get_path('linear')
  z = jnp.ones((3, 4, 4, 1))
  t = jnp.array([0.0, 0.5, 1.0])
  xt = path.sample_xt(z, jnp.zeros_like(z), t)
  np.testing.assert_allclose(xt[:, 0, 0, 0], t)
  assert xt.shape == z.shape


def test_paths_are_hashable_static_arguments():
  assert paths.get_path('vp') == paths.get_path('vp')
  assert hash(paths.get_path('cosine')) == hash(paths.get_path('cosine'))
  path = paths.get_path('linear')
  assert paths.get_path(path) is path
  f = jax.jit(lambda t, path: path.alpha(t), static_argnums=1)
  assert float(f(0.25, paths.get_path('linear'))) == 0.25


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match=r"path must be one of \('linear', 'cosine', 'vp'\)"):
    paths.get_path('ddpm')
  with pytest.raises(ValueError, match='parameterization'):
    paths.get_path('linear').velocity_from_prediction(1.0, 1.0, 0.5, 'x0')
