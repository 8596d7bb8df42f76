"""Tests for the guidance methods beyond CFG: guidance rescale, CFG-Zero* and APG (issue 49).

Each method reduces to plain CFG at its neutral setting, matches an independent NumPy version of
its formula on the Gaussian-mixture toy's exact u(x|y) and u(x|∅), has the geometric property
that defines it, and runs in `sampling.sample` for every sampler at the NFE its plan counts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from guidedflow import errors
from guidedflow import guidance
from guidedflow import paths
from guidedflow import sampling
from guidedflow import sampling_plan
from guidedflow.tasks import registry
from tests import gaussian_mixture as gm

PATH = paths.get_path('linear')
W = 3.0
RESCALE = guidance.GuidanceMethod('rescale', rescale_phi=0.7)
ZERO_STAR = guidance.GuidanceMethod('cfg_zero_star', zero_star_init_steps=1)
APG = guidance.GuidanceMethod('apg', apg_eta=0.0, apg_norm_threshold=1.5, apg_momentum=-0.5)
NEUTRAL = {
    'rescale': guidance.GuidanceMethod('rescale'),
    'cfg_zero_star': guidance.GuidanceMethod('cfg_zero_star', zero_star_optimized_scale=False),
    'apg': guidance.GuidanceMethod('apg'),
    'apg r=inf': guidance.GuidanceMethod('apg', apg_norm_threshold=float('inf')),
}


@functools.lru_cache(maxsize=None)
def _exact_fields(batch=64):
  """(u_c, u_∅) of the toy at random (x, t, y), t in [0.05, 0.95], as float64 NumPy and f32."""
  kx, kt, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  x = 2.0 * jax.random.normal(kx, (batch, 2))
  t = jax.random.uniform(kt, (batch,), minval=0.05, maxval=0.95)
  y = jax.random.randint(ky, (batch,), 0, gm.NUM_CLASSES)
  cond, _ = gm.fields(PATH, x, t, y)
  uncond, _ = gm.fields(PATH, x, t, jnp.full_like(y, gm.NULL))
  return cond, uncond


def _image_like(seed):
  """Random (u_c, u_∅) of image shape (B, H, W, C): per-sample sums run over H, W and C."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  cond = jax.random.normal(k1, (4, 3, 5, 2))
  return cond, 0.8 * cond + 0.6 * jax.random.normal(k2, cond.shape)


def _flat(a):
  a = np.asarray(a, np.float64)
  return a.reshape(len(a), -1)


# ---- Independent NumPy versions of each formula (float64, per sample on flattened rows).

def _np_rescale(cond, uncond, w, phi):
  c, u = _flat(cond), _flat(uncond)
  cfg = u + w * (c - u)
  rescaled = cfg * (c.std(axis=1, keepdims=True) / cfg.std(axis=1, keepdims=True))
  return phi * rescaled + (1 - phi) * cfg


def _np_zero_star(cond, uncond, w):
  c, u = _flat(cond), _flat(uncond)
  s = np.einsum('bi,bi->b', c, u)[:, None] / np.einsum('bi,bi->b', u, u)[:, None]
  return s * u + w * (c - s * u)


def _np_apg(cond, uncond, w, eta, r, beta, previous):
  c, u = _flat(cond), _flat(uncond)
  delta = (c - u) + beta * previous
  carried = delta
  norm = np.linalg.norm(delta, axis=1, keepdims=True)
  delta = delta * np.minimum(1.0, r / np.maximum(norm, 1e-30))
  unit = c / np.linalg.norm(c, axis=1, keepdims=True)
  parallel = np.einsum('bi,bi->b', delta, unit)[:, None] * unit
  return c + (w - 1) * ((delta - parallel) + eta * parallel), carried


# ---- (a) The neutral settings are plain CFG.

