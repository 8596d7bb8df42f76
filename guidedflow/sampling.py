"""ODE and SDE samplers (Euler, Heun, Euler–Maruyama) with classifier-free guidance, in lax.scan."""

import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import guidance
from guidedflow import paths as paths_lib

METHODS = ('euler', 'heun', 'euler_maruyama')
SIGMA_SCHEDULES = ('constant', 'decreasing', 'path')
DEFAULT_T_EPS = 1e-3
TRAJECTORY_FRAMES = 9


def _is_concrete(value):
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


def _is_python_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_sampling_args(*, parameterization, null_label, guidance_scale, num_steps, method,
                           sigma_schedule='constant', sigma=None, labels=None,
                           guidance_interval=None, path=None, t_eps=DEFAULT_T_EPS):
  """Raises ValueError naming the argument and its allowed values for any bad argument.

  Values that are tracers (inside an outer jit) are not inspected; names, `num_steps` and shapes
  always are.
  """
  paths_lib.check_choice('method', method, METHODS)
  paths_lib.check_choice('parameterization', parameterization, paths_lib.PARAMETERIZATIONS)
  paths_lib.check_choice('sigma_schedule', sigma_schedule, SIGMA_SCHEDULES)
  if path is not None:
    paths_lib.get_path(path)
  if (not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool)
      or num_steps < 1):
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
  if (not isinstance(null_label, (int, np.integer)) or isinstance(null_label, bool)
      or null_label < 0):
    raise ValueError(f'null_label must be a non-negative integer (the number of classes), '
                     f'got {null_label!r}.')
  if not 0.0 < float(t_eps) < 0.5:
    raise ValueError(f't_eps must be in (0, 0.5), got {t_eps!r}.')
  if _is_concrete(guidance_scale):
    scale = np.asarray(guidance_scale, np.float64)
    if scale.ndim > 1 or not np.all(np.isfinite(scale)):
      raise ValueError('guidance_scale must be a finite number (or a finite (B,) array), '
                       f'got {guidance_scale!r}.')
  if sigma is not None and _is_concrete(sigma):
    sigma_value = np.asarray(sigma, np.float64)
    if sigma_value.ndim != 0 or not np.isfinite(sigma_value) or sigma_value < 0:
      raise ValueError(f'sigma must be a finite number >= 0, got {sigma!r}.')
  if guidance_interval is not None:
    try:
      t_lo, t_hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
      raise ValueError('guidance_interval must be None or a pair (t_lo, t_hi) with '
                       f'0 <= t_lo <= t_hi <= 1, got {guidance_interval!r}.') from None
    if not 0.0 <= t_lo <= t_hi <= 1.0:
      raise ValueError('guidance_interval must be None or a pair (t_lo, t_hi) with '
                       f'0 <= t_lo <= t_hi <= 1, got {guidance_interval!r}.')
  if labels is not None:
    if jnp.ndim(labels) != 1:
      raise ValueError(f'labels must have shape (B,), got shape {jnp.shape(labels)}.')
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
      raise ValueError(f'labels must be integers in [0, null_label={null_label}], '
                       f'got dtype {jnp.result_type(labels)}.')
    if (_is_concrete(labels) and np.size(labels)
        and (not isinstance(labels, jax.Array) or labels.is_fully_addressable)):
      values = np.asarray(labels)
      if values.min() < 0 or values.max() > null_label:
        raise ValueError(f'labels must lie in [0, null_label={null_label}] (classes '
                         f'0..{null_label - 1} and the null label {null_label}), got values in '
                         f'[{values.min()}, {values.max()}].')


def start_time(parameterization, method, sigma_schedule, t_eps=DEFAULT_T_EPS):
  """First time of the grid: t_eps where a needed conversion is singular at t = 0, else 0.

  Velocity from a score/noise prediction divides by alpha_0 = 0, and so does the 'path'
  diffusion coefficient sigma_t² = 2 b_t; a velocity model with another sigma schedule needs
  neither and starts at exactly 0. The model is never evaluated at t = 1 (see `sample`), so the
  grid always ends at 1 exactly.
  """
  needs_b = method == 'euler_maruyama' and sigma_schedule == 'path'
  return t_eps if (parameterization != 'velocity' or needs_b) else 0.0


def time_grid(num_steps, t_start):
  """Uniform grid t_start = t_0 < ... < t_N = 1, float32 (N + 1,)."""
  return jnp.linspace(t_start, 1.0, num_steps + 1, dtype=jnp.float32)


def diffusion_coefficient(t, *, path, sigma_schedule, sigma):
  """sigma_t of the SDE: 'constant' sigma, 'decreasing' sigma (1 − t), 'path' sqrt(2 b_t).

  'path' is the reverse of the forward noising SDE (drift a_t x + 2 b_t s) and ignores `sigma`;
  finite on (0, 1].
  """
  paths_lib.check_choice('sigma_schedule', sigma_schedule, SIGMA_SCHEDULES)
  t = jnp.asarray(t, jnp.float32)
  if sigma_schedule == 'constant':
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), t.shape)
  if sigma_schedule == 'decreasing':
    return jnp.asarray(sigma, jnp.float32) * (1.0 - t)
  _, b = path.velocity_coefficients(t)
  return jnp.sqrt(2.0 * jnp.maximum(b, 0.0))


