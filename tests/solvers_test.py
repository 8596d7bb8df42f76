"""Tests for guidedflow.solvers: DPM-Solver++(2M) and UniPC on the Gaussian-mixture toy (exact
fields)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from guidedflow import errors
from guidedflow import guidance
from guidedflow import paths
from guidedflow import sampling
from guidedflow import solvers
from guidedflow.tasks import registry
from tests import gaussian_mixture as gm

_MODELS = {}
_REFERENCES = {}
_energy_distance = jax.jit(gm.energy_distance)


def _oracle(path_name, parameterization):
  # One function object per (path, parameterization): model_fn is a static argument of the
  # sampler, so the same object reuses the compiled sampler.
  key = (path_name, parameterization)
  if key not in _MODELS:
    _MODELS[key] = gm.model(paths.get_path(path_name), parameterization)
  return _MODELS[key]


def _sample(labels, method, num_steps, path='linear', parameterization='velocity',
            guidance_scale=1.0, seed=0, **kwargs):
  return sampling.sample(_oracle(path, parameterization), jax.random.PRNGKey(seed), labels,
                         shape=(2,), path=path, parameterization=parameterization,
                         null_label=gm.NULL, guidance_scale=guidance_scale, method=method,
                         num_steps=num_steps, **kwargs)


# ---- (a) At equal NFE, closer to p(x|y) than Euler and Heun.

_ED_PER_CLASS = 2048
_ED_LABELS = jnp.repeat(jnp.arange(gm.NUM_CLASSES, dtype=jnp.int32), _ED_PER_CLASS)


def _max_class_energy_distance(samples):
  distances = []
  for c in range(gm.NUM_CLASSES):
    data = gm.sample_data(jax.random.PRNGKey(100 + c), jnp.full((_ED_PER_CLASS,), c))
    block = samples[c * _ED_PER_CLASS:(c + 1) * _ED_PER_CLASS]
    distances.append(float(_energy_distance(block, data)))
  return max(distances)


@pytest.mark.parametrize('path', ['linear', 'cosine'])
def test_multistep_solvers_beat_euler_and_heun_at_equal_nfe(path):
  # NFE 7: Euler, DPM-Solver++(2M) and UniPC 7 steps, Heun 4 (its last step is Euler: 2·4 − 1).
  # The same noise (seed) for all and the same data for the distance. Sampling noise puts the
  # floor near 0.001 at 2048 per class; measured in docs/solvers.md.
  distances = {}
  for method, num_steps in [('euler', 7), ('heun', 4), ('dpmpp_2m', 7), ('unipc', 7)]:
    samples, info = _sample(_ED_LABELS, method, num_steps, path=path)
    assert info['nfe'] == 7, method
    distances[method] = _max_class_energy_distance(samples)
  print(f'{path}: energy distance at NFE 7: {distances}')
  assert distances['dpmpp_2m'] < 0.75 * min(distances['euler'], distances['heun'])
  # UniPC (whose corrected last sample is not used: x_1 = D_{N−1}) beats Euler; against Heun
  # it is not clearly ahead at NFE 7 on 'linear' (0.0035 against 0.0037), so that is not asserted.
  assert distances['unipc'] < 0.75 * distances['euler']


# ---- (b) Order of convergence against a fine solution of the same (guided) ODE.

_ORDER_LABELS = jnp.array([0, 1] * 32, jnp.int32)
_ORDER_W = 2.0  # the guided field: CFG's combination is inside the data prediction


def _reference(path):
  """Heun with 2048 steps, velocity model, the same initial noise: the ODE's solution."""
  if path not in _REFERENCES:
    _REFERENCES[path], _ = _sample(_ORDER_LABELS, 'heun', 2048, path=path,
                                   guidance_scale=_ORDER_W)
  return _REFERENCES[path]


def _rms_error(samples, reference):
  return float(jnp.sqrt(jnp.mean(jnp.square(samples - reference))))


def test_convergence_orders_on_the_guided_mixture():
  steps = np.array([64, 128, 256, 512])
  reference = _reference('linear')
  slopes, errors_of = {}, {}
  for method in ('euler', 'dpmpp_2m', 'unipc'):
    errors_of[method] = errors_ = [_rms_error(_sample(_ORDER_LABELS, method, int(n), guidance_scale=_ORDER_W)[0],
                          reference) for n in steps]
    slopes[method] = -np.polyfit(np.log(steps), np.log(errors_), 1)[0]
    print(f'{method}: rms errors {errors_}, order {slopes[method]:.2f}')
  # 2M's global error is O(h² log 1/h) on this grid (see docs/solvers.md): a slope of 1.7–1.8.
  assert 1.6 <= slopes['dpmpp_2m'] <= 2.4, slopes
  assert 1.6 <= slopes['unipc'] <= 2.4, slopes
  assert 0.8 <= slopes['euler'] <= 1.2, slopes
  # UniC's correction (free: it reuses the next step's evaluation) must pay: measured ≈ 0.2–0.3×.
  assert np.all(np.array(errors_of['unipc']) < 0.5 * np.array(errors_of['dpmpp_2m']))


