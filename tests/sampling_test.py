"""Tests for guidedflow.sampling: exactness on a Gaussian mixture, orders, counted NFE, retraces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import guidance
from guidedflow import paths
from guidedflow import sampling
from guidedflow import sampling_plan
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
    'reversed-time': (sampling_plan, 'time_grid', _broken_grid,
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


class CountingModel:
  """Wraps a model function; records every evaluation's times at run time and counts traces.

  `jax.debug.callback` fires each time the compiled sampler runs an evaluation (per scan step,
  only in the taken `lax.cond` branch), so the rows are the ones the model is actually run on.
  """

  def __init__(self, model_fn):
    self.model_fn = model_fn
    self.evaluations = []  # one float array of times (rows,) per evaluation
    self.traces = 0

  def __call__(self, x, t, y):
    self.traces += 1
    jax.debug.callback(lambda times: self.evaluations.append(np.asarray(times)), t)
    return self.model_fn(x, t, y)

  def rows(self):
    jax.effects_barrier()
    return sum(len(times) for times in self.evaluations)

  def reset(self):
    jax.effects_barrier()
    self.evaluations = []


def _counted_sample(model, labels, **kwargs):
  """(samples, info, model evaluations per sample counted from the rows the model ran on)."""
  model.reset()
  samples, info = sampling.sample(model, jax.random.PRNGKey(7), labels, shape=(2,),
                                  path='linear', parameterization='velocity',
                                  null_label=gm.NULL, **kwargs)
  jax.block_until_ready(samples)
  rows = model.rows()
  assert rows % labels.shape[0] == 0
  return samples, info, rows // labels.shape[0]


_NFE_LABELS = jnp.array([0, 1, 0], jnp.int32)
_INTERVAL = (0.3, 0.6)  # 7 steps: grid 0, 1/7, ..., 1; inside: t = 3/7, 4/7 only


# Model evaluations per sample for 7 steps, counted by hand: Euler, Euler–Maruyama,
# DPM-Solver++(2M) and UniPC evaluate at t_0..t_6, Heun at t_0..t_6 and t_1..t_6 (13). With the interval only t_3, t_4 double.
@pytest.mark.parametrize('method,conditional,cfg,interval', [
    ('euler', 7, 14, 7 + 2),
    ('heun', 13, 26, 13 + 4),
    ('euler_maruyama', 7, 14, 7 + 2),
    ('dpmpp_2m', 7, 14, 7 + 2),
    ('unipc', 7, 14, 7 + 2),
])
def test_nfe_counts_the_rows_the_model_is_called_on(method, conditional, cfg, interval):
  model = CountingModel(_oracle('linear', 'velocity'))
  common = dict(method=method, num_steps=7, sigma=0.5)
  counted = {}
  for name, w, guidance_interval in [
      ('w=1', 1.0, None), ('w=1 array', np.ones(3, np.float32), None),
      ('w=1 jax array', jnp.ones((), jnp.float32), None), ('w=2', 2.0, None),
      ('w=2 per sample', np.array([2.0, 1.0, 3.0], np.float32), None),
      ('w=2 interval', 2.0, _INTERVAL), ('w=1 interval', 1.0, _INTERVAL)]:
    _, info, counted[name] = _counted_sample(model, _NFE_LABELS, guidance_scale=w,
                                             guidance_interval=guidance_interval, **common)
    assert info['nfe'] == counted[name], name
    times = np.concatenate(model.evaluations)
    assert times.max() < 1.0  # never evaluated at t = 1
    doubled = np.concatenate([t for t in model.evaluations if len(t) == 2 * 3] or [[]])
    if guidance_interval is not None:  # the doubled batch runs only inside the interval
      assert np.all((doubled >= _INTERVAL[0]) & (doubled <= _INTERVAL[1])), name
  assert counted == {'w=1': conditional, 'w=1 array': conditional, 'w=1 jax array': conditional,
                     'w=2': cfg, 'w=2 per sample': cfg, 'w=2 interval': interval,
                     'w=1 interval': conditional}


def test_traced_guidance_scale_runs_the_doubled_batch_and_counts_it():
  model = CountingModel(_oracle('linear', 'velocity'))

  @jax.jit
  def run(guidance_scale):
    samples, info = sampling.sample(
        model, jax.random.PRNGKey(7), _NFE_LABELS, shape=(2,), path='linear',
        parameterization='velocity', null_label=gm.NULL, guidance_scale=guidance_scale,
        method='heun', num_steps=7)
    return samples, info['nfe']

  samples, nfe = run(jnp.float32(1.0))  # traced: the program cannot know w = 1
  jax.block_until_ready(samples)
  assert int(nfe) == model.rows() // 3 == 26
  reference, info, counted = _counted_sample(model, _NFE_LABELS, guidance_scale=1.0,
                                             method='heun', num_steps=7)
  assert info['nfe'] == counted == 13
  np.testing.assert_allclose(samples, reference, rtol=1e-5, atol=1e-5)


def _doubled_batch_model(model_fn, guidance_scale, interval):
  """The CFG sampler without the interval split: every evaluation doubles the batch (w = 1
  outside the interval through `guidance.effective_scale`), run as a conditional 'model'."""

  def model(x, t, y):
    scale = guidance.effective_scale(guidance_scale, t, interval)
    return guidance.guided_prediction(model_fn, x, t, y, null_label=gm.NULL,
                                      guidance_scale=scale)

  return model


@pytest.mark.parametrize('method,parameterization,interval,num_steps', [
    ('euler', 'velocity', (0.3, 0.6), 7),
    ('heun', 'score', (0.3, 0.6), 7),      # steps straddling both ends, a run of cond-only steps
    ('heun', 'velocity', (0.0, 0.7), 6),   # guided first, the lone last step conditional
    ('heun', 'noise', (0.5, 1.0), 6),      # the last step guided, joined to the guided segment
    ('euler_maruyama', 'noise', (0.2, 0.7), 9),
    ('dpmpp_2m', 'score', (0.3, 0.6), 7),  # the previous data prediction crosses segments
    ('unipc', 'velocity', (0.2, 0.7), 8),
])
def test_guidance_interval_equals_the_doubled_batch_sampler(method, parameterization, interval,
                                                            num_steps):
  oracle = CountingModel(_oracle('linear', parameterization))
  labels = jnp.array([0, 1, 1, 0, 2], jnp.int32)
  common = dict(shape=(2,), path='linear', parameterization=parameterization,
                null_label=gm.NULL, method=method, num_steps=num_steps,
                sigma_schedule='decreasing', sigma=1.0, return_trajectory=4)
  oracle.reset()
  split, info = sampling.sample(oracle, jax.random.PRNGKey(5), labels, guidance_scale=3.0,
                                guidance_interval=interval, **common)
  counted = oracle.rows() // 5
  reference_model = CountingModel(_doubled_batch_model(oracle.model_fn, 3.0, interval))
  doubled, reference_info = sampling.sample(reference_model, jax.random.PRNGKey(5), labels,
                                            guidance_scale=1.0, **common)
  reference_nfe = 2 * reference_model.rows() // 5  # each evaluation runs the model on 2B rows
  np.testing.assert_allclose(split, doubled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(info['trajectory'], reference_info['trajectory'], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(info['trajectory'][-1], split)
  plain, _ = sampling.sample(oracle.model_fn, jax.random.PRNGKey(5), labels, guidance_scale=1.0,
                             **common)
  assert not np.allclose(split, plain, atol=1e-3)  # the guidance inside the interval acts
  assert info['nfe'] == counted < reference_nfe
  assert reference_nfe == 2 * reference_info['nfe']


def test_model_traces_once_per_compile_across_scales_keys_labels_and_weights():
  model_traces = []

  def scaled_velocity(scale, x, t, y):
    model_traces.append(x.shape)  # at trace time only
    return scale * _oracle('linear', 'velocity')(x, t, y)

  def run(w, seed, labels, scale, **kwargs):
    model = jax.tree_util.Partial(scaled_velocity, jnp.float32(scale))  # traced weights
    samples, _ = sampling.sample(
        model, jax.random.PRNGKey(seed), jnp.asarray(labels, jnp.int32), shape=(2,),
        path='linear', parameterization='velocity', null_label=gm.NULL, guidance_scale=w,
        method='euler_maruyama', num_steps=6, sigma=0.7, **kwargs)
    return np.asarray(samples)

  first = run(0.5, 1, [0, 1, 0], 1.0)
  assert model_traces == [(6, 2)]  # one scan: the model traced once, on the doubled batch
  later = [run(2.0, 2, [1, 1, 0], 1.0), run(3.0, 3, [0, 0, 1], 0.5), run(0.0, 1, [0, 1, 0], 2.0),
           run(np.float32(4.0), 1, [0, 1, 0], 1.0)]
  assert model_traces == [(6, 2)]  # new w != 1, keys, labels and weights: no recompile
  assert not np.allclose(later[1], run(3.0, 3, [0, 0, 1], 1.0))  # the new weight was used
  assert not np.allclose(first, later[3])
  conditional = run(1.0, 1, [0, 1, 0], 1.0)
  assert model_traces == [(6, 2), (3, 2)]  # w = 1: one more compile, on the single batch
  run(1.0, 4, [1, 0, 1], 2.0)
  assert len(model_traces) == 2
  run(2.0, 1, [0, 1, 0], 1.0, guidance_interval=(0.3, 0.6))
  # Grid 0, 1/6, ..., 5/6 evaluated: cond-only, guided (t = 2/6, 3/6), cond-only: three scans.
  assert model_traces[2:] == [(3, 2), (6, 2), (3, 2)]
  run(5.0, 2, [0, 0, 0], 3.0, guidance_interval=(0.3, 0.6))
  assert len(model_traces) == 5
  assert not np.allclose(first, conditional)


def test_no_retrace_inside_an_outer_jit_model_traced_once():
  model_traces = []

  def counting_velocity(x, t, y):
    model_traces.append(x.shape)
    return _oracle('linear', 'velocity')(x, t, y)

  def run(key, labels, guidance_scale, sigma):
    samples, info = sampling.sample(
        counting_velocity, key, labels, shape=(2,), path='linear',
        parameterization='velocity', null_label=gm.NULL, guidance_scale=guidance_scale,
        method='euler_maruyama', num_steps=8, sigma=sigma)
    return samples, info['nfe']

  labels = jnp.array([0, 1, 2, 1], jnp.int32)
  outputs = []
  for w in (0.0, 1.0, 2.5):
    # A new jit per w: its cache cannot hide a retrace. Inside one outer trace the sampler is
    # inlined: one scan, the model traced once for 8 steps (a Python loop over the steps would
    # trace it 8 times), with w a tracer (no branch on its value at trace time).
    model_traces.clear()
    fresh = lambda *args: run(*args)  # pylint: disable=unnecessary-lambda  (jax caches traces per function)
    jaxpr = jax.make_jaxpr(fresh)(jax.random.PRNGKey(0), labels, jnp.float32(w), jnp.float32(0.5))
    assert model_traces == [(8, 2)]
    assert str(jaxpr).count(' scan[') == 1
    outputs.append(jax.jit(fresh)(jax.random.PRNGKey(0), labels, jnp.float32(w), jnp.float32(0.5)))
  assert [int(nfe) for _, nfe in outputs] == [16, 16, 16]
  assert not np.allclose(outputs[0][0], outputs[2][0])


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
      ('heun', 'velocity', 'constant'), ('dpmpp_2m', 'noise', 'constant'),
      ('dpmpp_2m', 'velocity', 'constant'), ('unipc', 'score', 'constant')]:
    samples, info = sampling.sample(
        poisoned(parameterization != 'velocity'), jax.random.PRNGKey(2), labels, shape=(3,),
        path='vp', parameterization=parameterization, null_label=1, guidance_scale=1.0,
        method=method, num_steps=5, sigma_schedule=schedule, sigma=0.5)
    assert np.all(np.isfinite(samples)), (method, parameterization)
    grid = np.asarray(info['time_grid'])
    assert grid[-1] == 1.0
    assert grid[0] == (0.0 if parameterization == 'velocity' else np.float32(1e-3))


def test_last_euler_maruyama_step_is_deterministic():
  model = _oracle('linear', 'velocity')
  common = dict(shape=(2,), path='linear', parameterization='velocity', null_label=gm.NULL,
                num_steps=1)
  labels = jnp.array([0, 1], jnp.int32)
  euler, _ = sampling.sample(model, jax.random.PRNGKey(3), labels, method='euler',
                             guidance_scale=1.0, **common)
  em, _ = sampling.sample(model, jax.random.PRNGKey(3), labels, method='euler_maruyama',
                          sigma=5.0, guidance_scale=1.0, **common)
  np.testing.assert_allclose(em, euler, rtol=1e-6, atol=1e-6)  # f32 rounding of x + v·dt


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


@pytest.mark.parametrize('method', ['euler', 'heun', 'euler_maruyama', 'dpmpp_2m', 'unipc'])
def test_a_structured_condition_with_its_own_null_samples_like_labels(method):
  """A text model's condition is a pytree whose ∅ the caller gives (`null_labels`): the mixture's
  oracle behind a dict condition ({'label', 'null'}) gives the samples of the int labels; a
  'negative prompt' (another class in ∅'s place) gives (1 − w) u(x|neg) + w u(x|y)."""
  oracle = _oracle('linear', 'velocity')

  def by_dict(x, t, y):
    return oracle(x, t, jnp.where(y['null'] > 0, gm.NULL, y['label']))

  kwargs = dict(shape=(2,), path='linear', parameterization='velocity', null_label=gm.NULL,
                guidance_scale=2.5, method=method, num_steps=6, sigma=0.3)
  labels = jnp.asarray(LABELS)
  key = jax.random.PRNGKey(3)
  want, _ = sampling.sample(oracle, key, labels, **kwargs)
  cond = {'label': labels, 'null': jnp.zeros_like(labels)}
  got, info = sampling.sample(by_dict, key, cond, null_labels=dict(cond, null=jnp.ones_like(labels)),
                              **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert info['nfe'] == _sample_mixture(method=method, num_steps=6, guidance_scale=2.5,
                                        sigma=0.3)[1]['nfe']
  negative = (labels + 1) % gm.NULL

  def negative_in_null(x, t, y):  # ∅ means "the negative class" here (CFG rows are paired)
    assert y.shape[0] == 2 * negative.shape[0]
    pairs = y.reshape(-1, 2)
    return oracle(x, t, jnp.stack([pairs[:, 0], (pairs[:, 0] + 1) % gm.NULL], 1).reshape(-1))

  want_negative, _ = sampling.sample(negative_in_null, key, labels, **kwargs)
  got_negative, _ = sampling.sample(by_dict, key, cond, null_labels={
      'label': negative, 'null': jnp.zeros_like(labels)}, **kwargs)
  np.testing.assert_allclose(got_negative, want_negative, rtol=1e-6, atol=1e-6)
  assert not np.allclose(got_negative, got, atol=1e-2)