def sde_drift(velocity, score, diffusion):
  """Drift of the guided SDE: ũ + sigma_t²/2 s̃ (same marginals as the ODE for any sigma_t)."""
  return velocity + 0.5 * jnp.square(diffusion) * score


def evaluations_per_sample(method, num_steps, use_cfg):
  """Model evaluations per sample; a doubled CFG batch [x; x] counts 2."""
  per_step = {'euler': num_steps, 'heun': 2 * num_steps - 1, 'euler_maruyama': num_steps}
  return per_step[method] * (2 if use_cfg else 1)


def _frame_steps(num_steps, num_frames):
  return np.unique(np.round(np.linspace(0, num_steps, num_frames)).astype(np.int32))


def _sample_impl(model_fn, key, labels, guidance_scale, sigma, *, shape, path, parameterization,
                 null_label, method, num_steps, sigma_schedule, guidance_interval, use_cfg,
                 num_frames, t_eps):
  """The sampler body (traced once per static configuration)."""
  batch = labels.shape[0]
  grid = time_grid(num_steps, start_time(parameterization, method, sigma_schedule, t_eps))
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, (batch,) + shape, jnp.float32)  # p_init at t = grid[0]

  def predict(x, t):
    if use_cfg:
      scale = guidance.effective_scale(guidance_scale, t, guidance_interval)
      return guidance.guided_prediction(model_fn, x, t, labels, null_label=null_label,
                                        guidance_scale=scale)
    return model_fn(x, jnp.full((batch,), t, x.dtype), labels)

  def velocity(x, t):
    return path.velocity_from_prediction(predict(x, t), x, t, parameterization)

  last = num_steps - 1

  def step(key, x, i, t, t_next):
    h = t_next - t
    if method == 'euler':
      return key, x + h * velocity(x, t)
    if method == 'heun':
      k1 = velocity(x, t)
      x_euler = x + h * k1
      # The last step stays Euler (as in EDM) so the model is never evaluated at t = 1, where
      # beta = 0 makes score/noise conversions singular; the order stays 2 (one O(h²) step).
      return key, jax.lax.cond(
          i < last,
          lambda: x + 0.5 * h * (k1 + velocity(x_euler, t_next)),
          lambda: x_euler)
    key, key_noise = jax.random.split(key)
    prediction = predict(x, t)
    u = path.velocity_from_prediction(prediction, x, t, parameterization)
    s = path.score_from_prediction(prediction, x, t, parameterization)
    # The last step is deterministic, so the sample at t = 1 carries no fresh noise.
    diffusion = jnp.where(i < last, diffusion_coefficient(
        t, path=path, sigma_schedule=sigma_schedule, sigma=sigma), 0.0)
    noise = jax.random.normal(key_noise, x.shape, x.dtype)
    return key, x + h * sde_drift(u, s, diffusion) + diffusion * jnp.sqrt(h) * noise

  frame_steps = _frame_steps(num_steps, num_frames) if num_frames else np.zeros(0, np.int32)
  slot_of_step = np.full(num_steps + 1, -1, np.int32)
  slot_of_step[frame_steps] = np.arange(len(frame_steps), dtype=np.int32)
  trajectory = jnp.zeros((len(frame_steps),) + x.shape, x.dtype)
  if num_frames:
    trajectory = trajectory.at[0].set(x)

  def body(carry, inputs):
    key, x, trajectory = carry
    i, t, t_next, slot = inputs
    key, x = step(key, x, i, t, t_next)
    if num_frames:
      index = jnp.maximum(slot, 0)
      trajectory = trajectory.at[index].set(jnp.where(slot >= 0, x, trajectory[index]))
    return (key, x, trajectory), None

  inputs = (jnp.arange(num_steps), grid[:-1], grid[1:], jnp.asarray(slot_of_step[1:]))
  (_, x, trajectory), _ = jax.lax.scan(body, (key_steps, x, trajectory), inputs)
  info = {'time_grid': grid}
  if num_frames:
    info['trajectory'] = trajectory
    info['trajectory_time'] = grid[frame_steps]
  return x, info


_STATIC_ARGNAMES = ('shape', 'path', 'parameterization', 'null_label', 'method', 'num_steps',
                    'sigma_schedule', 'guidance_interval', 'use_cfg', 'num_frames', 't_eps')
_sample_jit_traced_model = jax.jit(_sample_impl, static_argnames=_STATIC_ARGNAMES)
_sample_jit_static_model = jax.jit(_sample_impl, static_argnames=('model_fn',) + _STATIC_ARGNAMES)


