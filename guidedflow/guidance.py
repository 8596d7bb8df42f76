"""Classifier-free and classifier guidance: combining conditional and unconditional predictions."""

import dataclasses
import math

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
  cond, uncond = paired_predictions(model_fn, x, t, y, null_label=null_label, null_y=null_y)
  return cfg_combine(cond, uncond, guidance_scale)


def paired_predictions(model_fn, x, t, y, *, null_label, null_y=None):
  """(model(x, t, y), model(x, t, ∅)) from ONE model call on the doubled batch (arguments as
  `guided_prediction`'s), each of shape (B, ...)."""
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
  return prediction[:, 0], prediction[:, 1]


# ---- Guidance methods beyond CFG: static choices of the sampler's plan (`sampling_plan.Plan`).

GUIDANCE_METHODS = ('cfg', 'rescale', 'cfg_zero_star', 'apg', 'cfg_pp', 'autoguidance')


@dataclasses.dataclass(frozen=True)
class GuidanceMethod:
  """How a guided evaluation combines u_c = u(x|y) and u_∅ = u(x|∅); hashable, static.

  Every method combines **velocities** (each prediction converted by
  `path.velocity_from_prediction` first): rescale, CFG-Zero* and APG are not affine in the
  prediction, so velocity, score and noise space would give different fields, and velocity is
  flow matching's own. A guided score (Euler–Maruyama) is the guided velocity's
  (`path.score_from_prediction(ũ, x, t, 'velocity')`). Plain 'cfg' keeps `cfg_combine` in the
  model's parameterization (the same field, see there) and the sampler's program of before.
  Every method but CFG++ returns u_c exactly where w = 1, so w = 1 still runs the conditional
  batch alone. Two methods are not a combination of u_c and u_∅ at one time:

  - 'cfg_pp' (CFG++) reads w as its λ and guides a whole step t → t': the step's data prediction
    is the λ-guided one, its re-noising the unconditional noise prediction
    (`cfg_pp_velocity`), so it needs t' and both predictions at every λ (`sampling_plan`
    refuses it for Heun's second evaluation and for Euler–Maruyama).
  - 'autoguidance' replaces u_∅ by a weaker model's u_weak(x|y) (a second parameter set, passed
    to the sampler as `weak_model_fn`): u_weak + w (u_c − u_weak), in the model's
    parameterization (affine, like CFG: `autoguidance_combine`).

  Knobs are static: each value is its own compile. The field names are the
  `config.sampling.*` keys.

  Attributes:
    name: 'cfg' | 'rescale' | 'cfg_zero_star' | 'apg' | 'cfg_pp' | 'autoguidance'.
    rescale_phi: φ ∈ [0, 1] of guidance rescale (0: plain CFG).
    zero_star_optimized_scale: CFG-Zero*'s s* (False: s* = 1, plain CFG plus the zero-init).
    zero_star_init_steps: K ≥ 0, CFG-Zero*'s zero-init: the first K steps have zero velocity
      (x stays the initial noise; those steps evaluate nothing).
    apg_eta: η ≥ 0, APG's weight of Δ's part parallel to u_c (1: plain CFG).
    apg_norm_threshold: r ≥ 0, APG clips ‖Δ‖ to r per sample (0 or inf: no clipping).
    apg_momentum: β ∈ (−1, 1), APG's momentum Δ ← Δ + β Δ_prev carried across guided
      evaluations (β < 0 is the paper's reverse momentum; 0: none).
  """
  name: str = 'cfg'
  rescale_phi: float = 0.0
  zero_star_optimized_scale: bool = True
  zero_star_init_steps: int = 0
  apg_eta: float = 1.0
  apg_norm_threshold: float = 0.0
  apg_momentum: float = 0.0

  def __post_init__(self):
    if self.name not in GUIDANCE_METHODS:
      raise ValueError(f'guidance_method={self.name!r} is not one of {GUIDANCE_METHODS}.')
    checks = (
        ('rescale_phi', _is_number(self.rescale_phi) and 0.0 <= self.rescale_phi <= 1.0,
         'in [0, 1] (φ of guidance rescale: 0 is plain CFG), e.g. 0.7'),
        ('zero_star_optimized_scale', isinstance(self.zero_star_optimized_scale, bool),
         'True (s* of CFG-Zero*) or False (s* = 1), e.g. True'),
        ('zero_star_init_steps', isinstance(self.zero_star_init_steps, int)
         and not isinstance(self.zero_star_init_steps, bool) and self.zero_star_init_steps >= 0,
         'an integer >= 0 (steps of zero velocity at the start), e.g. 1'),
        ('apg_eta', _is_number(self.apg_eta) and math.isfinite(self.apg_eta)
         and self.apg_eta >= 0, 'a finite number >= 0 (1 is plain CFG), e.g. 0'),
        ('apg_norm_threshold', _is_number(self.apg_norm_threshold)
         and self.apg_norm_threshold >= 0, 'a number >= 0 (0: no clipping), e.g. 4'),
        ('apg_momentum', _is_number(self.apg_momentum) and -1 < self.apg_momentum < 1,
         'in (-1, 1) (0: none; < 0 reverse momentum), e.g. -0.5'))
    for key, ok, fix in checks:
      if not ok:
        requirement, example = fix.rsplit(', e.g. ', 1)
        raise ValueError(f'{key}={getattr(self, key)!r} must be {requirement}, e.g. '
                         f'{key}={example}')

  @classmethod
  def from_config(cls, sampling_config):
    """The method of a config's `sampling` section: `guidance_method` and the knobs, whose keys
    are the field names."""
    knobs = {field.name: sampling_config[field.name] for field in dataclasses.fields(cls)
             if field.name != 'name'}
    return cls(name=sampling_config.guidance_method, **knobs)

  @property
  def zero_init_steps(self):
    """Steps at the start of the grid whose velocity is zero (CFG-Zero*'s K, else 0)."""
    return self.zero_star_init_steps if self.name == 'cfg_zero_star' else 0

  @property
  def clips(self):
    return self.name == 'apg' and 0 < self.apg_norm_threshold < math.inf

  @property
  def guides_a_step(self):
    """Whether the guided field depends on the step's end t' too (CFG++)."""
    return self.name == 'cfg_pp'

  @property
  def uses_weak_model(self):
    """Whether guided evaluations run a weaker model in ∅'s place (autoguidance)."""
    return self.name == 'autoguidance'

  @property
  def has_momentum(self):
    """Whether the method carries state across evaluations (APG with β ≠ 0)."""
    return self.name == 'apg' and self.apg_momentum != 0


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def as_method(method):
  """A `GuidanceMethod` from one or from a method's name (its knobs neutral)."""
  return method if isinstance(method, GuidanceMethod) else GuidanceMethod(name=method)


