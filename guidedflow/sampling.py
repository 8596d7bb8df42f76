"""ODE and SDE samplers (Euler, Heun, Euler–Maruyama; DPM-Solver++(2M), UniPC from `solvers`) with
classifier-free and classifier guidance and the guidance methods beyond CFG (`guidance.GuidanceMethod`), in lax.scan.

`integrate(plan, ...)` is the sampler: a pure function of the model, the keys, labels and
scales for one static `sampling_plan.Plan` (checked once, before tracing), compiled by its
caller (the `Sampler` compiles it into its one program per plan). `sample(...)` is the
stand-alone entry point: it decides and checks the plan, checks the values, and compiles.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import guidance
from guidedflow import paths as paths_lib
from guidedflow import sampling_plan
from guidedflow import solvers
# The plan's names, where callers look for them.
from guidedflow.sampling_plan import CFG_PP_METHODS  # noqa: F401
from guidedflow.sampling_plan import DEFAULT_T_EPS  # noqa: F401
from guidedflow.sampling_plan import GUIDANCE_MODES  # noqa: F401
from guidedflow.sampling_plan import METHODS  # noqa: F401
from guidedflow.sampling_plan import SIGMA_SCHEDULES
from guidedflow.sampling_plan import TRAJECTORY_FRAMES  # noqa: F401
from guidedflow.sampling_plan import start_time  # noqa: F401
from guidedflow.sampling_plan import time_grid  # noqa: F401
from guidedflow.sampling_plan import uses_cfg  # noqa: F401


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



def _make_step(fields, *, path, method, sigma_schedule, sigma, num_steps):
  """step(key, x, state, i, t, t_next, pattern) -> (key, x, state): one step with a segment's
  pattern.

  `pattern` = (guided_at_t, guided_at_t_next, ends_at_last) is static; `fields(x, t, guided,
  with_score, state, t_next)` gives the (guided where `guided`) velocity, with `with_score` the score,
  and the guidance state (APG's momentum; None for every other method). Euler–Maruyama splits
  the key on every step whatever the pattern, so the noise does not depend on the segments.
  """
  last = num_steps - 1

  def velocity(x, t, guided, state, t_next=None):
    u, _, state = fields(x, t, guided, False, state, t_next=t_next)
    return u, state

  def step(key, x, state, i, t, t_next, pattern):
    guided_at_t, guided_at_t_next, ends_at_last = pattern
    h = t_next - t
    if method == 'euler':  # (CFG++'s velocity is that of this step, t → t_next)
      u, state = velocity(x, t, guided_at_t, state, t_next)
      return key, x + h * u, state
    if method == 'heun':
      k1, state = velocity(x, t, guided_at_t, state)
      x_euler = x + h * k1
      if guided_at_t_next is None:  # a lone last step
        return key, x_euler, state

      def corrected():
        half_h = 0.5 * h  # (traced before k2, as it always was: the same program as before)
        k2, next_state = velocity(x_euler, t_next, guided_at_t_next, state)
        return x + half_h * (k1 + k2), next_state

      if not ends_at_last:
        return (key,) + corrected()
      # The last step stays Euler (as in EDM) so the model is never evaluated at t = 1, where
      # beta = 0 makes score/noise conversions singular; the order stays 2 (one O(h²) step).
      return (key,) + jax.lax.cond(i < last, corrected, lambda: (x_euler, state))
    key, key_noise = jax.random.split(key)
    u, s, state = fields(x, t, guided_at_t, True, state)
    # The last step is deterministic, so the sample at t = 1 carries no fresh noise.
    diffusion = jnp.where(i < last, diffusion_coefficient(
        t, path=path, sigma_schedule=sigma_schedule, sigma=sigma), 0.0)
    noise = jax.random.normal(key_noise, x.shape, x.dtype)
    return key, x + h * sde_drift(u, s, diffusion) + diffusion * jnp.sqrt(h) * noise, state

  return step


def _make_fields(model_fn, classifier_fn, labels, classifier_labels, guidance_scale,
                 classifier_scale, *, path, parameterization, null_label, use_cfg,
                 null_labels=None, guidance_method=guidance.GuidanceMethod()):
  """fields(x, t, guided, with_score) -> (ũ, s̃ or None) at the scalar time t, for a method
  without state (`_make_stateful_fields` with no state)."""
  stateful = _make_stateful_fields(
      model_fn, classifier_fn, labels, classifier_labels, guidance_scale, classifier_scale,
      path=path, parameterization=parameterization, null_label=null_label, use_cfg=use_cfg,
      null_labels=null_labels, guidance_method=guidance_method)
  return lambda x, t, guided, with_score: stateful(x, t, guided, with_score, None)[:2]


def _make_stateful_fields(model_fn, classifier_fn, labels, classifier_labels, guidance_scale,
                          classifier_scale, *, path, parameterization, null_label, use_cfg,
                          null_labels, guidance_method, weak_model_fn=None, data_form=False):
  """fields(x, t, guided, with_score, state, t_next=None) -> (ũ, s̃ or None, state) at the scalar
  time t.

  Guided evaluations run CFG's doubled batch when `use_cfg`, combined by `guidance_method`
  (plain CFG in the model's parameterization; every other method in velocity space, the guided
  score then the guided velocity's, see `guidance.GuidanceMethod`; `state` is its
  `guidance.initial_state`), and add the classifier term when `classifier_fn` is given:
  ũ = u + w_c b_t ∇log p_t(y|x), s̃ = s + w_c ∇log p_t(y|x), the gradient by `jax.grad` of the
  summed log-softmax (`guidance.grad_log_prob_from_logits`). Autoguidance runs `model_fn` and
  `weak_model_fn` on the batch (two calls) and combines them in the model's parameterization;
  CFG++ needs the step's end `t_next` and gives the velocity of the step `data_form` says
  (`guidance.cfg_pp_velocity`).
  """
  batch = jax.tree_util.tree_leaves(labels)[0].shape[0]
  grad_log_prob = (guidance.grad_log_prob_from_logits(classifier_fn)
                   if classifier_fn is not None else None)

  def combined_velocity(x, t, t_next, state):
    """The guided velocity of a method that combines velocities (not CFG, not autoguidance)."""
    to_velocity = lambda p: path.velocity_from_prediction(p, x, t, parameterization)  # pylint: disable=unnecessary-lambda-assignment
    cond, uncond = guidance.paired_predictions(model_fn, x, t, labels, null_label=null_label,
                                               null_y=null_labels)
    cond, uncond = to_velocity(cond), to_velocity(uncond)
    if guidance_method.guides_a_step:
      return guidance.cfg_pp_velocity(cond, uncond, x, t, t_next, guidance_scale, path,
                                      data_form=data_form), state
    return guidance.guided_velocity(guidance_method, cond, uncond, guidance_scale, state)

  def fields(x, t, guided, with_score, state, t_next=None):
    times = jnp.full((batch,), t, x.dtype)
    velocity = None
    if not (guided and use_cfg):
      prediction = model_fn(x, times, labels)
    elif guidance_method.name == 'cfg':
      prediction = guidance.guided_prediction(model_fn, x, t, labels, null_label=null_label,
                                              guidance_scale=guidance_scale, null_y=null_labels)
    elif guidance_method.uses_weak_model:
      prediction = guidance.autoguidance_combine(
          model_fn(x, times, labels), weak_model_fn(x, times, labels), guidance_scale)
    else:
      velocity, state = combined_velocity(x, t, t_next, state)
    if velocity is None:
      u = path.velocity_from_prediction(prediction, x, t, parameterization)
      s = path.score_from_prediction(prediction, x, t, parameterization) if with_score else None
    else:
      u = velocity
      s = path.score_from_prediction(u, x, t, 'velocity') if with_score else None
    if guided and grad_log_prob is not None:
      term = guidance.per_sample(classifier_scale, x) * grad_log_prob(x, times, classifier_labels)
      _, b = path.velocity_coefficients(t)
      u = u + b * term
      s = s + term if with_score else None
    return u, s, state

  return fields


def integrate(plan, model_fn, classifier_fn, key, labels, classifier_labels, guidance_scale,
              classifier_scale, sigma, null_labels=None, weak_model_fn=None):
  """The sampler for `plan`: integrates from noise (t = grid[0]) to data (t = 1), one
  `lax.scan` per segment of the plan. Pure and not compiled: the caller jits it (with `plan`
  static). No argument is checked here: `sampling_plan.make_plan` and `check_values` did.

  Args: as `sample`'s; `classifier_fn` None unless `plan.use_classifier`; `weak_model_fn` None
    unless the plan's method is autoguidance.

  Returns:
    (samples float32 (B, *shape), info) with info['time_grid'] and, with frames,
    info['trajectory'] (F, B, *shape) and info['trajectory_time'] (F,).
  """
  batch, num_steps = jax.tree_util.tree_leaves(labels)[0].shape[0], plan.num_steps
  grid = np.asarray(plan.grid, np.float32)
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, (batch,) + plan.shape, jnp.float32)  # p_init at t = grid[0]
  multistep = plan.method in solvers.MULTISTEP_METHODS
  fields = _make_stateful_fields(
      model_fn, classifier_fn if plan.use_classifier else None, labels, classifier_labels,
      guidance_scale, classifier_scale, path=plan.path, parameterization=plan.parameterization,
      null_label=plan.null_label, use_cfg=plan.use_cfg, null_labels=null_labels,
      guidance_method=plan.guidance_method, weak_model_fn=weak_model_fn, data_form=multistep)
  # CFG-Zero*'s zero-init: steps 0..K − 1 leave x as it is and evaluate nothing (no segment).
  zero_steps = plan.guidance_method.zero_init_steps
  if multistep:  # the scan state carries the previous data prediction too
    step = solvers.make_step(fields, path=plan.path, method=plan.method, grid=grid,
                             first_step=zero_steps)
  else:
    step = _make_step(fields, path=plan.path, method=plan.method,
                      sigma_schedule=plan.sigma_schedule, sigma=sigma, num_steps=num_steps)
  num_frames = plan.num_frames
  frame_steps = (sampling_plan.frame_steps(num_steps, num_frames) if num_frames
                 else np.zeros(0, np.int32))
  slot_of_step = np.full(num_steps + 1, -1, np.int32)
  slot_of_step[frame_steps] = np.arange(len(frame_steps), dtype=np.int32)
  trajectory = jnp.zeros((len(frame_steps),) + x.shape, x.dtype)
  if num_frames:
    trajectory = trajectory.at[0].set(x)
    for slot in slot_of_step[1:zero_steps + 1]:
      if slot >= 0:
        trajectory = trajectory.at[slot].set(x)
  if plan.method == 'euler_maruyama':  # the later steps draw the noise they draw with K = 0
    for _ in range(zero_steps):
      key_steps, _ = jax.random.split(key_steps)

  def body(pattern, carry, inputs):
    key, x, state, trajectory = carry
    i, t, t_next, slot = inputs
    key, x, state = step(key, x, state, i, t, t_next, pattern)
    if num_frames:
      index = jnp.maximum(slot, 0)
      trajectory = trajectory.at[index].set(jnp.where(slot >= 0, x, trajectory[index]))
    return (key, x, state, trajectory), None

  state = guidance.initial_state(plan.guidance_method, x)
  if multistep:
    state = solvers.initial_state(state, x, plan.method)
  carry = (key_steps, x, state, trajectory)
  for start, stop, guided_at_t, guided_at_t_next in plan.segments:
    pattern = (guided_at_t, guided_at_t_next, stop == num_steps)
    inputs = (jnp.arange(start, stop), grid[start:stop], grid[start + 1:stop + 1],
              jnp.asarray(slot_of_step[start + 1:stop + 1]))
    carry, _ = jax.lax.scan(functools.partial(body, pattern), carry, inputs)
  _, x, _, trajectory = carry
  info = {'time_grid': grid}
  if num_frames:
    info['trajectory'] = trajectory
    info['trajectory_time'] = grid[frame_steps]
  return x, info


def _is_plain_callable(fn):
  """A callable that is its own one pytree leaf (not a `jax.tree_util.Partial` of arrays)."""
  leaves = jax.tree_util.tree_leaves(fn)
  return len(leaves) == 1 and leaves[0] is fn


_integrate_traced_model = jax.jit(integrate, static_argnames=('plan',))
_integrate_static_model = jax.jit(integrate, static_argnames=('plan', 'model_fn'))


def sample(model_fn, key, labels, *, shape, path, parameterization, null_label, guidance_scale,
           method, num_steps, sigma_schedule='constant', sigma=0.0, guidance_interval=None,
           return_trajectory=False, t_eps=DEFAULT_T_EPS, classifier_fn=None,
           classifier_scale=0.0, classifier_labels=None, null_labels=None, guidance_method='cfg',
           weak_model_fn=None):
  """Draws samples from the guided model by integrating from noise (t = 0) to data (t = 1).

  Integrates over the uniform grid `time_grid(num_steps, start_time(...))` in `lax.scan`. A
  model evaluation with guidance is a CFG call on the doubled batch (each x with y and with ∅),
  combined with `guidance.cfg_combine`; the prediction is converted to velocity (and, for
  Euler–Maruyama, score) with the path's formulas. No method evaluates the model at t = 1: Euler
  and Euler–Maruyama evaluate at the left end of each step and Heun's last step is an Euler
  step; Euler–Maruyama's last step is deterministic (sigma = 0); DPM-Solver++(2M) and UniPC
  evaluate at the left end too and their last step returns the data prediction there.

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

  Compilation: one compile per `sampling_plan.Plan` (shape, path, parameterization, method,
  num_steps, sigma_schedule, guidance interval, frames, and whether w is the Python 1) and batch. `key`, `labels`, `guidance_scale` and `sigma` are traced, so changing them does not
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
    method: 'euler' | 'heun' | 'euler_maruyama' | 'dpmpp_2m' | 'unipc' (DPM-Solver++(2M) and
      UniPC(bh2, order 2) on the guided data prediction, one evaluation per step; their first
      and last steps are first order, the last lands on x̂ at t_{N−1}: see `solvers`).
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
    null_labels: what takes ∅'s place in CFG, a pytree like `labels`; with it `labels` may be
      any pytree of (B, ...) arrays the model takes (a text model's condition; its null
      condition or a negative prompt here). None: `labels` with every label ∅.
    guidance_method: how guided evaluations combine u(x|y) and u(x|∅): a
      `guidance.GuidanceMethod` (its knobs) or a name, 'cfg' | 'rescale' | 'cfg_zero_star' |
      'apg' | 'cfg_pp' | 'autoguidance' (neutral knobs). Every method but 'cfg' and
      'autoguidance' combines velocities; static (a compile per method and knob values);
      CFG-Zero*'s zero-init steps evaluate nothing (see `info['nfe']`). 'cfg_pp' reads
      `guidance_scale` as CFG++'s λ (`guidance.cfg_pp_velocity`; Euler, DPM-Solver++(2M) and
      UniPC only) and evaluates u(x|∅) at every λ.
    weak_model_fn: autoguidance's weaker model, (x, t, y) -> prediction like `model_fn`'s (the
      same parameterization), run on the batch beside `model_fn` at every guided evaluation
      (NFE 2, as CFG); a pytree callable (`jax.tree_util.Partial(apply, weak_params)`) is
      traced, so its weights are an argument of the compiled program, a plain callable static.

  Returns:
    (samples float32 (B, *shape), info) with info['nfe'] (the generator evaluations per sample
    this call runs, doubled CFG batches counting 2; a Python int; see `cfg_plan`),
    info['classifier_nfe'] (the classifier's passes per sample, one per guided evaluation;
    each is a forward and its backward, `jax.grad`), info['time_grid']
    ((N + 1,) times) and, with `return_trajectory`, info['trajectory'] (F, B, *shape) and
    info['trajectory_time'] (F,).
  """
  use_classifier = sampling_plan.uses_classifier(classifier_fn, classifier_scale)
  if use_classifier and classifier_labels is None:
    classifier_labels = labels
  plan = sampling_plan.make_plan(
      shape=shape, path=path, parameterization=parameterization, null_label=null_label,
      method=method, num_steps=num_steps, use_cfg=uses_cfg(guidance_scale, guidance_method),
      use_classifier=use_classifier, sigma_schedule=sigma_schedule,
      guidance_interval=guidance_interval, return_trajectory=return_trajectory, t_eps=t_eps,
      guidance_method=guidance_method)
  structured = null_labels is not None  # a pytree condition, its ∅ given
  sampling_plan.check_values(
      null_label=null_label, guidance_scale=guidance_scale,
      labels=None if structured else labels, classifier_scale=classifier_scale,
      classifier_labels=classifier_labels if use_classifier else None, sigma=sigma)
  if plan.guidance_method.uses_weak_model and plan.use_cfg and weak_model_fn is None:
    raise ValueError("guidance_method='autoguidance' needs weak_model_fn, the weaker model that "
                     "takes u(x|∅)'s place.")
  if not (plan.guidance_method.uses_weak_model and plan.use_cfg):
    weak_model_fn = None
  elif _is_plain_callable(weak_model_fn):  # static, hashed by identity
    weak_model_fn = jax.tree_util.Partial(weak_model_fn)
  labels = jax.tree.map(jnp.asarray, labels)
  if use_classifier:
    if _is_plain_callable(classifier_fn):  # static
      classifier_fn = jax.tree_util.Partial(classifier_fn)
    classifier_labels = jnp.asarray(classifier_labels)
  else:
    classifier_fn, classifier_labels = None, labels
  arrays = dict(key=key, labels=labels, classifier_labels=classifier_labels,
                guidance_scale=jnp.asarray(guidance_scale, jnp.float32),
                classifier_scale=jnp.asarray(classifier_scale, jnp.float32),
                sigma=jnp.asarray(sigma, jnp.float32),
                null_labels=jax.tree.map(jnp.asarray, null_labels) if structured else None,
                weak_model_fn=weak_model_fn)
  leaves = jax.tree_util.tree_leaves(model_fn)
  if not sampling_plan.is_concrete((model_fn, classifier_fn, arrays)):
    samples, info = integrate(plan, model_fn, classifier_fn, **arrays)  # inside the caller's jit
  elif len(leaves) == 1 and leaves[0] is model_fn:
    samples, info = _integrate_static_model(plan=plan, model_fn=model_fn,
                                            classifier_fn=classifier_fn, **arrays)
  else:
    samples, info = _integrate_traced_model(plan=plan, model_fn=model_fn,
                                            classifier_fn=classifier_fn, **arrays)
  info['nfe'], info['classifier_nfe'] = plan.nfe, plan.classifier_nfe
  return samples, info
