"""What a sampling call does, decided and checked once before anything is traced.

`make_plan` checks the static arguments (method, steps, schedules, interval, labels' range, the
guidance method) and fixes the time grid, which model evaluations are guided (`cfg_plan`) and what
the call costs
(NFE): a `Plan`, hashable, the one static argument of the compiled sampler
(`sampling.integrate`). `check_values` checks the traced values (w, w_c, σ, labels) where they are
concrete. Numpy only: the plan exists before, and outside, any trace.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import guidance
from guidedflow import paths as paths_lib

METHODS = ('euler', 'heun', 'euler_maruyama', 'dpmpp_2m', 'unipc')
# How the Sampler guides (guidedflow/sampler.py): classifier-free, classifier, or both.
GUIDANCE_MODES = ('cfg', 'classifier', 'cfg+classifier')
SIGMA_SCHEDULES = ('constant', 'decreasing', 'path')
# The samplers CFG++ guides: one evaluation per step t → t', whose end its re-noising needs
# (Heun's second evaluation and Euler–Maruyama's noise have no such step).
CFG_PP_METHODS = ('euler', 'dpmpp_2m', 'unipc')
DEFAULT_T_EPS = 1e-3
TRAJECTORY_FRAMES = 9


def is_concrete(value):
  return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))



@dataclasses.dataclass(frozen=True)
class Plan:
  """A sampling call's static configuration, checked once (`make_plan`); hashable.

  Attributes:
    shape: per-sample shape. path: the `paths.GaussianPath`. parameterization: what the model
    predicts. null_label: the index of ∅. method, num_steps, sigma_schedule: the integrator.
    use_cfg: guided evaluations run CFG's doubled batch [x; x] (False: w = 1 known, only the
    conditional batch runs). use_classifier: guided evaluations add the classifier term.
    grid: the (N + 1,) times, float32 values. segments: `cfg_plan`'s segments. num_frames:
    trajectory frames returned (0: none). guidance_method: the `guidance.GuidanceMethod` of guided
    evaluations (CFG-Zero*'s zero-init steps have no segment: they evaluate nothing).
  """
  shape: tuple
  path: paths_lib.GaussianPath
  parameterization: str
  null_label: int
  method: str
  num_steps: int
  sigma_schedule: str
  use_cfg: bool
  use_classifier: bool
  grid: tuple
  segments: tuple
  num_frames: int
  guidance_method: guidance.GuidanceMethod = guidance.GuidanceMethod()

  @property
  def nfe(self):
    """Generator evaluations per sample, a doubled CFG batch counting 2."""
    return plan_evaluations(self.segments, self.num_steps, guided_cost=2 if self.use_cfg else 1)

  @property
  def classifier_nfe(self):
    """The classifier's passes per sample (a forward and its backward each): one per guided
    evaluation."""
    if not self.use_classifier:
      return 0
    return plan_evaluations(self.segments, self.num_steps, guided_cost=1, plain_cost=0)


def make_plan(*, shape, path, parameterization, null_label, method, num_steps, use_cfg,
              use_classifier=False, sigma_schedule='constant', guidance_interval=None,
              return_trajectory=False, t_eps=DEFAULT_T_EPS, guidance_method='cfg'):
  """The `Plan` of a sampling call (arguments as `sampling.sample`'s; `use_cfg`, `use_classifier`
  as `uses_cfg` and `uses_classifier` decide them from w and w_c; `guidance_method` a
  `guidance.GuidanceMethod` or a method's name).

  Raises:
    ValueError: naming the argument and its allowed values.
  """
  paths_lib.check_choice('method', method, METHODS)
  paths_lib.check_choice('parameterization', parameterization, paths_lib.PARAMETERIZATIONS)
  paths_lib.check_choice('sigma_schedule', sigma_schedule, SIGMA_SCHEDULES)
  path = paths_lib.get_path(path)
  if (not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool)
      or num_steps < 1):
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
  _check_null_label(null_label)
  if not 0.0 < float(t_eps) < 0.5:
    raise ValueError(f't_eps must be in (0, 0.5), got {t_eps!r}.')
  interval = _checked_interval(guidance_interval)
  method_of_guidance = guidance.as_method(guidance_method)
  if method_of_guidance.guides_a_step and method not in CFG_PP_METHODS:
    raise ValueError(f"guidance_method='cfg_pp' runs with method in {CFG_PP_METHODS} (its step "
                     f"t → t' re-noises with u(x|∅)), got method={method!r}.")
  if method_of_guidance.zero_init_steps >= num_steps:
    raise ValueError(f'zero_star_init_steps={method_of_guidance.zero_init_steps} must be less '
                     f'than num_steps={num_steps} (the zero-init steps leave x unchanged).')
  t_start = start_time(parameterization, method, sigma_schedule, t_eps, use_classifier)
  grid = _concrete_grid(int(num_steps), t_start)
  return Plan(shape=tuple(int(d) for d in shape), path=path, parameterization=parameterization,
              null_label=int(null_label), method=method, num_steps=int(num_steps),
              sigma_schedule=sigma_schedule, use_cfg=bool(use_cfg),
              use_classifier=bool(use_classifier), grid=tuple(float(t) for t in grid),
              segments=cfg_plan(method, grid, interval, use_cfg or use_classifier,
                                first_step=method_of_guidance.zero_init_steps),
              num_frames=_num_frames(return_trajectory, int(num_steps)),
              guidance_method=method_of_guidance)


def _check_null_label(null_label):
  if (not isinstance(null_label, (int, np.integer)) or isinstance(null_label, bool)
      or null_label < 0):
    raise ValueError(f'null_label must be a non-negative integer (the number of classes), '
                     f'got {null_label!r}.')


def _checked_interval(guidance_interval):
  """`guidance_interval` as None or a (t_lo, t_hi) pair of floats in [0, 1]."""
  if guidance_interval is None:
    return None
  message = ('guidance_interval must be None or a pair (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, '
             f'got {guidance_interval!r}.')
  try:
    t_lo, t_hi = (float(v) for v in guidance_interval)
  except (TypeError, ValueError):
    raise ValueError(message) from None
  if not 0.0 <= t_lo <= t_hi <= 1.0:
    raise ValueError(message)
  return (t_lo, t_hi)


def check_values(*, null_label, guidance_scale, labels=None, classifier_scale=0.0,
                 classifier_labels=None, sigma=None):
  """Checks a call's values — w, w_c, σ, the labels' shape, dtype and range — where they are
  concrete (a tracer inside an outer jit is not inspected; shapes and dtypes always are).

  Raises:
    ValueError: naming the argument and what it must be.
  """
  _check_null_label(null_label)
  for name, scale in (('guidance_scale', guidance_scale), ('classifier_scale', classifier_scale)):
    if is_concrete(scale):
      value = np.asarray(scale, np.float64)
      if value.ndim > 1 or not np.all(np.isfinite(value)):
        raise ValueError(f'{name} must be a finite number (or a finite (B,) array), '
                         f'got {scale!r}.')
  if classifier_labels is not None:
    _check_labels('classifier_labels', classifier_labels, null_label - 1, 'classes 0..'
                  f'{null_label - 1}; the classifier has no null label')
  if sigma is not None and is_concrete(sigma):
    sigma_value = np.asarray(sigma, np.float64)
    if sigma_value.ndim != 0 or not np.isfinite(sigma_value) or sigma_value < 0:
      raise ValueError(f'sigma must be a finite number >= 0, got {sigma!r}.')
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
  if (is_concrete(labels) and np.size(labels)
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



def uses_cfg(guidance_scale, guidance_method='cfg'):
  """Whether `guidance_scale` needs the unconditional branch, i.e. the doubled batch [x; x]
  (autoguidance: the weak model beside the strong one).

  False only when w is known while tracing — a Python or NumPy number, or a concrete array — and
  is exactly 1 everywhere (plain conditional sampling, where CFG returns the conditional
  prediction exactly); a traced w (inside an outer jit) always runs the doubled batch. CFG++
  (`guidance_method` 'cfg_pp', its w is λ) always runs it: no λ gives the conditional model.
  """
  if guidance.as_method(guidance_method).guides_a_step:
    return True
  return not _known_to_equal(guidance_scale, 1.0)


def _known_to_equal(value, neutral):
  """Whether `value` is known while tracing (a Python or NumPy number, a concrete readable
  array) and equals `neutral` everywhere; a tracer or an unreadable array is not known."""
  if isinstance(value, jax.core.Tracer):
    return False
  if isinstance(value, jax.Array) and not (value.is_fully_addressable
                                           or value.is_fully_replicated):
    return False
  try:
    return bool(np.all(np.asarray(value, np.float64) == neutral))
  except (TypeError, ValueError):
    return False


def _concrete_grid(num_steps, t_start):
  """`time_grid` as a concrete array, also while tracing (the CFG plan is static)."""
  with jax.ensure_compile_time_eval():  # (a jnp grid, e.g. a test's patch, is concrete too)
    return np.asarray(time_grid(num_steps, t_start), np.float32)


def uses_classifier(classifier_fn, classifier_scale):
  """Whether the classifier term runs: a classifier is given and w_c is not known while tracing
  to be exactly 0 everywhere (then the term vanishes and the classifier is never evaluated)."""
  return classifier_fn is not None and not _known_to_equal(classifier_scale, 0.0)


def cfg_plan(method, grid, guidance_interval, use_cfg, first_step=0):
  """The sampler's static guidance pattern: which model evaluations are guided.

  Step i evaluates the model at grid[i] and, for Heun (all steps but the last), at grid[i + 1]
  (DPM-Solver++(2M) and UniPC evaluate once per step, at grid[i], like Euler).
  An evaluation is guided when `use_cfg` (any guidance term: CFG's doubled batch [x; x],
  classifier guidance's gradient) and its time lies in the closed `guidance_interval` (None:
  everywhere); otherwise only the conditional model runs — w = 1 and w_c = 0 there, where the
  guided field is the conditional one exactly, so the samples are those of guidance everywhere
  with `guidance.effective_scale`, at fewer evaluations.

  Args:
    method: one of `METHODS`.
    grid: the concrete (N + 1,) time grid.
    guidance_interval: None or (t_lo, t_hi).
    use_cfg: False when no guidance term runs (w = 1 known in Python and no classifier).
    first_step: the first step that runs (CFG-Zero*'s zero-init skips the steps before it).

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
              for i in range(first_step, num_steps)]
  if heun and len(patterns) > 1 and patterns[-1][0] == patterns[-2][0]:
    patterns[-1] = patterns[-2]  # join the previous segment; its lax.cond skips the 2nd eval
  segments = []
  for i, pattern in enumerate(patterns, start=first_step):
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


def frame_steps(num_steps, num_frames):
  return np.unique(np.round(np.linspace(0, num_steps, num_frames)).astype(np.int32))


