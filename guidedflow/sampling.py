"""ODE and SDE samplers (Euler, Heun, Euler–Maruyama) with classifier-free guidance, in lax.scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import guidance
from guidedflow import paths as paths_lib

METHODS = ('euler', 'heun', 'euler_maruyama')
# How the Sampler guides (guidedflow/sampler.py): classifier-free, classifier, or both.
GUIDANCE_MODES = ('cfg', 'classifier', 'cfg+classifier')
SIGMA_SCHEDULES = ('constant', 'decreasing', 'path')
DEFAULT_T_EPS = 1e-3
TRAJECTORY_FRAMES = 9


def _is_concrete(value):
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


def _is_python_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_sampling_args(*, parameterization, null_label, guidance_scale, num_steps, method,
                           sigma_schedule='constant', sigma=None, labels=None,
                           guidance_interval=None, path=None, t_eps=DEFAULT_T_EPS,
                           classifier_scale=0.0, classifier_labels=None):
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
  if _is_concrete(classifier_scale):
    scale = np.asarray(classifier_scale, np.float64)
    if scale.ndim > 1 or not np.all(np.isfinite(scale)):
      raise ValueError('classifier_scale must be a finite number (or a finite (B,) array), '
                       f'got {classifier_scale!r}.')
  if classifier_labels is not None:
    _check_labels('classifier_labels', classifier_labels, null_label - 1, 'classes 0..'
                  f'{null_label - 1}; the classifier has no null label')
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
    _check_labels('labels', labels, null_label, f'classes 0..{null_label - 1} and the null label '
                  f'{null_label}')


def _check_labels(name, labels, top, meaning):
  """`labels` must be int (B,) in [0, top]."""
  if jnp.ndim(labels) != 1:
    raise ValueError(f'{name} must have shape (B,), got shape {jnp.shape(labels)}.')
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f'{name} must be integers in [0, {top}], got dtype '
                     f'{jnp.result_type(labels)}.')
  if (_is_concrete(labels) and np.size(labels)
      and (not isinstance(labels, jax.Array) or labels.is_fully_addressable)):
    values = np.asarray(labels)
    if values.min() < 0 or values.max() > top:
      raise ValueError(f'{name} must lie in [0, {top}] ({meaning}), got values in '
                       f'[{values.min()}, {values.max()}].')


def start_time(parameterization, method, sigma_schedule, t_eps=DEFAULT_T_EPS, classifier=False):
  """First time of the grid: t_eps where a needed conversion is singular at t = 0, else 0.

  Velocity from a score/noise prediction divides by alpha_0 = 0, and so do the 'path'
  diffusion coefficient sigma_t² = 2 b_t and the classifier-guidance term b_t ∇log p_t(y|x)
  (`classifier`); a velocity model with neither starts at exactly 0. The model is never
  evaluated at t = 1 (see `sample`), so the grid always ends at 1 exactly.
  """
  needs_b = (method == 'euler_maruyama' and sigma_schedule == 'path') or classifier
  return t_eps if (parameterization != 'velocity' or needs_b) else 0.0


def time_grid(num_steps, t_start):
  """Uniform grid t_start = t_0 < ... < t_N = 1, float32 (N + 1,): numpy, computed in float64
  on the host, so the sampler's constant grid is the same on every backend and is made without
  a device (an ahead-of-time compile for TPU devices this host does not have)."""
  return np.linspace(float(t_start), 1.0, num_steps + 1).astype(np.float32)


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


def uses_cfg(guidance_scale):
  """Whether `guidance_scale` needs the unconditional branch, i.e. the doubled batch [x; x].

  False only when w is known while tracing — a Python or NumPy number, or a concrete array — and
  is exactly 1 everywhere (plain conditional sampling, where CFG returns the conditional
  prediction exactly); a traced w (inside an outer jit) always runs the doubled batch.
  """
  if isinstance(guidance_scale, jax.core.Tracer):
    return True
  if isinstance(guidance_scale, jax.Array) and not (
      guidance_scale.is_fully_addressable or guidance_scale.is_fully_replicated):
    return True
  try:
    value = np.asarray(guidance_scale, np.float64)
  except (TypeError, ValueError):
    return True
  return not bool(np.all(value == 1.0))


def _concrete_grid(num_steps, t_start):
  """`time_grid` as a concrete array, also while tracing (the CFG plan is static)."""
  with jax.ensure_compile_time_eval():  # (a jnp grid, e.g. a test's patch, is concrete too)
    return np.asarray(time_grid(num_steps, t_start), np.float32)


def uses_classifier(classifier_fn, classifier_scale):
  """Whether the classifier term runs: a classifier is given and w_c is not known while tracing
  to be exactly 0 everywhere (then the term vanishes and the classifier is never evaluated)."""
  if classifier_fn is None:
    return False
  if isinstance(classifier_scale, jax.core.Tracer):
    return True
  try:
    value = np.asarray(classifier_scale, np.float64)
  except (TypeError, ValueError):
    return True
  return not bool(np.all(value == 0.0))


def cfg_plan(method, grid, guidance_interval, use_cfg):
  """The sampler's static guidance pattern: which model evaluations are guided.

  Step i evaluates the model at grid[i] and, for Heun (all steps but the last), at grid[i + 1].
  An evaluation is guided when `use_cfg` (any guidance term: CFG's doubled batch [x; x],
  classifier guidance's gradient) and its time lies in the closed `guidance_interval` (None:
  everywhere); otherwise only the conditional model runs — w = 1 and w_c = 0 there, where the
  guided field is the conditional one exactly, so the samples are those of guidance everywhere
  with `guidance.effective_scale`, at fewer evaluations.

  Args:
    method: 'euler' | 'heun' | 'euler_maruyama'.
    grid: the concrete (N + 1,) time grid.
    guidance_interval: None or (t_lo, t_hi).
    use_cfg: False when no guidance term runs (w = 1 known in Python and no classifier).

  Returns:
    Tuple of segments (start, stop, guided_at_t, guided_at_t_next): steps start..stop − 1 share
    the pattern and run as one `lax.scan`. `guided_at_t_next` is None where the steps evaluate
    once (Euler, Euler–Maruyama, a Heun run whose last step is alone); a Heun segment that ends
    at the last step skips its second evaluation there (`lax.cond`, never at t = 1).
  """
  grid = np.asarray(grid)
  num_steps = len(grid) - 1
  if not use_cfg:
    active = np.zeros(num_steps + 1, bool)
  else:
    active = guidance.guidance_active(grid, guidance_interval)  # numpy: the plan is static
  heun = method == 'heun'
  patterns = [(bool(active[i]), bool(active[i + 1]) if heun and i < num_steps - 1 else None)
              for i in range(num_steps)]
  if heun and num_steps > 1 and patterns[-1][0] == patterns[-2][0]:
    patterns[-1] = patterns[-2]  # join the previous segment; its lax.cond skips the 2nd eval
  segments = []
  for i, pattern in enumerate(patterns):
    if segments and segments[-1][2:] == pattern:
      segments[-1] = (segments[-1][0], i + 1) + pattern
    else:
      segments.append((i, i + 1) + pattern)
  return tuple(segments)


def plan_evaluations(plan, num_steps, *, guided_cost=2, plain_cost=1):
  """Evaluations per sample of a `cfg_plan`: a guided evaluation counts `guided_cost` (2 for
  CFG's doubled batch [x; x]; 1 for the classifier, which runs only on guided evaluations:
  `guided_cost=1, plain_cost=0`), an unguided one `plain_cost`."""
  total = 0
  for start, stop, first, second in plan:
    total += (stop - start) * (guided_cost if first else plain_cost)
    if second is not None:
      total += (stop - start - (stop == num_steps)) * (guided_cost if second else plain_cost)
  return total


def _num_frames(return_trajectory, num_steps):
  if return_trajectory is True:
    return min(TRAJECTORY_FRAMES, num_steps + 1)
  if return_trajectory is False or return_trajectory is None:
    return 0
  if isinstance(return_trajectory, int) and return_trajectory >= 2:
    return min(return_trajectory, num_steps + 1)
  raise ValueError('return_trajectory must be a bool or an int number of frames >= 2, '
                   f'got {return_trajectory!r}.')


def _frame_steps(num_steps, num_frames):
  return np.unique(np.round(np.linspace(0, num_steps, num_frames)).astype(np.int32))


def _make_step(fields, *, path, method, sigma_schedule, sigma, num_steps):
  """step(key, x, i, t, t_next, pattern) -> (key, x): one step with a segment's pattern.

  `pattern` = (guided_at_t, guided_at_t_next, ends_at_last) is static; `fields(x, t, guided,
  with_score)` gives the (guided where `guided`) velocity and, `with_score`, the score.
  Euler–Maruyama splits the key on every step whatever the pattern, so the noise does not depend
  on the segments.
  """
  last = num_steps - 1

  def velocity(x, t, guided):
    return fields(x, t, guided, False)[0]

  def step(key, x, i, t, t_next, pattern):
    guided_at_t, guided_at_t_next, ends_at_last = pattern
    h = t_next - t
    if method == 'euler':
      return key, x + h * velocity(x, t, guided_at_t)
    if method == 'heun':
      k1 = velocity(x, t, guided_at_t)
      x_euler = x + h * k1
      if guided_at_t_next is None:  # a lone last step
        return key, x_euler
      corrected = lambda: x + 0.5 * h * (k1 + velocity(x_euler, t_next, guided_at_t_next))
      if not ends_at_last:
        return key, corrected()
      # The last step stays Euler (as in EDM) so the model is never evaluated at t = 1, where
      # beta = 0 makes score/noise conversions singular; the order stays 2 (one O(h²) step).
      return key, jax.lax.cond(i < last, corrected, lambda: x_euler)
    key, key_noise = jax.random.split(key)
    u, s = fields(x, t, guided_at_t, True)
    # The last step is deterministic, so the sample at t = 1 carries no fresh noise.
    diffusion = jnp.where(i < last, diffusion_coefficient(
        t, path=path, sigma_schedule=sigma_schedule, sigma=sigma), 0.0)
    noise = jax.random.normal(key_noise, x.shape, x.dtype)
    return key, x + h * sde_drift(u, s, diffusion) + diffusion * jnp.sqrt(h) * noise

  return step


def _make_fields(model_fn, classifier_fn, labels, classifier_labels, guidance_scale,
                 classifier_scale, *, path, parameterization, null_label, use_cfg):
  """fields(x, t, guided, with_score) -> (ũ, s̃ or None) at the scalar time t.

  Guided evaluations run CFG's doubled batch when `use_cfg` and add the classifier term when
  `classifier_fn` is given: ũ = u + w_c b_t ∇log p_t(y|x), s̃ = s + w_c ∇log p_t(y|x), the
  gradient by `jax.grad` of the summed log-softmax (`guidance.grad_log_prob_from_logits`).
  """
  batch = labels.shape[0]
  grad_log_prob = (guidance.grad_log_prob_from_logits(classifier_fn)
                   if classifier_fn is not None else None)

  def fields(x, t, guided, with_score):
    times = jnp.full((batch,), t, x.dtype)
    if guided and use_cfg:
      prediction = guidance.guided_prediction(model_fn, x, t, labels, null_label=null_label,
                                              guidance_scale=guidance_scale)
    else:
      prediction = model_fn(x, times, labels)
    u = path.velocity_from_prediction(prediction, x, t, parameterization)
    s = path.score_from_prediction(prediction, x, t, parameterization) if with_score else None
    if guided and grad_log_prob is not None:
      term = guidance.per_sample(classifier_scale, x) * grad_log_prob(x, times, classifier_labels)
      _, b = path.velocity_coefficients(t)
      u = u + b * term
      s = s + term if with_score else None
    return u, s

  return fields


def _sample_impl(model_fn, classifier_fn, key, labels, classifier_labels, guidance_scale,
                 classifier_scale, sigma, *, shape, path, parameterization, null_label, method,
                 num_steps, sigma_schedule, plan, num_frames, t_eps, use_cfg):
  """The sampler body (traced once per static configuration): one lax.scan per plan segment."""
  batch = labels.shape[0]
  grid = _concrete_grid(num_steps, start_time(parameterization, method, sigma_schedule, t_eps,
                                              classifier=classifier_fn is not None))
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, (batch,) + shape, jnp.float32)  # p_init at t = grid[0]
  fields = _make_fields(model_fn, classifier_fn, labels, classifier_labels, guidance_scale,
                        classifier_scale, path=path, parameterization=parameterization,
                        null_label=null_label, use_cfg=use_cfg)
  step = _make_step(fields, path=path, method=method, sigma_schedule=sigma_schedule,
                    sigma=sigma, num_steps=num_steps)
  frame_steps = _frame_steps(num_steps, num_frames) if num_frames else np.zeros(0, np.int32)
  slot_of_step = np.full(num_steps + 1, -1, np.int32)
  slot_of_step[frame_steps] = np.arange(len(frame_steps), dtype=np.int32)
  trajectory = jnp.zeros((len(frame_steps),) + x.shape, x.dtype)
  if num_frames:
    trajectory = trajectory.at[0].set(x)

  def body(pattern, carry, inputs):
    key, x, trajectory = carry
    i, t, t_next, slot = inputs
    key, x = step(key, x, i, t, t_next, pattern)
    if num_frames:
      index = jnp.maximum(slot, 0)
      trajectory = trajectory.at[index].set(jnp.where(slot >= 0, x, trajectory[index]))
    return (key, x, trajectory), None

  carry = (key_steps, x, trajectory)
  for start, stop, guided_at_t, guided_at_t_next in plan:
    pattern = (guided_at_t, guided_at_t_next, stop == num_steps)
    inputs = (jnp.arange(start, stop), grid[start:stop], grid[start + 1:stop + 1],
              jnp.asarray(slot_of_step[start + 1:stop + 1]))
    carry, _ = jax.lax.scan(functools.partial(body, pattern), carry, inputs)
  _, x, trajectory = carry
  info = {'time_grid': grid}
  if num_frames:
    info['trajectory'] = trajectory
    info['trajectory_time'] = grid[frame_steps]
  return x, info


_STATIC_ARGNAMES = ('shape', 'path', 'parameterization', 'null_label', 'method', 'num_steps',
                    'sigma_schedule', 'plan', 'num_frames', 't_eps', 'use_cfg')
_sample_jit_traced_model = jax.jit(_sample_impl, static_argnames=_STATIC_ARGNAMES)
_sample_jit_static_model = jax.jit(_sample_impl, static_argnames=('model_fn',) + _STATIC_ARGNAMES)


def sample(model_fn, key, labels, *, shape, path, parameterization, null_label, guidance_scale,
           method, num_steps, sigma_schedule='constant', sigma=0.0, guidance_interval=None,
           return_trajectory=False, t_eps=DEFAULT_T_EPS, classifier_fn=None,
           classifier_scale=0.0, classifier_labels=None):
  """Draws samples from the guided model by integrating from noise (t = 0) to data (t = 1).

  Integrates over the uniform grid `time_grid(num_steps, start_time(...))` in `lax.scan`. A
  model evaluation with guidance is a CFG call on the doubled batch (each x with y and with ∅),
  combined with `guidance.cfg_combine`; the prediction is converted to velocity (and, for
  Euler–Maruyama, score) with the path's formulas. No method evaluates the model at t = 1: Euler
  and Euler–Maruyama evaluate at the left end of each step and Heun's last step is an Euler
  step; Euler–Maruyama's last step is deterministic (sigma = 0).

  The sampler costs exactly its NFE: where w = 1 the unconditional half is not run. A w known in
  Python (a number, NumPy or concrete array) that is exactly 1 everywhere runs only the
  conditional batch (see `uses_cfg`); with a `guidance_interval` the evaluations outside it run
  only the conditional batch too. The grid is static, so which evaluations double is decided
  while tracing (`cfg_plan`): the steps are split into consecutive segments of equal pattern, one
  `lax.scan` each (one segment without an interval). The samples equal those of the doubled
  batch with `guidance.effective_scale` everywhere (same keys, the same noise per step).

  Classifier guidance (`classifier_fn`, a noise-aware classifier (x, t) -> logits (B, K)):
  guided evaluations add w_c b_t ∇_x log p_t(y|x) to the velocity (w_c ∇_x log p_t(y|x) to the
  score of Euler–Maruyama), the gradient by `jax.grad` of the summed log-softmax inside the
  scan step, at `classifier_labels` (default `labels`). It combines with CFG (w and w_c are
  separate) or replaces it: an unconditional generator is sampled with `labels` all ∅,
  `guidance_scale=1` and `classifier_labels` the classes. The guidance interval applies to the
  classifier term too, and with a classifier the grid starts at `t_eps` (b_t is singular at
  t = 0). A w_c known in Python to be 0 never evaluates the classifier, so the samples are the
  unguided sampler's exactly.

  Compilation: one compile per static configuration (shape, batch, path, parameterization,
  method, num_steps, sigma_schedule, guidance_interval, return_trajectory, and whether w is the
  Python 1). `key`, `labels`, `guidance_scale` and `sigma` are traced, so changing them does not
  recompile (w = 1 and w != 1 are two compiles). `model_fn` is a static argument hashed by
  identity when it is a plain callable: pass the same function object to reuse the compile, or
  pass a `jax.tree_util.Partial(apply, params)` (or any pytree callable with array leaves), which
  is traced, so new weights do not recompile. Inside an outer `jax.jit` (any traced argument),
  the body is inlined into the caller's trace; a traced w there runs the doubled batch.

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
    guidance_interval: None or (t_lo, t_hi): w applies there (closed interval), 1 outside, where
      only the conditional half is evaluated (see `guidance.effective_scale`, `cfg_plan`).
    return_trajectory: False, True (9 frames, fewer if N < 8) or an int number of frames >= 2.
    t_eps: start of the grid when t = 0 is singular for the conversions (see `start_time`).
    classifier_fn: None, or (x, t) -> logits (B, K) of p_t(y|x); a plain callable is static
      (hashed by identity), a pytree callable (`jax.tree_util.Partial(apply, params)`) traced.
    classifier_scale: w_c (scalar or per-sample (B,)); 0 = no classifier guidance.
    classifier_labels: int (B,) in [0, K − 1], the classes the classifier pulls towards; None:
      `labels` (which then must not hold ∅).

  Returns:
    (samples float32 (B, *shape), info) with info['nfe'] (the generator evaluations per sample
    this call runs, doubled CFG batches counting 2; a Python int; see `cfg_plan`),
    info['classifier_nfe'] (the classifier's passes per sample, one per guided evaluation;
    each is a forward and its backward, `jax.grad`), info['time_grid']
    ((N + 1,) times) and, with `return_trajectory`, info['trajectory'] (F, B, *shape) and
    info['trajectory_time'] (F,).
  """
  path = paths_lib.get_path(path)
  use_classifier = uses_classifier(classifier_fn, classifier_scale)
  if use_classifier and classifier_labels is None:
    classifier_labels = labels
  validate_sampling_args(
      parameterization=parameterization, null_label=null_label, guidance_scale=guidance_scale,
      num_steps=num_steps, method=method, sigma_schedule=sigma_schedule, sigma=sigma,
      labels=labels, guidance_interval=guidance_interval, t_eps=t_eps,
      classifier_scale=classifier_scale,
      classifier_labels=classifier_labels if use_classifier else None)
  num_frames = _num_frames(return_trajectory, num_steps)
  if guidance_interval is not None:
    guidance_interval = tuple(float(v) for v in guidance_interval)
  use_cfg = uses_cfg(guidance_scale)
  t_start = start_time(parameterization, method, sigma_schedule, t_eps, use_classifier)
  plan = cfg_plan(method, _concrete_grid(int(num_steps), t_start), guidance_interval,
                  use_cfg or use_classifier)
  options = dict(
      shape=tuple(int(d) for d in shape), path=path, parameterization=parameterization,
      null_label=int(null_label), method=method, num_steps=int(num_steps),
      sigma_schedule=sigma_schedule, plan=plan, num_frames=num_frames, t_eps=float(t_eps),
      use_cfg=use_cfg)
  labels = jnp.asarray(labels)
  if use_classifier:
    leaves = jax.tree_util.tree_leaves(classifier_fn)
    if len(leaves) == 1 and leaves[0] is classifier_fn:  # a plain callable: static
      classifier_fn = jax.tree_util.Partial(classifier_fn)
    classifier_labels = jnp.asarray(classifier_labels)
  else:
    classifier_fn, classifier_labels = None, labels
  arrays = dict(key=key, labels=labels, classifier_labels=classifier_labels,
                guidance_scale=jnp.asarray(guidance_scale, jnp.float32),
                classifier_scale=jnp.asarray(classifier_scale, jnp.float32),
                sigma=jnp.asarray(sigma, jnp.float32))
  leaves = jax.tree_util.tree_leaves(model_fn)
  if not _is_concrete((model_fn, classifier_fn, arrays)):
    samples, info = _sample_impl(model_fn, classifier_fn, **arrays, **options)
  elif len(leaves) == 1 and leaves[0] is model_fn:
    samples, info = _sample_jit_static_model(model_fn=model_fn, classifier_fn=classifier_fn,
                                             **arrays, **options)
  else:
    samples, info = _sample_jit_traced_model(model_fn=model_fn, classifier_fn=classifier_fn,
                                             **arrays, **options)
  info['nfe'] = plan_evaluations(plan, int(num_steps), guided_cost=2 if use_cfg else 1)
  classifier_nfe = (plan_evaluations(plan, int(num_steps), guided_cost=1, plain_cost=0)
                    if use_classifier else 0)
  info['classifier_nfe'] = classifier_nfe
  return samples, info