# ---- (c) Every path and parameterization, through the path's own conversions.

_PATH_CASES = ([('dpmpp_2m', path, parameterization) for path in paths.SCHEDULES
                for parameterization in paths.PARAMETERIZATIONS]
               + [('unipc', 'linear', 'velocity'), ('unipc', 'cosine', 'score'),
                  ('unipc', 'vp', 'noise')])


@pytest.mark.parametrize('method,path,parameterization', _PATH_CASES)
def test_every_path_and_parameterization_solves_the_same_ode(method, path, parameterization):
  # Score and noise models start at t_eps = 1e-3 (their velocity is singular at t = 0): an
  # O(1e-3) difference from the reference, which starts at 0. Measured rms at 64 steps: <= 0.003;
  # Euler at 64 steps: 0.012–0.016.
  samples, _ = _sample(_ORDER_LABELS, method, 64, path=path,
                       parameterization=parameterization, guidance_scale=_ORDER_W)
  error = _rms_error(samples, _reference(path))
  print(f'{method} {path}/{parameterization}: rms error {error:.4f}')
  assert error < 0.006


@pytest.mark.parametrize('path', paths.SCHEDULES)
def test_exact_for_a_point_mass(path):
  # With data a point mass at mu the data prediction is mu everywhere, x_t = alpha_t mu +
  # beta_t x_0 solves the ODE, and every step of the solver (its table) is exact: the first-
  # order steps and the 2M steps alike, on every path.
  path_object = paths.get_path(path)
  mu = jnp.array([1.5, -0.5], jnp.float32)

  def point_mass_velocity(x, t, y):
    del y
    t = t[:, None]
    return (path_object.wronskian(t) * mu + path_object.beta_dot(t) * x) / path_object.beta(t)

  labels = jnp.zeros((8,), jnp.int32)
  key = jax.random.PRNGKey(1)
  x0 = jax.random.normal(jax.random.split(key)[0], (8, 2))
  for method in solvers.MULTISTEP_METHODS:
    samples, info = sampling.sample(point_mass_velocity, key, labels, shape=(2,), path=path,
                                    parameterization='velocity', null_label=1,
                                    guidance_scale=1.0, method=method, num_steps=5,
                                    return_trajectory=6)
    times = np.asarray(info['trajectory_time'])[:, None, None]
    want = path_object.alpha(times) * mu + path_object.beta(times) * x0
    np.testing.assert_allclose(info['trajectory'], want, rtol=1e-5, atol=1e-5, err_msg=method)
    np.testing.assert_allclose(samples, jnp.broadcast_to(mu, samples.shape), atol=1e-5)


def test_coefficients_first_and_last_steps_are_first_order():
  grid = np.linspace(0.0, 1.0, 6).astype(np.float32)
  table = solvers.dpmpp_2m_coefficients(paths.get_path('linear'), grid)
  beta = 1.0 - grid
  np.testing.assert_allclose(table[:, 0], beta[1:] / beta[:-1], rtol=1e-6)
  np.testing.assert_allclose(table[-1], [0.0, 1.0, 0.0])  # x_1 = D(x_{N−1}, t_{N−1})
  assert table[0, 2] == table[1, 2] == 0.0  # no previous; then h_0 = ∞ (alpha_0 = 0)
  lam = np.log(grid[1:-1] / beta[1:-1])
  np.testing.assert_allclose(table[2:-1, 2], np.diff(lam)[1:] / (2 * np.diff(lam)[:-1]),
                             rtol=1e-5)
  assert np.all(solvers.dpmpp_2m_coefficients(paths.get_path('linear'), grid,
                                              first_step=3)[:4, 2] == 0.0)