def _sample_sum(a):
  """Per-sample sum over every axis but the first, kept for broadcasting: (B, 1, ...)."""
  return jnp.sum(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def _sample_std(a):
  mean = jnp.mean(a, axis=tuple(range(1, a.ndim)), keepdims=True)
  return jnp.sqrt(jnp.mean(jnp.square(a - mean), axis=tuple(range(1, a.ndim)), keepdims=True))


def rescale_combine(cond, uncond, guidance_scale, phi):
  """Guidance rescale (Lin et al. 2024): ũ_cfg's per-sample std rescaled to u_c's, mixed by φ.

  ũ = φ ũ_cfg std(u_c)/std(ũ_cfg) + (1 − φ) ũ_cfg, ũ_cfg = `cfg_combine`; φ = 0 returns ũ_cfg
  exactly. The std is over each sample's elements (a sample whose ũ_cfg is constant keeps it).
  """
  guided = cfg_combine(cond, uncond, guidance_scale)
  std_guided = _sample_std(guided)
  ratio = jnp.where(std_guided > 0, _sample_std(cond) / jnp.where(std_guided > 0, std_guided, 1),
                    1.0)
  return phi * (guided * ratio) + (1.0 - phi) * guided


def cfg_zero_star_combine(cond, uncond, guidance_scale, optimized_scale=True):
  """CFG-Zero* (Fan et al. 2025): ũ = s* u_∅ + w (u_c − s* u_∅), s* = ⟨u_c, u_∅⟩/‖u_∅‖² per sample.

  s* is the least-squares scale of u_∅ onto u_c (u_c − s* u_∅ ⟂ u_∅); a sample with u_∅ = 0
  takes s* = 1. `optimized_scale=False` fixes s* = 1 (the same field as CFG). The zero-init of
  the first steps is the sampler's (`GuidanceMethod.zero_init_steps`).
  """
  w = per_sample(guidance_scale, cond)
  if optimized_scale:
    norm2 = _sample_sum(jnp.square(uncond))
    scale = jnp.where(norm2 > 0, _sample_sum(cond * uncond) / jnp.where(norm2 > 0, norm2, 1), 1.0)
    uncond = scale * uncond
  return uncond + w * (cond - uncond)


def apg_combine(cond, uncond, guidance_scale, *, eta=1.0, norm_threshold=0.0, momentum=0.0,
                running=None):
  """Adaptive projected guidance (Sadat et al. 2024), per sample.

  Δ = u_c − u_∅; with momentum, Δ ← Δ + β Δ_prev (`running`, the previous result); ‖Δ‖ clipped
  to r (`norm_threshold` > 0); Δ split into Δ_∥ = (⟨Δ, u_c⟩/‖u_c‖²) u_c and Δ_⟂ = Δ − Δ_∥;
  ũ = u_c + (w − 1)(Δ_⟂ + η Δ_∥). η = 1, r = 0 (or ∞), β = 0 is plain CFG.

  Returns:
    (ũ, the Δ after momentum, before clipping: the next call's `running`).
  """
  w = per_sample(guidance_scale, cond)
  diff = cond - uncond
  if running is not None:
    diff = diff + momentum * running
  carried = diff
  if 0 < norm_threshold < math.inf:
    norm = jnp.sqrt(_sample_sum(jnp.square(diff)))
    diff = diff * jnp.minimum(1.0, norm_threshold / jnp.where(norm > 0, norm, 1.0))
  norm2 = _sample_sum(jnp.square(cond))
  parallel = (jnp.where(norm2 > 0, _sample_sum(diff * cond) / jnp.where(norm2 > 0, norm2, 1), 0.0)
              * cond)
  update = (diff - parallel) + eta * parallel
  return cond + (w - 1.0) * update, carried


def cfg_pp_scale(guidance_scale, path, t, t_next):
  """The CFG scale w of CFG++'s step t → t' at its λ (`guidance_scale`): in DDIM form
  (`cfg_pp_velocity`) the CFG++ step at λ is the CFG step at

      w = λ α(t') β(t) / (α(t') β(t) − α(t) β(t')),

  (the denominator is > 0 for t < t'). It grows as 1/h with the step h = t' − t (≈ λ αβ/(h W_t),
  W = α̇β − αβ̇; λ t'(1 − t)/h on the linear path, up to ≈ λ/(4h) at t = 1/2), so the strength of
  a λ depends on the grid. w = λ on a step from t = 0 or to t' = 1.
  """
  alpha, beta = path.alpha(t), path.beta(t)
  alpha_next, beta_next = path.alpha(t_next), path.beta(t_next)
  return guidance_scale * (alpha_next * beta) / (alpha_next * beta - alpha * beta_next)


def cfg_pp_velocity(cond, uncond, x, t, t_next, guidance_scale, path, *, data_form=False):
  """CFG++ (Chung et al. 2024) in flow form, for the step t → t' (scalars) from x (B, ...).

  The step is DDIM's with the data prediction of the λ-guided velocity and the unconditional
  noise prediction, each from the path's own conversions (`x_hat_from_velocity`,
  `noise_from_velocity`):

      x' = α(t') x̂1(ũ_λ) + β(t') x̂0(u_∅),   ũ_λ = `cfg_combine`(u_c, u_∅, λ).

  Returned as the velocity that gives that x' to the sampler's own step: with `data_form=False`,
  v = (x' − x)/(t' − t), for Euler's x + h v (written with x = α x̂1(u_∅) + β x̂0(u_∅), so no
  O(1) term is divided by h); with `data_form=True`, the CFG velocity at
  `cfg_pp_scale`'s w, whose data prediction D makes the first-order data-prediction step
  (β'/β) x + (α' − α β'/β) D (DPM-Solver++, UniPC) that same x' (their second-order terms then
  extrapolate those D). λ = 0 is the unconditional model's DDIM step (plain CFG at w = 0: on
  the linear path, where DDIM is Euler, exactly that); no λ gives the conditional model.

  Args:
    cond, uncond: u_c and u_∅, velocities (B, ...).
    x: the states at t. t, t_next: the step's times, 0 <= t < t_next <= 1.
    guidance_scale: λ, a scalar or per-sample (B,).
    path: the `paths.GaussianPath`.
    data_form: which step the velocity is for (above).
  """
  lam = per_sample(guidance_scale, cond)
  if data_form:
    return cfg_combine(cond, uncond, cfg_pp_scale(lam, path, t, t_next))
  data_uncond = path.x_hat_from_velocity(uncond, x, t)
  data_guided = path.x_hat_from_velocity(cfg_combine(cond, uncond, lam), x, t)
  noise_uncond = path.noise_from_velocity(uncond, x, t)
  alpha_next = path.alpha(t_next)
  return ((alpha_next - path.alpha(t)) * data_uncond
          + (path.beta(t_next) - path.beta(t)) * noise_uncond
          + alpha_next * (data_guided - data_uncond)) / (t_next - t)


def autoguidance_combine(cond, weak, guidance_scale):
  """Autoguidance (Karras et al. 2024): D_weak + w (D − D_weak), D_weak a weaker model's
  prediction with the same labels.

  Affine with weights summing to 1, so valid in any parameterization (as `cfg_combine`).
  Written as a difference so that a weak model equal to the strong one gives `cond` bit for
  bit at every w; at w = 1 the sampler runs the strong model alone (its plan), so that is
  `cond` exactly too.
  """
  return weak + per_sample(guidance_scale, cond) * (cond - weak)


def initial_state(method, x):
  """The guidance state carried across the sampler's evaluations: APG's momentum buffer (zeros
  of x's shape) where `method.has_momentum`, else None (no state, nothing carried)."""
  return jnp.zeros_like(x) if method.has_momentum else None


def guided_velocity(method, cond, uncond, guidance_scale, state=None):
  """`method`'s guided velocity from u_c, u_∅ (each (B, ...)): (ũ, next state).

  `state` is `initial_state`'s (updated here at every guided evaluation); 'cfg' is
  `cfg_combine`. CFG++ and autoguidance are not combinations of u_c and u_∅ at one time: see
  `cfg_pp_velocity` and `autoguidance_combine`.
  """
  if method.guides_a_step or method.uses_weak_model:
    raise ValueError(f'guidance_method={method.name!r} is not a combination of u_c and u_∅: '
                     'use cfg_pp_velocity or autoguidance_combine.')
  if method.name == 'rescale':
    return rescale_combine(cond, uncond, guidance_scale, method.rescale_phi), state
  if method.name == 'cfg_zero_star':
    return cfg_zero_star_combine(cond, uncond, guidance_scale,
                                 method.zero_star_optimized_scale), state
  if method.name == 'apg':
    guided, running = apg_combine(cond, uncond, guidance_scale, eta=method.apg_eta,
                                  norm_threshold=method.apg_norm_threshold,
                                  momentum=method.apg_momentum, running=state)
    return guided, running if method.has_momentum else None
  return cfg_combine(cond, uncond, guidance_scale), state


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