@pytest.mark.parametrize('name', sorted(NEUTRAL))
@pytest.mark.parametrize('data', ['toy', 'image'])
def test_neutral_setting_is_plain_cfg(name, data):
  cond, uncond = _exact_fields() if data == 'toy' else _image_like(1)
  method = NEUTRAL[name]
  state = guidance.initial_state(method, cond)
  for w in (W, jnp.linspace(0.0, 4.0, cond.shape[0])):  # scalar and per-sample w
    guided, _ = guidance.guided_velocity(method, cond, uncond, w, state)
    cfg = guidance.cfg_combine(cond, uncond, w)
    if name == 'rescale':  # φ = 0: the CFG field itself, bit for bit
      np.testing.assert_array_equal(guided, cfg)
    else:
      np.testing.assert_allclose(guided, cfg, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('method', [RESCALE, ZERO_STAR, APG], ids=lambda m: m.name)
def test_w_1_is_the_conditional_field(method):
  """Every method returns u_c at w = 1, which lets the sampler skip u_∅ there."""
  cond, uncond = _image_like(2)
  state = guidance.initial_state(method, cond)
  guided, _ = guidance.guided_velocity(method, cond, uncond, 1.0,
                                       None if state is None else state + 0.3)
  np.testing.assert_allclose(guided, cond, rtol=1e-6, atol=1e-6)


def test_neutral_methods_sample_what_cfg_samples():
  common = dict(shape=(2,), path=PATH, parameterization='velocity', null_label=gm.NULL,
                guidance_scale=W, method='heun', num_steps=6, guidance_interval=(0.2, 0.9))
  labels = jnp.array([0, 1, 1, 0], jnp.int32)
  model = gm.model(PATH, 'velocity')
  reference, info = sampling.sample(model, jax.random.PRNGKey(3), labels, **common)
  for method in NEUTRAL.values():
    samples, method_info = sampling.sample(model, jax.random.PRNGKey(3), labels,
                                           guidance_method=method, **common)
    assert method_info['nfe'] == info['nfe']
    np.testing.assert_allclose(samples, reference, rtol=1e-5, atol=1e-5)


# ---- (b) Each formula against NumPy on the toy's exact fields, and its defining property.

@pytest.mark.parametrize('data', ['toy', 'image'])
def test_rescale_matches_numpy_and_phi_1_has_the_conditional_std(data):
  cond, uncond = _exact_fields() if data == 'toy' else _image_like(3)
  guided, _ = guidance.guided_velocity(RESCALE, cond, uncond, W)
  np.testing.assert_allclose(_flat(guided), _np_rescale(cond, uncond, W, 0.7), rtol=1e-5,
                             atol=1e-5)
  full, _ = guidance.guided_velocity(guidance.GuidanceMethod('rescale', rescale_phi=1.0), cond,
                                     uncond, W)
  np.testing.assert_allclose(_flat(full).std(axis=1), _flat(cond).std(axis=1), rtol=1e-5)
  assert not np.allclose(_flat(full).std(axis=1), _flat(guidance.cfg_combine(
      cond, uncond, W)).std(axis=1), rtol=1e-2)  # CFG's own std differs: φ changes something


@pytest.mark.parametrize('data', ['toy', 'image'])
def test_cfg_zero_star_matches_numpy_and_its_scale_is_least_squares(data):
  cond, uncond = _exact_fields() if data == 'toy' else _image_like(4)
  guided, _ = guidance.guided_velocity(ZERO_STAR, cond, uncond, W)
  np.testing.assert_allclose(_flat(guided), _np_zero_star(cond, uncond, W), rtol=1e-5, atol=1e-5)
  # At w = 0 the field is s* u_∅, the projection of u_c on u_∅: the residual is ⟂ u_∅, and no
  # other scale of u_∅ is closer to u_c.
  projected = _flat(guidance.cfg_zero_star_combine(cond, uncond, 0.0))
  c, u = _flat(cond), _flat(uncond)
  np.testing.assert_allclose(np.einsum('bi,bi->b', c - projected, u), 0.0, atol=1e-4)
  for other in (0.9, 1.1):
    assert np.all(np.linalg.norm(c - projected, axis=1)
                  <= np.linalg.norm(c - other * projected, axis=1) + 1e-6)
  # s* ≠ 1 on the toy: the method is not CFG there.
  assert np.max(np.abs(_flat(guided) - _flat(guidance.cfg_combine(cond, uncond, W)))) > 1e-2


@pytest.mark.parametrize('data', ['toy', 'image'])
def test_apg_matches_numpy_with_momentum_across_calls(data):
  cond, uncond = _exact_fields() if data == 'toy' else _image_like(5)
  state = guidance.initial_state(APG, cond)
  previous = np.zeros_like(_flat(cond))
  # Two evaluations with different fields: the second sees the first's Δ through β.
  for c, u in ((cond, uncond), (0.5 * cond + uncond, cond - 0.2 * uncond)):
    guided, state = guidance.guided_velocity(APG, c, u, W, state)
    expected, previous = _np_apg(c, u, W, 0.0, 1.5, -0.5, previous)
    np.testing.assert_allclose(_flat(guided), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_flat(state), previous, rtol=1e-5, atol=1e-5)
    # η = 0: the guidance is orthogonal to u_c; the clip bounds its norm by (w − 1) r.
    update = _flat(guided) - _flat(c)
    np.testing.assert_allclose(np.einsum('bi,bi->b', update, _flat(c)), 0.0, atol=1e-4)
    assert np.all(np.linalg.norm(update, axis=1) <= (W - 1) * 1.5 * (1 + 1e-5))


def test_methods_combine_velocities_in_every_parameterization():
  """The guided velocity of a noise model equals the velocity model's: the methods act on
  velocities, not on the model's raw predictions (where they would differ)."""
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(6), (32, 2))
  y = jnp.tile(jnp.arange(gm.NUM_CLASSES, dtype=jnp.int32), 16)
  for method in (RESCALE, ZERO_STAR, APG):
    velocities = {}
    for parameterization in ('velocity', 'noise'):
      fields = sampling._make_stateful_fields(  # pylint: disable=protected-access
          gm.model(PATH, parameterization), None, y, y, W, 0.0, path=PATH,
          parameterization=parameterization, null_label=gm.NULL, use_cfg=True,
          null_labels=None, guidance_method=method)
      u, s, _ = fields(x, jnp.float32(0.4), True, True, guidance.initial_state(method, x))
      velocities[parameterization] = u
      # the guided score is the guided velocity's: u = a x + b s
      a, b = PATH.velocity_coefficients(jnp.float32(0.4))
      np.testing.assert_allclose(u, a * x + b * s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(velocities['velocity'], velocities['noise'], rtol=1e-4, atol=1e-4)


# ---- (c) Sampling: every sampler, the interval, the plan's NFE, momentum in the scan.

class CountingModel:
  """The toy's exact model, counting the rows it is run on (`jax.debug.callback`)."""

  def __init__(self, parameterization='velocity'):
    self.model_fn = gm.model(PATH, parameterization)
    self.rows = []

  def __call__(self, x, t, y):
    jax.debug.callback(lambda times: self.rows.append(len(times)), t)
    return self.model_fn(x, t, y)

  def per_sample(self, batch):
    jax.effects_barrier()
    rows, self.rows = sum(self.rows), []
    return rows // batch


_LABELS = jnp.array([0, 1, 0], jnp.int32)
_STEPS = 6


@pytest.mark.parametrize('method', ['euler', 'heun', 'euler_maruyama'])
@pytest.mark.parametrize('guidance_method', [RESCALE, ZERO_STAR, APG], ids=lambda m: m.name)
def test_sampling_is_finite_at_the_nfe_the_plan_counts(method, guidance_method):
  model = CountingModel()
  samples, info = sampling.sample(
      model, jax.random.PRNGKey(1), _LABELS, shape=(2,), path=PATH, parameterization='velocity',
      null_label=gm.NULL, guidance_scale=W, method=method, num_steps=_STEPS, sigma=0.3,
      guidance_method=guidance_method)
  assert np.all(np.isfinite(samples))
  steps = _STEPS - guidance_method.zero_init_steps  # zero-init steps evaluate nothing
  evaluations = 2 * steps - 1 if method == 'heun' else steps
  assert info['nfe'] == 2 * evaluations == model.per_sample(len(_LABELS))
  # the method changes the samples
  assert float(jnp.max(jnp.abs(samples - _cfg_samples(method)))) > 1e-3


@functools.lru_cache(maxsize=None)
def _cfg_samples(method):
  samples, _ = sampling.sample(
      gm.model(PATH, 'velocity'), jax.random.PRNGKey(1), _LABELS, shape=(2,), path=PATH,
      parameterization='velocity', null_label=gm.NULL, guidance_scale=W, method=method,
      num_steps=_STEPS, sigma=0.3)
  return samples


def test_zero_init_steps_keep_the_noise_and_later_steps_draw_the_same_noise():
  common = dict(shape=(2,), path=PATH, parameterization='velocity', null_label=gm.NULL,
                guidance_scale=W, num_steps=_STEPS, return_trajectory=_STEPS + 1)
  model = gm.model(PATH, 'velocity')
  method = guidance.GuidanceMethod('cfg_zero_star', zero_star_init_steps=2)
  _, info = sampling.sample(model, jax.random.PRNGKey(2), _LABELS, method='euler',
                            guidance_method=method, **common)
  frames = info['trajectory']
  np.testing.assert_array_equal(frames[1], frames[0])
  np.testing.assert_array_equal(frames[2], frames[0])
  assert float(jnp.max(jnp.abs(frames[3] - frames[2]))) > 1e-3
  assert info['nfe'] == 2 * (_STEPS - 2)
  # Euler–Maruyama's steps after the zero-init draw the noise they draw with K = 0.
  sigma, key = 0.5, jax.random.PRNGKey(2)
  samples, _ = sampling.sample(model, key, _LABELS, method='euler_maruyama', sigma=sigma,
                               guidance_method=method, **dict(common, guidance_scale=1.0))
  grid = sampling_plan.time_grid(_STEPS, 0.0)
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, (len(_LABELS), 2))
  for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
    key_steps, key_noise = jax.random.split(key_steps)
    if i < 2:
      continue
    u, s = gm.fields(PATH, x, jnp.full((len(_LABELS),), t), _LABELS)
    diffusion = sigma if i < _STEPS - 1 else 0.0
    x = (x + (t_next - t) * (u + 0.5 * diffusion**2 * s)
         + diffusion * np.sqrt(t_next - t) * jax.random.normal(key_noise, x.shape))
  np.testing.assert_allclose(samples, x, rtol=1e-4, atol=1e-4)