def _unic_weights(lam_before, lam_previous, lam_now, order):
  """diffusers' UniC weights (`multistep_uni_c_bh_update`, predict_x0, bh2), transcribed:
  (rhos_c, rks) for the correction of the sample at lam_now."""
  h = lam_now - lam_previous
  rks = [(lam_before - lam_previous) / h] if order == 2 else []
  rks = np.array(rks + [1.0])
  hh = -h
  h_phi_1 = np.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1.0
  factorial_i = 1
  b_h = np.expm1(hh)
  rows, b = [], []
  for i in range(1, order + 1):
    rows.append(rks ** (i - 1))
    b.append(h_phi_k * factorial_i / b_h)
    factorial_i *= i + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial_i
  rhos = np.array([0.5]) if order == 1 else np.linalg.solve(np.stack(rows), np.array(b))
  return rhos, rks


@pytest.mark.parametrize('path', paths.SCHEDULES)
def test_unipc_corrector_weights_are_diffusers(path):
  path_object = paths.get_path(path)
  grid = np.linspace(1e-3, 1.0, 9).astype(np.float32)
  table = solvers.unipc_coefficients(path_object, grid)
  np.testing.assert_array_equal(table[:, :3], solvers.dpmpp_2m_coefficients(path_object, grid))
  inner = grid[:-1]  # beta > 0
  lam = (np.log(np.asarray(path_object.alpha(inner), np.float64))
         - np.log(np.asarray(path_object.beta(inner), np.float64)))
  assert table[0, 7] == 0.0 and np.all(table[1:, 7] == 1.0)
  np.testing.assert_allclose(table[1:, 3:5], table[:-1, :2])  # the previous step's (decay, gain)
  np.testing.assert_allclose(table[1, 5:7], [0.0, 0.5])  # after the first-order first step
  for i in range(2, len(grid) - 1):
    rhos, rks = _unic_weights(lam[i - 2], lam[i - 1], lam[i], order=2)
    # corrected = ... + gain (D_{i−1} + rho_1 (D_{i−2} − D_{i−1})/r_1 + rho_2 (D_i − D_{i−1}))
    np.testing.assert_allclose(table[i, 5:7], [-rhos[0] / rks[0], rhos[1]], rtol=1e-5, atol=1e-6)


# ---- (d) The plan's NFE is the rows the model runs on; guidance methods and intervals.

@pytest.mark.parametrize('method', solvers.MULTISTEP_METHODS)
def test_nfe_counts_the_rows_the_model_is_called_on(method):
  rows = []
  oracle = _oracle('linear', 'velocity')

  def counting(x, t, y):
    jax.debug.callback(lambda times: rows.append(len(times)), t)
    return oracle(x, t, y)

  labels = jnp.array([0, 1, 0], jnp.int32)
  counted = {}
  for name, w, interval in [('w=1', 1.0, None), ('w=2', 2.0, None),
                            ('w=2 interval', 2.0, (0.3, 0.6))]:
    rows.clear()
    samples, info = sampling.sample(counting, jax.random.PRNGKey(7), labels, shape=(2,),
                                    path='linear', parameterization='velocity',
                                    null_label=gm.NULL, guidance_scale=w, method=method,
                                    num_steps=7, guidance_interval=interval)
    jax.block_until_ready(samples)
    jax.effects_barrier()
    counted[name] = sum(rows) // 3
    assert info['nfe'] == counted[name], name
  # 7 steps, grid 0, 1/7, ..., 1, evaluated at t_0..t_6; with the interval only t_3, t_4 double.
  assert counted == {'w=1': 7, 'w=2': 14, 'w=2 interval': 9}


def test_guidance_methods_inside_the_solver():
  labels = jnp.array([0, 1, 1, 0], jnp.int32)
  common = dict(guidance_scale=3.0, guidance_interval=(0.2, 0.8))
  cfg, _ = _sample(labels, 'dpmpp_2m', 8, **common)
  neutral, _ = _sample(labels, 'dpmpp_2m', 8, guidance_method='apg', **common)
  np.testing.assert_allclose(neutral, cfg, rtol=1e-6, atol=1e-6)
  momentum, _ = _sample(labels, 'dpmpp_2m', 8, guidance_method=guidance.GuidanceMethod(
      'apg', apg_momentum=-0.5), **common)  # the momentum rides in the scan state beside D
  assert np.all(np.isfinite(momentum)) and not np.allclose(momentum, cfg, atol=1e-3)


# ---- (e) A bad method name is a one-line ConfigError.

def test_method_names_in_the_config():
  config = tiny.get_config()
  config.sampling.method = 'dpmpp_2m'
  registry.validate(config)
  config.sampling.method = 'dpmpp_3m'
  with pytest.raises(errors.ConfigError, match=r'sampling.method.*dpmpp_3m.*dpmpp_2m') as raised:
    registry.validate(config)
  assert '\n' not in str(raised.value)
