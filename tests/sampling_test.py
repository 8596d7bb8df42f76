"""Tests for guidedflow.sampling: exactness on a Gaussian mixture, convergence orders, recompiles."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import guidance
from guidedflow import paths
from guidedflow import sampling
from tests import gaussian_mixture as gm

PER_CLASS = 4096
# Max over classes of the energy distance to fresh data. With 4096 points per class, exact
# samplers land at <= 0.005 (sampling noise) and the broken variants below at >= 0.02.
ED_BOUND = 0.01
LABELS = jnp.repeat(jnp.arange(gm.NUM_CLASSES, dtype=jnp.int32), PER_CLASS)
_energy_distance = jax.jit(gm.energy_distance)
_MODELS = {}


def _oracle(path_name, parameterization):
  # One function object per (path, parameterization): model_fn is a static argument of the
  # sampler, so sharing it shares the compiled sampler across tests.
  key = (path_name, parameterization)
  if key not in _MODELS:
    _MODELS[key] = gm.model(paths.get_path(path_name), parameterization)
  return _MODELS[key]


def _sample_mixture(path='linear', parameterization='velocity', guidance_scale=1.0, seed=0,
                    **kwargs):
  samples, info = sampling.sample(
      _oracle(path, parameterization), jax.random.PRNGKey(seed), LABELS, shape=(2,), path=path,
      parameterization=parameterization, null_label=gm.NULL, guidance_scale=guidance_scale,
      **kwargs)
  return samples, info


def _max_class_energy_distance(samples, reference_label=None, seed=100):
  """Energy distance per class block against fresh data from p(x|y) (or p(x) if NULL)."""
  distances = []
  for c in range(gm.NUM_CLASSES):
    label = c if reference_label is None else reference_label
    data = gm.sample_data(jax.random.PRNGKey(seed + c), jnp.full((PER_CLASS,), label))
    distances.append(float(_energy_distance(samples[c * PER_CLASS:(c + 1) * PER_CLASS], data)))
  return max(distances)


EXACT_CASES = {
    'euler-velocity-linear': dict(method='euler', num_steps=100),
    'heun-score-cosine': dict(method='heun', num_steps=25, path='cosine',
                              parameterization='score'),
    'heun-noise-vp': dict(method='heun', num_steps=40, path='vp', parameterization='noise'),
    'em-constant-velocity-linear': dict(method='euler_maruyama', num_steps=200, sigma=2.0),
    'em-path-noise-linear': dict(method='euler_maruyama', num_steps=200, sigma_schedule='path',
                                 parameterization='noise'),
    'em-decreasing-score-cosine': dict(method='euler_maruyama', num_steps=200, sigma=1.5,
                                       sigma_schedule='decreasing', path='cosine',
                                       parameterization='score'),
}


@pytest.mark.parametrize('case', list(EXACT_CASES))
def test_exact_field_reproduces_class_conditionals(case):
  samples, info = _sample_mixture(**EXACT_CASES[case])
  assert samples.shape == (LABELS.shape[0], 2) and samples.dtype == jnp.float32
  distance = _max_class_energy_distance(samples)
  print(f'{case}: energy distance {distance:.4f}, nfe {info["nfe"]}')
  assert distance < ED_BOUND


def test_unconditional_guidance_reproduces_the_marginal():
  samples, info = _sample_mixture(method='euler', num_steps=100, guidance_scale=0.0)
  assert info['nfe'] == 200  # doubled CFG batch counts twice
  assert _max_class_energy_distance(samples, reference_label=gm.NULL) < ED_BOUND


# Each broken variant patches one piece the sampler looks up at trace time; a fresh model
# function object forces a new trace, so the compiled good sampler is not reused.
def _broken_drift(velocity, score, diffusion):
  return velocity + jnp.square(diffusion) * score  # missing the 1/2 of sigma²/2


def _broken_grid(num_steps, t_start):
  return jnp.linspace(1.0, t_start, num_steps + 1, dtype=jnp.float32)  # data → noise


_good_cfg_combine = guidance.cfg_combine


def _broken_cfg(cond, uncond, guidance_scale):
  return _good_cfg_combine(uncond, cond, guidance_scale)  # (1 − w) cond + w uncond


BROKEN_CASES = {
    'missing-half': (sampling, 'sde_drift', _broken_drift,
                     dict(method='euler_maruyama', num_steps=200, sigma=2.0), None),
    'reversed-time': (sampling, 'time_grid', _broken_grid,
                      dict(method='euler', num_steps=100), None),
    'swapped-cfg-weights': (guidance, 'cfg_combine', _broken_cfg,
                            dict(method='euler', num_steps=100, guidance_scale=0.0), gm.NULL),
}


@pytest.mark.parametrize('case', list(BROKEN_CASES))
def test_broken_variants_fail_the_bound(case, monkeypatch):
  module, name, broken, kwargs, reference_label = BROKEN_CASES[case]
  monkeypatch.setattr(module, name, broken)
  model = gm.model(paths.get_path('linear'), 'velocity')  # fresh object: retrace with the patch
  kwargs = dict(kwargs)
  guidance_scale = kwargs.pop('guidance_scale', 1.0)
  samples, _ = sampling.sample(model, jax.random.PRNGKey(0), LABELS, shape=(2,), path='linear',
                               parameterization='velocity', null_label=gm.NULL,
                               guidance_scale=guidance_scale, **kwargs)
  distance = _max_class_energy_distance(samples, reference_label)
  print(f'{case}: energy distance {distance:.4f}')
  assert not distance < ED_BOUND  # NaN (a blown-up sampler) fails the bound too


# -- convergence orders on a 1-D Gaussian whose flow map is known exactly

_MU, _S = 1.5, 0.5


def _gaussian_velocity(x, t, y):
  # Linear path, data N(mu, s²): x_t ~ N(t mu, sd_t²), sd_t² = t² s² + (1 − t)², and the flow is
  # x_t = t mu + sd_t/sd_0 (x_0 − 0), so u = mu + (d sd_t/dt)/sd_t (x − t mu); x_1 = mu + s x_0.
  del y
  t = t[:, None]
  var = t**2 * _S**2 + (1 - t) ** 2
  return _MU + (t * _S**2 - (1 - t)) / var * (x - t * _MU)


@pytest.mark.parametrize('method,order', [('euler', 1.0), ('heun', 2.0)])
def test_convergence_order(method, order):
  key = jax.random.PRNGKey(0)
  labels = jnp.zeros((64,), jnp.int32)
  x0 = jax.random.normal(jax.random.split(key)[0], (64, 1))  # the sampler's initial noise
  exact = _MU + _S * x0
  steps = np.array([4, 8, 16, 32, 64])
  errors = []
  for num_steps in steps:
    samples, info = sampling.sample(
        _gaussian_velocity, key, labels, shape=(1,), path='linear', parameterization='velocity',
        null_label=1, guidance_scale=1.0, method=method, num_steps=int(num_steps))
    errors.append(float(jnp.max(jnp.abs(samples - exact))))
  slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
  print(f'{method}: errors {errors}, log-log slope {slope:.3f}')
  assert abs(slope + order) < 0.2, slope


# -- compilation and bookkeeping

def test_no_retrace_across_guidance_scales_inside_an_outer_jit():
  chex.clear_trace_counter()
  model = _oracle('linear', 'velocity')

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key, labels, guidance_scale, sigma):
    samples, info = sampling.sample(
        model, key, labels, shape=(2,), path='linear', parameterization='velocity',
        null_label=gm.NULL, guidance_scale=guidance_scale, method='euler_maruyama',
        num_steps=8, sigma=sigma)
    return samples, info['nfe']

  labels = jnp.array([0, 1, 2, 1], jnp.int32)
  outputs = [run(jax.random.PRNGKey(0), labels, jnp.float32(w), jnp.float32(0.5))
             for w in (0.0, 1.0, 2.5)]
  assert int(outputs[0][1]) == 16
  assert not np.allclose(outputs[0][0], outputs[2][0])


def test_no_retrace_across_guidance_scales_sigma_or_weights():
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def scaled_velocity(scale, x, t, y):
    return scale * _oracle('linear', 'velocity')(x, t, y)

  labels = jnp.array([0, 1, 0], jnp.int32)
  results = []
  for w, sigma, scale in [(0.5, 0.1, 1.0), (2.0, 0.7, 1.0), (3.0, 0.7, 0.5)]:
    model = jax.tree_util.Partial(scaled_velocity, jnp.float32(scale))  # traced: no recompile
    samples, _ = sampling.sample(
        model, jax.random.PRNGKey(1), labels, shape=(2,), path='linear',
        parameterization='velocity', null_label=gm.NULL, guidance_scale=w,
        method='euler_maruyama', num_steps=6, sigma=sigma)
    results.append(samples)
  assert not np.allclose(results[1], results[2])  # the new weight was used


def test_model_is_never_evaluated_at_a_singular_end():
  # Velocity from a score/noise prediction blows up at t = 0 (alpha = 0) and score/noise
  # conversions at t = 1 (beta = 0): a model returning NaN at a singular end for its
  # parameterization must not poison the samples.
  def poisoned(singular_at_zero):
    def model_fn(x, t, y):
      bad = (t >= 1.0) | ((t <= 0.0) & singular_at_zero)
      return jnp.where(bad[:, None], jnp.nan, -x)
    return model_fn

  labels = jnp.zeros((4,), jnp.int32)
  for method, parameterization, schedule in [
      ('heun', 'score', 'constant'), ('heun', 'noise', 'constant'),
      ('euler_maruyama', 'noise', 'path'), ('euler_maruyama', 'velocity', 'constant'),
      ('heun', 'velocity', 'constant')]:
    samples, info = sampling.sample(
        poisoned(parameterization != 'velocity'), jax.random.PRNGKey(2), labels, shape=(3,),
        path='vp', parameterization=parameterization, null_label=1, guidance_scale=1.0,
        method=method, num_steps=5, sigma_schedule=schedule, sigma=0.5)
    assert np.all(np.isfinite(samples)), (method, parameterization)
    grid = np.asarray(info['time_grid'])
    assert grid[-1] == 1.0
    assert grid[0] == (0.0 if parameterization == 'velocity' else np.float32(1e-3))


def test_last_euler_maruyama_step_is_deterministic_and_nfe_counts():
  model = _oracle('linear', 'velocity')
  common = dict(shape=(2,), path='linear', parameterization='velocity', null_label=gm.NULL,
                num_steps=1)
  labels = jnp.array([0, 1], jnp.int32)
  euler, info_euler = sampling.sample(model, jax.random.PRNGKey(3), labels, method='euler',
                                      guidance_scale=1.0, **common)
  em, _ = sampling.sample(model, jax.random.PRNGKey(3), labels, method='euler_maruyama',
                          sigma=5.0, guidance_scale=1.0, **common)
  np.testing.assert_allclose(em, euler, rtol=1e-6)
  assert info_euler['nfe'] == 1
  # A traced w = 1 runs the doubled batch: same samples, twice the evaluations.
  doubled, info = sampling.sample(model, jax.random.PRNGKey(3), labels, method='euler',
                                  guidance_scale=jnp.float32(1.0), **common)
  np.testing.assert_allclose(doubled, euler, rtol=1e-6)
  assert info['nfe'] == 2
  _, info_heun = sampling.sample(model, jax.random.PRNGKey(3), labels, method='heun',
                                 guidance_scale=2.0, **dict(common, num_steps=4))
  assert info_heun['nfe'] == 2 * (2 * 4 - 1)


def test_trajectory_and_guidance_interval():
  labels = jnp.array([0, 1], jnp.int32)
  common = dict(shape=(2,), path='linear', parameterization='velocity', null_label=gm.NULL,
                method='euler', num_steps=16)
  model = _oracle('linear', 'velocity')
  samples, info = sampling.sample(model, jax.random.PRNGKey(4), labels, guidance_scale=3.0,
                                  return_trajectory=True, **common)
  assert info['trajectory'].shape == (9, 2, 2)
  np.testing.assert_allclose(info['trajectory_time'], np.linspace(0, 1, 9), atol=1e-6)
  np.testing.assert_array_equal(info['trajectory'][-1], samples)
  # An empty-ish interval means w = 1 everywhere: identical to conditional sampling.
  conditional, _ = sampling.sample(model, jax.random.PRNGKey(4), labels, guidance_scale=1.0,
                                   **common)
  outside, _ = sampling.sample(model, jax.random.PRNGKey(4), labels, guidance_scale=3.0,
                               guidance_interval=(0.99, 1.0), **common)
  np.testing.assert_allclose(outside, conditional, rtol=1e-5, atol=1e-5)
  assert not np.allclose(samples, conditional, atol=1e-3)


@pytest.mark.parametrize('override,argument', [
    (dict(method='rk4'), 'method'),
    (dict(parameterization='x0'), 'parameterization'),
    (dict(sigma_schedule='cosine'), 'sigma_schedule'),
    (dict(path='ddpm'), 'path'),
    (dict(num_steps=0), 'num_steps'),
    (dict(guidance_scale=float('nan')), 'guidance_scale'),
    (dict(guidance_scale=float('inf')), 'guidance_scale'),
    (dict(labels=jnp.array([0, 3])), 'labels'),
    (dict(labels=jnp.array([-1, 0])), 'labels'),
    (dict(sigma=-1.0), 'sigma'),
    (dict(guidance_interval=(0.8, 0.2)), 'guidance_interval'),
])
def test_bad_arguments_raise(override, argument):
  kwargs = dict(labels=jnp.array([0, 1]), shape=(2,), path='linear',
                parameterization='velocity', null_label=gm.NULL, guidance_scale=1.0,
                method='euler', num_steps=2)
  kwargs.update(override)
  labels = kwargs.pop('labels')
  with pytest.raises(ValueError, match=argument) as error:
    sampling.sample(_oracle('linear', 'velocity'), jax.random.PRNGKey(0), labels, **kwargs)
  if argument in ('method', 'parameterization', 'sigma_schedule', 'path'):
    assert 'must be one of' in str(error.value)