def sample(model_fn, key, labels, *, shape, path, parameterization, null_label, guidance_scale,
           method, num_steps, sigma_schedule='constant', sigma=0.0, guidance_interval=None,
           return_trajectory=False, t_eps=DEFAULT_T_EPS):
  """Draws samples from the guided model by integrating from noise (t = 0) to data (t = 1).

  One `lax.scan` over the uniform grid `time_grid(num_steps, start_time(...))`. Each model call
  is a CFG call on the doubled batch [x; x] with labels [y; ∅]; the prediction is combined with
  `guidance.cfg_combine` and converted to velocity (and, for Euler–Maruyama, score) with the
  path's formulas. No method evaluates the model at t = 1: Euler and Euler–Maruyama evaluate at
  the left end of each step and Heun's last step is an Euler step; Euler–Maruyama's last step
  is deterministic (sigma = 0).

  Compilation: one compile per static configuration (shape, batch, path, parameterization,
  method, num_steps, sigma_schedule, guidance_interval, return_trajectory). `key`, `labels`,
  `guidance_scale` and `sigma` are traced, so changing them does not recompile. `model_fn` is
  a static argument hashed by identity when it is a plain callable: pass the same function
  object to reuse the compile, or pass a `jax.tree_util.Partial(apply, params)` (or any pytree
  callable with array leaves), which is traced, so new weights do not recompile. Inside an outer
  `jax.jit` (any traced argument), the body is inlined into the caller's trace.

  As an optimisation a Python number `guidance_scale == 1` (exactly conditional) runs a single
  forward per evaluation without the null branch; any other value, or an array, doubles the
  batch (and the first call with it compiles once more).

  Args:
    model_fn: (x, t, y) -> prediction of x's shape (B', *shape); t has shape (B',), y may hold
      the null label.
    key: PRNG key.
    labels: int (B,) in [0, null_label].
    shape: per-sample shape, e.g. (28, 28, 1) or (2,).
    path: schedule name or `paths.get_path(name)` object.
    parameterization: what model_fn predicts: 'velocity' | 'score' | 'noise'.
    null_label: the index of ∅ (= number of classes).
    guidance_scale: w (scalar or per-sample (B,)); 1 = conditional, 0 = unconditional.
    method: 'euler' | 'heun' | 'euler_maruyama'.
    num_steps: number of steps N >= 1.
    sigma_schedule: Euler–Maruyama sigma_t: 'constant' | 'decreasing' | 'path'.
    sigma: the sigma of 'constant' and 'decreasing' (0 gives the ODE).
    guidance_interval: None or (t_lo, t_hi): w applies there, 1 outside (see
      `guidance.effective_scale`).
    return_trajectory: False, True (9 frames, fewer if N < 8) or an int number of frames >= 2.
    t_eps: start of the grid when t = 0 is singular for the conversions (see `start_time`).

  Returns:
    (samples float32 (B, *shape), info) with info['nfe'] (model evaluations per sample, doubled
    CFG batches counting 2; a Python int), info['time_grid'] ((N + 1,) times) and, with
    `return_trajectory`, info['trajectory'] (F, B, *shape) and info['trajectory_time'] (F,).
  """
  path = paths_lib.get_path(path)
  validate_sampling_args(
      parameterization=parameterization, null_label=null_label, guidance_scale=guidance_scale,
      num_steps=num_steps, method=method, sigma_schedule=sigma_schedule, sigma=sigma,
      labels=labels, guidance_interval=guidance_interval, t_eps=t_eps)
  if return_trajectory is True:
    num_frames = min(TRAJECTORY_FRAMES, num_steps + 1)
  elif return_trajectory is False or return_trajectory is None:
    num_frames = 0
  elif isinstance(return_trajectory, int) and return_trajectory >= 2:
    num_frames = min(return_trajectory, num_steps + 1)
  else:
    raise ValueError('return_trajectory must be a bool or an int number of frames >= 2, '
                     f'got {return_trajectory!r}.')
  if guidance_interval is not None:
    guidance_interval = tuple(float(v) for v in guidance_interval)
  use_cfg = not (_is_python_number(guidance_scale) and guidance_scale == 1)
  options = dict(
      shape=tuple(int(d) for d in shape), path=path, parameterization=parameterization,
      null_label=int(null_label), method=method, num_steps=int(num_steps),
      sigma_schedule=sigma_schedule, guidance_interval=guidance_interval, use_cfg=use_cfg,
      num_frames=num_frames, t_eps=float(t_eps))
  labels = jnp.asarray(labels)
  guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  arrays = dict(key=key, labels=labels, guidance_scale=guidance_scale, sigma=sigma)
  leaves = jax.tree_util.tree_leaves(model_fn)
  if not _is_concrete((model_fn, arrays)):
    samples, info = _sample_impl(model_fn, **arrays, **options)
  elif len(leaves) == 1 and leaves[0] is model_fn:
    samples, info = _sample_jit_static_model(model_fn=model_fn, **arrays, **options)
  else:
    samples, info = _sample_jit_traced_model(model_fn=model_fn, **arrays, **options)
  info['nfe'] = evaluations_per_sample(method, num_steps, use_cfg)
  return samples, info