def _reference(method, sampler, key, labels, interval):
  """Euler or Heun with APG's momentum carried in a Python loop, u_∅ only inside the interval."""
  grid = sampling_plan.time_grid(_STEPS, 0.0)
  x = jax.random.normal(jax.random.split(key)[0], (len(labels), 2))
  state = guidance.initial_state(method, x)

  def velocity(x, t, state):
    cond, _ = gm.fields(PATH, x, jnp.full((len(labels),), t), labels)
    if not interval[0] <= t <= interval[1]:
      return cond, state
    uncond, _ = gm.fields(PATH, x, jnp.full((len(labels),), t), jnp.full_like(labels, gm.NULL))
    return guidance.guided_velocity(method, cond, uncond, W, state)

  for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
    k1, state = velocity(x, t, state)
    x_euler = x + (t_next - t) * k1
    if sampler == 'heun' and i < _STEPS - 1:
      k2, state = velocity(x_euler, t_next, state)
      x = x + 0.5 * (t_next - t) * (k1 + k2)
    else:
      x = x_euler
  return x


@pytest.mark.parametrize('sampler', ['euler', 'heun'])
def test_apg_momentum_is_carried_across_evaluations_of_the_scan(sampler):
  interval = (0.1, 0.7)
  common = dict(shape=(2,), path=PATH, parameterization='velocity', null_label=gm.NULL,
                guidance_scale=W, method=sampler, num_steps=_STEPS, guidance_interval=interval)
  key = jax.random.PRNGKey(4)
  samples, _ = sampling.sample(gm.model(PATH, 'velocity'), key, _LABELS, guidance_method=APG,
                               **common)
  np.testing.assert_allclose(samples, _reference(APG, sampler, key, _LABELS, interval),
                             rtol=1e-5, atol=1e-5)
  no_momentum = guidance.GuidanceMethod('apg', apg_eta=0.0, apg_norm_threshold=1.5)
  assert float(jnp.max(jnp.abs(
      samples - _reference(no_momentum, sampler, key, _LABELS, interval)))) > 1e-3


