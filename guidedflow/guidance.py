"""Classifier-free and classifier guidance: combining conditional and unconditional predictions."""

import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import paths as paths_lib


def per_sample(value, like):
  """Broadcasts a scalar or per-sample (B,) value against `like` of shape (B, ...)."""
  value = jnp.asarray(value, like.dtype)
  if value.ndim == 1 and like.ndim > 1:
    value = jnp.reshape(value, value.shape + (1,) * (like.ndim - 1))
  return value


def cfg_combine(cond, uncond, guidance_scale):
  """Classifier-free guidance: (1 − w) uncond + w cond.

  Valid in velocity, score and noise space alike: the conversions between them are affine in the
  prediction with coefficients that do not depend on y, and (1 − w) + w = 1, so combining and
  then converting equals converting and then combining. w = 1 returns `cond` exactly.

  Args:
    cond: prediction with the labels y, shape (B, ...).
    uncond: prediction with the null label, shape (B, ...).
    guidance_scale: w, a scalar or per-sample (B,).

  Returns:
    The guided prediction, shape (B, ...).
  """
  w = per_sample(guidance_scale, cond)
  return (1.0 - w) * uncond + w * cond


def guided_prediction(model_fn, x, t, y, *, null_label, guidance_scale, null_y=None):
  """CFG prediction from ONE model call on the doubled batch: x with labels y and with ∅.

  Args:
    model_fn: (x, t, y) -> prediction of x's shape; t has shape (2B,).
    x: (B, ...) states.
    t: scalar or (B,) times.
    y: (B,) int labels (may already hold the null label), or a pytree of (B, ...) arrays (a
      text condition).
    null_label: the index of ∅ (= number of classes).
    guidance_scale: w, scalar or (B,).
    null_y: what takes ∅'s place, a pytree like `y` (a text model's null condition, or a
      negative prompt); None: `y` with every label ∅.

  Returns:
    (1 − w) model(x, t, ∅) + w model(x, t, y), shape (B, ...). Costs 2 evaluations per sample.
  """
  batch = x.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (batch,))
  if null_y is None:
    y = jnp.asarray(y)
    null_y = jnp.full_like(y, null_label)
  # Each sample's conditional row is next to its unconditional one, (x_i, y_i), (x_i, ∅): a
  # batch split over devices keeps both rows of its samples (with [x; x] halves the rows would
  # move between devices on the way in and out).
  pair = lambda a, b: jnp.stack([a, b], axis=1).reshape((2 * batch,) + a.shape[1:])  # pylint: disable=unnecessary-lambda-assignment
  prediction = model_fn(pair(x, x), pair(t, t), jax.tree.map(pair, y, null_y))
  prediction = prediction.reshape((batch, 2) + prediction.shape[1:])
  cond, uncond = prediction[:, 0], prediction[:, 1]
  return cfg_combine(cond, uncond, guidance_scale)


def guidance_active(t, interval):
  """Whether guidance applies at time(s) t: inside the closed `interval` = (t_lo, t_hi).

  The bounds are compared in t's float dtype (float32 for the sampler's grid), so the sampler's
  static plan (`sampling_plan.cfg_plan`, on the concrete grid) and `effective_scale` (traced) agree
  at the boundaries. `interval=None` means everywhere. Host (numpy) times give a numpy answer,
  computed without a device.
  """
  xp = np if isinstance(t, (np.ndarray, np.generic, float, int)) else jnp
  t = xp.asarray(t)
  if not xp.issubdtype(t.dtype, xp.floating):
    t = t.astype(xp.float32)
  if interval is None:
    return xp.ones(t.shape, bool)
  t_lo, t_hi = (xp.asarray(v, t.dtype) for v in interval)
  return (t >= t_lo) & (t <= t_hi)


def effective_scale(guidance_scale, t, interval):
  """Guidance scale at time t when guidance applies only on `interval` = (t_lo, t_hi).

  Outside the closed interval the scale is 1 (plain conditional). Times follow our convention
  (t = 0 noise, t = 1 data); guidance-interval papers that count noise levels the other way must
  be flipped (t ↦ 1 − t). `interval=None` returns `guidance_scale` unchanged. The sampler does not
  call this: it skips the unconditional half outside the interval (`sampling_plan.cfg_plan`), which
  gives the same samples with fewer model evaluations.
  """
  if interval is None:
    return guidance_scale
  return jnp.where(guidance_active(t, interval), jnp.asarray(guidance_scale, jnp.float32), 1.0)


def classifier_guided_velocity(u, t, x, y, grad_log_prob_fn, w, path):
  """Classifier guidance: ũ = u(x) + w b_t ∇_x log p_t(y|x).

  To sample with it, wrap an unconditional velocity model as
  `lambda x, t, y: classifier_guided_velocity(model(x, t, full(∅)), t, x, y, grad_fn, w, path)`
  and call `sampling.sample` with `guidance_scale=1.0`, `parameterization='velocity'` (the
  guidance then lives in the model function, the sampler is shared).

  Args:
    u: unconditional velocity u_t(x), shape (B, ...).
    t: scalar or (B,) times in (0, 1] (b_t blows up at t = 0).
    x: (B, ...) states.
    y: (B,) int labels.
    grad_log_prob_fn: (x, t, y) -> ∇_x log p_t(y|x), shape of x; see `grad_log_prob_from_logits`.
    w: guidance scale (scalar or (B,)).
    path: a GaussianPath or schedule name.

  Returns:
    The guided velocity, shape (B, ...).
  """
  path = paths_lib.get_path(path)
  _, b = path.velocity_coefficients(paths_lib.expand_time(t, x))
  return u + per_sample(w, u) * b * grad_log_prob_fn(x, t, y)


def grad_log_prob_from_logits(logits_fn):
  """Turns a time-conditioned classifier (x, t) -> logits (B, K) into (x, t, y) -> ∇_x log p_t(y|x).

  Samples are independent, so the gradient of the batch sum is the per-sample gradient.
  """

  def grad_fn(x, t, y):
    def total_log_prob(x):
      log_probs = jax.nn.log_softmax(logits_fn(x, t), axis=-1)
      return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

    return jax.grad(total_log_prob)(x)

  return grad_fn
