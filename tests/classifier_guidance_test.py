"""Classifier guidance in the sampler: gradients, exactness on the Gaussian-mixture oracle, the
broken variants it must catch, velocity vs score space, w_c = 0 and the evaluation counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import guidance
from guidedflow import paths
from guidedflow import sampling
from tests import gaussian_mixture as gm
from tests import sampling_test as st

_PATH = paths.get_path('linear')
_UNCOND = jnp.full_like(st.LABELS, gm.NULL)  # the generator sees ∅ only


def oracle_logits(path):
  """The exact noise-aware classifier: logits_k(x, t) = log p_t(x|k) + log p(k)."""

  def logits(x, t):
    per_class = [gm.log_prob(path, x, t, jnp.full(x.shape[:1], k, jnp.int32))
                 for k in range(gm.NUM_CLASSES)]
    return jnp.stack(per_class, axis=-1) + jnp.log(gm.CLASS_PRIOR)[None]

  return logits


_ORACLE_LOGITS = oracle_logits(_PATH)
_UNCOND_MODELS = {}


def _uncond_model(parameterization):
  # One object per parameterization so tests share the compiled sampler; labels are all ∅.
  if parameterization not in _UNCOND_MODELS:
    _UNCOND_MODELS[parameterization] = gm.model(_PATH, parameterization)
  return _UNCOND_MODELS[parameterization]


def _cg_sample(model_fn, classifier_fn, classifier_scale=1.0, parameterization='velocity',
               **kwargs):
  return sampling.sample(
      model_fn, jax.random.PRNGKey(0), _UNCOND, shape=(2,), path=_PATH,
      parameterization=parameterization, null_label=gm.NULL, guidance_scale=1.0,
      classifier_fn=classifier_fn, classifier_scale=classifier_scale,
      classifier_labels=st.LABELS, **kwargs)


def test_grad_log_prob_matches_central_finite_differences():
  x, t, y = (jnp.array([[0.3, -1.2], [1.5, 0.7], [-2.0, 0.4]]), jnp.array([0.2, 0.5, 0.9]),
             jnp.array([0, 1, 1]))
  grad = np.asarray(guidance.grad_log_prob_from_logits(_ORACLE_LOGITS)(x, t, y))

  def log_prob(x):
    return np.asarray(jnp.take_along_axis(jax.nn.log_softmax(_ORACLE_LOGITS(x, t)),
                                          y[:, None], axis=-1)[:, 0], np.float64)

  h = 2e-3  # truncation O(h²·|f'''|) and float32 rounding O(1e-7·|f|/h) both < 1e-3 here
  for d in range(2):
    step = jnp.zeros_like(x).at[:, d].set(h)
    central = (log_prob(x + step) - log_prob(x - step)) / (2 * h)
    np.testing.assert_allclose(grad[:, d], central, rtol=3e-3, atol=3e-3)
  assert np.abs(grad).max() > 0.1  # not vacuous
  # The exact classifier's gradient is the lecture's ∇log p_t(x|y) − ∇log p_t(x).
  _, s_cond = gm.fields(_PATH, x, t, y)
  _, s_uncond = gm.fields(_PATH, x, t, jnp.full_like(y, gm.NULL))
  np.testing.assert_allclose(grad, s_cond - s_uncond, rtol=1e-4, atol=1e-4)


CG_CASES = {
    'euler-velocity': dict(method='euler', num_steps=100),
    'heun-score': dict(method='heun', num_steps=40, parameterization='score'),
    'em-constant-noise': dict(method='euler_maruyama', num_steps=200, sigma=1.5,
                              parameterization='noise'),
    'em-constant-velocity': dict(method='euler_maruyama', num_steps=200, sigma=0.5),
}


@pytest.mark.parametrize('case', list(CG_CASES))
def test_exact_classifier_guidance_reproduces_the_class_conditionals(case):
  kwargs = dict(CG_CASES[case])
  parameterization = kwargs.pop('parameterization', 'velocity')
  samples, info = _cg_sample(_uncond_model(parameterization), _ORACLE_LOGITS,
                             parameterization=parameterization, **kwargs)
  distance = st._max_class_energy_distance(samples)  # pylint: disable=protected-access
  print(f'{case}: energy distance {distance:.4f}, nfe {info["nfe"]}, classifier '
        f'{info["classifier_nfe"]}')
  assert distance < st.ED_BOUND
  assert info['nfe'] == info['classifier_nfe']


def _flipped_grad(logits_fn):
  good = _GOOD_GRAD(logits_fn)
  return lambda x, t, y: -good(x, t, y)


def _grad_of_prob(logits_fn):
  def grad_fn(x, t, y):
    prob = lambda x: jnp.sum(jnp.take_along_axis(jax.nn.softmax(logits_fn(x, t)), y[:, None], -1))
    return jax.grad(prob)(x)
  return grad_fn


_GOOD_GRAD = guidance.grad_log_prob_from_logits


class _NoB(paths.LinearPath):
  """The linear path with b_t = 1 in `velocity_coefficients`: CG without its b_t (the
  conversions of the velocity model and the constant σ do not use b_t)."""

  def velocity_coefficients(self, t):
    a, b = super().velocity_coefficients(t)
    return a, jnp.ones_like(b)


@pytest.mark.parametrize('broken', ['missing-b_t', 'flipped-sign', 'grad-of-p'])
@pytest.mark.parametrize('case', ['euler', 'euler_maruyama'])
def test_broken_classifier_guidance_fails_the_bound(broken, case, monkeypatch):
  # Velocity models: b_t enters only through the classifier term.
  parameterization = 'velocity'
  kwargs = (dict(method='euler', num_steps=100) if case == 'euler' else
            dict(method='euler_maruyama', num_steps=200, sigma=0.5))
  if broken == 'flipped-sign':
    monkeypatch.setattr(guidance, 'grad_log_prob_from_logits', _flipped_grad)
  elif broken == 'grad-of-p':
    monkeypatch.setattr(guidance, 'grad_log_prob_from_logits', _grad_of_prob)
  model = gm.model(_PATH, parameterization)  # fresh objects: a new trace sees the patch
  logits = oracle_logits(_PATH)
  path = _NoB(name='linear-without-b') if broken == 'missing-b_t' else _PATH
  samples, _ = sampling.sample(
      model, jax.random.PRNGKey(0), _UNCOND, shape=(2,), path=path,
      parameterization=parameterization, null_label=gm.NULL, guidance_scale=1.0,
      classifier_fn=logits, classifier_scale=1.0, classifier_labels=st.LABELS, **kwargs)
  distance = st._max_class_energy_distance(samples)  # pylint: disable=protected-access
  print(f'{broken} {case}: energy distance {distance:.4f}')
  assert not distance < st.ED_BOUND


_SMALL_LABELS = jnp.array([0, 1, 1, 0, 1], jnp.int32)


def _small(model_fn, labels, **kwargs):
  return sampling.sample(model_fn, jax.random.PRNGKey(3), labels, shape=(2,), path=_PATH,
                         null_label=gm.NULL, num_steps=12, **kwargs)


@pytest.mark.parametrize('method', ['heun', 'euler_maruyama'])
def test_zero_classifier_scale_gives_the_unguided_samples_exactly(method):
  common = dict(parameterization='score', method=method, sigma=0.7, guidance_scale=1.0)
  plain, plain_info = _small(_uncond_model('score'), _SMALL_LABELS, **common)
  zero, info = _small(_uncond_model('score'), _SMALL_LABELS, classifier_fn=_ORACLE_LOGITS,
                      classifier_scale=0.0, **common)
  np.testing.assert_array_equal(zero, plain)
  assert info['classifier_nfe'] == 0 and info['nfe'] == plain_info['nfe']

  @jax.jit
  def traced(scale):  # w_c traced: the classifier runs, its term is 0 · ∇
    return _small(_uncond_model('score'), _SMALL_LABELS, classifier_fn=_ORACLE_LOGITS,
                  classifier_scale=scale, **common)[0]

  # Another program (the classifier's term is computed, then scaled by 0): the same samples up
  # to f32 rounding, which XLA:CPU's fusion emitters may contract differently (1.4e-6 measured
  # with the loop emitters that tests/conftest.py selects; exactly equal with the default ones).
  np.testing.assert_allclose(traced(jnp.float32(0.0)), plain, rtol=0, atol=1e-5)
  assert not np.allclose(traced(jnp.float32(1.0)), plain, atol=1e-2)


def test_cfg_plus_classifier_adds_the_scales_for_exact_fields():
  # Exact fields: u(x|y) − u(x|∅) = b_t ∇log p_t(y|x), so CFG at w plus CG at w_c is CFG at
  # w + w_c (the lecture's derivation of CFG from CG).
  common = dict(parameterization='score', method='heun')
  both, info = _small(_uncond_model('score'), _SMALL_LABELS, guidance_scale=1.5,
                      classifier_fn=_ORACLE_LOGITS, classifier_scale=0.5, **common)
  cfg, cfg_info = _small(_uncond_model('score'), _SMALL_LABELS, guidance_scale=2.0, **common)
  np.testing.assert_allclose(both, cfg, rtol=1e-3, atol=1e-3)
  assert info['nfe'] == cfg_info['nfe'] == 2 * info['classifier_nfe']
  plain, _ = _small(_uncond_model('score'), _SMALL_LABELS, guidance_scale=1.5, **common)
  assert not np.allclose(both, plain, atol=1e-2)


@pytest.mark.parametrize('parameterization', ['score', 'noise'])
def test_classifier_guidance_in_velocity_and_score_space_give_the_same_sde_drift(
    parameterization):
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  y = jnp.tile(jnp.arange(gm.NUM_CLASSES, dtype=jnp.int32), 32)
  w_c, sigma = 2.5, 0.8
  drifts = {}
  for name in ('velocity', parameterization):
    fields = sampling._make_fields(  # pylint: disable=protected-access
        gm.model(_PATH, name), _ORACLE_LOGITS, jnp.full_like(y, gm.NULL), y, 1.0, w_c,
        path=_PATH, parameterization=name, null_label=gm.NULL, use_cfg=False)
    drifts[name] = {t: sampling.sde_drift(*fields(x, jnp.float32(t), True, True), sigma)
                    for t in (0.2, 0.5, 0.8)}
  for t, drift in drifts['velocity'].items():
    np.testing.assert_allclose(drift, drifts[parameterization][t], rtol=2e-3, atol=2e-3)
  u, s = gm.fields(_PATH, x, jnp.full((64,), 0.5), jnp.full_like(y, gm.NULL))
  assert float(jnp.max(jnp.abs(drifts['velocity'][0.5] - sampling.sde_drift(u, s, sigma)))) > 0.1


class _CountingClassifier:
  """Counts the rows the classifier's forward pass runs on (at run time)."""

  def __init__(self, logits_fn):
    self.logits_fn, self.times = logits_fn, []

  def __call__(self, x, t):
    jax.debug.callback(lambda times: self.times.append(np.asarray(times)), t)
    return self.logits_fn(x, t)