def test_a_pytree_condition_samples_what_its_labels_sample():
  """The text path (`null_labels`): a dict condition and its ∅ give the labels' samples."""
  model = gm.model(PATH, 'velocity')
  common = dict(shape=(2,), path=PATH, parameterization='velocity', null_label=gm.NULL,
                guidance_scale=W, method='heun', num_steps=_STEPS, guidance_method=APG,
                guidance_interval=(0.0, 0.8))
  labels, _ = sampling.sample(model, jax.random.PRNGKey(5), _LABELS, **common)
  structured, _ = sampling.sample(
      lambda x, t, y: model(x, t, y['class']), jax.random.PRNGKey(5), {'class': _LABELS},
      null_labels={'class': jnp.full_like(_LABELS, gm.NULL)}, **common)
  np.testing.assert_array_equal(structured, labels)


# ---- (d) Bad values: one-line errors naming the key and its fix.

@pytest.mark.parametrize('key,value,message', [
    ('guidance_method', 'apg++', r"config.sampling.guidance_method='apg\+\+' is not one of"),
    ('rescale_phi', -0.5, r'config.sampling.rescale_phi=-0.5 must be in \[0, 1\].*'
                          r'--config.sampling.rescale_phi=0.7'),
    ('apg_momentum', 1.0, r'config.sampling.apg_momentum=1.0 must be in \(-1, 1\)'),
    ('apg_eta', float('nan'), r'config.sampling.apg_eta=nan must be a finite number >= 0'),
    ('apg_norm_threshold', -1.0, r'config.sampling.apg_norm_threshold=-1.0 must be'),
    ('zero_star_init_steps', 2, r'zero_star_init_steps=2 must be less than '
                                r'sampling.num_steps=2'),
    ('guidance', 'classifier', r"guidance_method='apg'.*sampling.guidance='classifier'"),
    ('eval_steps', (5, 1), r'zero_star_init_steps=1 must be less than eval.num_steps=1'),
    ('method', 'euler_maruyama', r"guidance_method='cfg_pp' runs with the samplers \('euler', "
                                 r"'dpmpp_2m', 'unipc'\).*config.sampling.method has "
                                 r"'euler_maruyama'"),
    ('autoguidance_step', None, r"guidance_method='autoguidance' needs its weaker model: "
                                r'--config.sampling.autoguidance_step=STEP'),
    ('autoguidance_step', -1, r'autoguidance_step=-1 must be None or a checkpoint step >= 0'),
])
def test_bad_values_are_one_line_config_errors(key, value, message):
  config = tiny.get_config()
  registry.validate(config)
  config.sampling.guidance_method = {'zero_star_init_steps': 'cfg_zero_star', 'guidance': 'apg',
                                     'eval_steps': 'cfg_zero_star', 'method': 'cfg_pp',
                                     'autoguidance_step': 'autoguidance'}.get(key, 'cfg')
  if key == 'eval_steps':
    config.sampling.zero_star_init_steps = 1
    config.eval.num_steps = value
  else:
    config.sampling[key] = value
  with pytest.raises(errors.ConfigError, match=message) as raised:
    registry.validate(config)
  assert '\n' not in str(raised.value)


def test_library_values_are_checked_in_the_plan():
  with pytest.raises(ValueError, match='guidance_method=.unknown. is not one of'):
    guidance.GuidanceMethod('unknown')
  with pytest.raises(ValueError, match='zero_star_init_steps=3 must be less than num_steps=3'):
    sampling_plan.make_plan(shape=(2,), path=PATH, parameterization='velocity', null_label=2,
                            method='euler', num_steps=3, use_cfg=True,
                            guidance_method=guidance.GuidanceMethod('cfg_zero_star',
                                                                    zero_star_init_steps=3))
