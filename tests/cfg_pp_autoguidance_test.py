"""Tests for CFG++ and autoguidance, the guidance methods that are not one combination of u(x|y)
and u(x|∅) at one time (issue 49).

CFG++'s step and autoguidance's field are checked against independent NumPy versions of their
formulas on the Gaussian-mixture toy's exact u(x|y) and u(x|∅), the neutral settings against
plain CFG / the conditional model, and the samplers' NFE. The real Sampler path (a weak
checkpoint of a tiny DiT run) is in `classifier_guidance_sampler_test.py`, beside its trained
generator.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import guidance
from guidedflow import paths
from guidedflow import sampling
from guidedflow import sampling_plan
from tests import gaussian_mixture as gm

LAMBDA = 0.6
_LABELS = jnp.array([0, 1, 0, 1], jnp.int32)


# ---- Independent NumPy versions (float64) of the path's quantities and CFG++'s step.

def _np_path(name, t):
  """(α, β, α̇, β̇) of the linear and cosine paths at t, written out."""
  if name == 'linear':
    return t, 1.0 - t, 1.0, -1.0
  half_pi = np.pi / 2
  return (np.sin(half_pi * t), np.cos(half_pi * t), half_pi * np.cos(half_pi * t),
          -half_pi * np.sin(half_pi * t))


def _np_cfg_pp_step(name, x, t, t_next, cond, uncond, lam):
  """x' = α(t') x̂1(u_∅ + λ (u_c − u_∅)) + β(t') x̂0(u_∅), from x = α x1 + β x0 and
  u = α̇ x1 + β̇ x0 solved for (x1, x0)."""
  x, cond, uncond = (np.asarray(a, np.float64) for a in (x, cond, uncond))
  alpha, beta, alpha_dot, beta_dot = _np_path(name, t)
  guided = uncond + lam * (cond - uncond)
  data = (beta_dot * x - beta * guided) / (alpha * beta_dot - beta * alpha_dot)
  noise = (alpha_dot * x - alpha * uncond) / (alpha_dot * beta - alpha * beta_dot)
  alpha_next, beta_next, _, _ = _np_path(name, t_next)
  return alpha_next * data + beta_next * noise


def _np_cfg_pp_sampler(name, key, lam, num_steps):
  """CFG++'s Euler/DDIM steps from the sampler's initial noise, the toy's exact fields."""
  path = paths.get_path(name)
  x = np.asarray(jax.random.normal(jax.random.split(key)[0], (len(_LABELS), 2)), np.float64)
  grid = sampling_plan.time_grid(num_steps, 0.0).astype(np.float64)
  for t, t_next in zip(grid[:-1], grid[1:]):
    times = jnp.full((len(_LABELS),), t, jnp.float32)
    cond, _ = gm.fields(path, jnp.asarray(x, jnp.float32), times, _LABELS)
    uncond, _ = gm.fields(path, jnp.asarray(x, jnp.float32), times, jnp.full_like(_LABELS, gm.NULL))
    x = _np_cfg_pp_step(name, x, t, t_next, cond, uncond, lam)
  return x


def _sample(name, method, num_steps, guidance_scale, guidance_method, key=jax.random.PRNGKey(7),
            model_fn=None, **kwargs):
  path = paths.get_path(name)
  return sampling.sample(
      model_fn or gm.model(path, 'velocity'), key, _LABELS, shape=(2,), path=path,
      parameterization='velocity', null_label=gm.NULL, guidance_scale=guidance_scale,
      method=method, num_steps=num_steps, guidance_method=guidance_method, **kwargs)


# ---- CFG++

@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_cfg_pp_step_matches_numpy_in_both_forms(name):
  """One step t → t' on the toy: Euler's x + h v and the data-prediction (DDIM) step of the
  data-form velocity both land on α(t') x̂1_guided + β(t') x̂0_uncond."""
  path = paths.get_path(name)
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  x = 2.0 * jax.random.normal(kx, (64, 2))
  y = jax.random.randint(ky, (64,), 0, gm.NUM_CLASSES)
  t, t_next = np.float32(0.3), np.float32(0.45)
  cond, _ = gm.fields(path, x, t, y)
  uncond, _ = gm.fields(path, x, t, jnp.full_like(y, gm.NULL))
  lam = jnp.linspace(0.0, 1.0, 64)  # per-sample λ
  expected = _np_cfg_pp_step(name, x, float(t), float(t_next), cond, uncond,
                             np.asarray(lam, np.float64)[:, None])
  euler = x + (t_next - t) * guidance.cfg_pp_velocity(cond, uncond, x, t, t_next, lam, path)
  np.testing.assert_allclose(euler, expected, rtol=1e-5, atol=1e-5)
  data = path.x_hat_from_velocity(
      guidance.cfg_pp_velocity(cond, uncond, x, t, t_next, lam, path, data_form=True), x, t)
  decay = path.beta(t_next) / path.beta(t)
  ddim = decay * x + (path.alpha(t_next) - path.alpha(t) * decay) * data
  np.testing.assert_allclose(ddim, expected, rtol=1e-5, atol=1e-5)
  # The data form is CFG at the documented w(λ, t, t'), and CFG++ is not CFG at w = λ.
  w = lam[:, None] * path.alpha(t_next) * path.beta(t) / (
      path.alpha(t_next) * path.beta(t) - path.alpha(t) * path.beta(t_next))
  np.testing.assert_allclose(
      guidance.cfg_pp_velocity(cond, uncond, x, t, t_next, lam, path, data_form=True),
      guidance.cfg_combine(cond, uncond, w), rtol=1e-5, atol=1e-5)
  plain = x + (t_next - t) * guidance.cfg_combine(cond, uncond, lam)
  assert float(jnp.max(jnp.abs(plain - expected))) > 0.1


@pytest.mark.parametrize('method,num_steps', [('euler', 4), ('dpmpp_2m', 2)])
def test_cfg_pp_samples_match_numpy_on_the_cosine_path(method, num_steps):
  """The whole sampler: Euler at every step, DPM-Solver++(2M) with 2 steps (both first order,
  i.e. DDIM), against CFG++'s NumPy steps; u(x|∅) runs at every λ, so NFE is 2 per step."""
  key = jax.random.PRNGKey(7)
  samples, info = _sample('cosine', method, num_steps, LAMBDA, 'cfg_pp', key)
  np.testing.assert_allclose(samples, _np_cfg_pp_sampler('cosine', key, LAMBDA, num_steps),
                             rtol=1e-4, atol=1e-4)
  assert info['nfe'] == 2 * num_steps
  # λ = 1 is not the conditional model: the plan still runs u(x|∅).
  one, info = _sample('cosine', method, num_steps, 1.0, 'cfg_pp', key)
  assert info['nfe'] == 2 * num_steps
  np.testing.assert_allclose(one, _np_cfg_pp_sampler('cosine', key, 1.0, num_steps), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('method', sampling_plan.CFG_PP_METHODS)
def test_cfg_pp_at_lambda_0_is_plain_cfg_at_w_0(method):
  """λ = 0: the unconditional model's DDIM step, which on the linear path is plain CFG's step
  at w = 0 (the unconditional model) for every sampler CFG++ runs with."""
  cfg, _ = _sample('linear', method, 6, 0.0, 'cfg')
  cfg_pp, _ = _sample('linear', method, 6, 0.0, 'cfg_pp')
  np.testing.assert_allclose(cfg_pp, cfg, rtol=1e-6, atol=1e-6)
  guided, _ = _sample('linear', method, 6, LAMBDA, 'cfg_pp')
  assert np.all(np.isfinite(guided)) and float(jnp.max(jnp.abs(guided - cfg))) > 1e-2


def test_cfg_pp_is_refused_where_it_has_no_step():
  for method in ('heun', 'euler_maruyama'):
    with pytest.raises(ValueError, match=r"guidance_method='cfg_pp' runs with method in "
                                         r"\('euler', 'dpmpp_2m', 'unipc'\).*got method='"
                                         + method):
      _sample('linear', method, 3, LAMBDA, 'cfg_pp')


# ---- Autoguidance

def _weak_model(params, x, t, y):
  """A 'weaker' model of the toy: the exact velocity, shrunk and shifted by its parameters."""
  return params['scale'] * gm.model(paths.get_path('linear'), 'velocity')(x, t, y) + (
      params['shift'] * x)


def _weak(scale, shift):
  return jax.tree_util.Partial(_weak_model, {'scale': jnp.float32(scale),
                                             'shift': jnp.float32(shift)})


def test_autoguidance_samples_match_numpy_with_the_weak_params_as_arguments():
  w, key, steps = 2.5, jax.random.PRNGKey(3), 4
  strong = gm.model(paths.get_path('linear'), 'velocity')
  compiled = sampling._integrate_static_model._cache_size()  # pylint: disable=protected-access
  samples, info = _sample('linear', 'euler', steps, w, 'autoguidance', key, strong,
                          weak_model_fn=_weak(0.7, 0.2))
  assert info['nfe'] == 2 * steps  # the strong and the weak model, once each per step
  x = np.asarray(jax.random.normal(jax.random.split(key)[0], (len(_LABELS), 2)), np.float64)
  grid = sampling_plan.time_grid(steps, 0.0).astype(np.float64)
  for t, t_next in zip(grid[:-1], grid[1:]):
    times = jnp.full((len(_LABELS),), t, jnp.float32)
    u = np.asarray(strong(jnp.asarray(x, jnp.float32), times, _LABELS), np.float64)
    u_weak = 0.7 * u + 0.2 * x
    x = x + (t_next - t) * (u_weak + w * (u - u_weak))
  np.testing.assert_allclose(samples, x, rtol=1e-5, atol=1e-5)
  # Other weak weights are other arguments of the same program: no new compile.
  other, _ = _sample('linear', 'euler', steps, w, 'autoguidance', key, strong,
                     weak_model_fn=_weak(0.5, -0.1))
  assert sampling._integrate_static_model._cache_size() == compiled + 1  # pylint: disable=protected-access
  assert float(jnp.max(jnp.abs(other - samples))) > 1e-3


def test_autoguidance_neutral_settings_are_the_conditional_model():
  """w = 1 runs the strong model alone (bit for bit the conditional sampler); a weak model equal
  to the strong one gives the conditional model at every w."""
  strong = gm.model(paths.get_path('linear'), 'velocity')
  conditional, info = _sample('linear', 'heun', 4, 1.0, 'cfg', model_fn=strong)
  at_one, one_info = _sample('linear', 'heun', 4, 1.0, 'autoguidance', model_fn=strong,
                             weak_model_fn=_weak(0.7, 0.2))
  np.testing.assert_array_equal(at_one, conditional)
  assert one_info['nfe'] == info['nfe'] == 7
  for w in (0.0, 3.0):
    same, same_info = _sample('linear', 'heun', 4, w, 'autoguidance', model_fn=strong,
                              weak_model_fn=_weak(1.0, 0.0))
    assert same_info['nfe'] == 14
    np.testing.assert_allclose(same, conditional, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="'autoguidance' needs weak_model_fn"):
    _sample('linear', 'heun', 4, 3.0, 'autoguidance', model_fn=strong)