@pytest.mark.parametrize('method,guided', [('euler', 2), ('heun', 4), ('euler_maruyama', 2)])
def test_classifier_counts_and_the_guidance_interval(method, guided):
  # 7 steps on t_eps..1; the interval (0.3, 0.6) holds grid points 3 and 4 only, as in
  # sampling_test's hand count (the grid starts at t_eps, not 0, which moves no point across).
  classifier = _CountingClassifier(_ORACLE_LOGITS)
  labels = jnp.array([0, 1, 0], jnp.int32)
  _, info = sampling.sample(
      _uncond_model('velocity'), jax.random.PRNGKey(7), jnp.full_like(labels, gm.NULL),
      shape=(2,), path=_PATH, parameterization='velocity', null_label=gm.NULL,
      guidance_scale=1.0, method=method, num_steps=7, sigma=0.5, guidance_interval=(0.3, 0.6),
      classifier_fn=classifier, classifier_scale=2.0, classifier_labels=labels)
  jax.effects_barrier()
  times = np.concatenate(classifier.times)
  assert len(times) // 3 == info['classifier_nfe'] == guided
  assert np.all((times >= 0.3) & (times <= 0.6))
  assert info['nfe'] == {'euler': 7, 'heun': 13, 'euler_maruyama': 7}[method]


@pytest.mark.parametrize('override,argument', [
    (dict(classifier_labels=jnp.array([0, gm.NULL, 1, 0, 1], jnp.int32)), 'classifier_labels'),
    (dict(classifier_scale=float('nan')), 'classifier_scale'),
    (dict(classifier_labels=jnp.zeros((5, 1), jnp.int32)), 'classifier_labels'),
])
def test_bad_classifier_arguments_raise(override, argument):
  kwargs = dict(classifier_fn=_ORACLE_LOGITS, classifier_scale=1.0,
                classifier_labels=_SMALL_LABELS)
  kwargs.update(override)
  with pytest.raises(ValueError, match=argument):
    _small(_uncond_model('velocity'), jnp.full_like(_SMALL_LABELS, gm.NULL),
           parameterization='velocity', method='euler', guidance_scale=1.0, **kwargs)
