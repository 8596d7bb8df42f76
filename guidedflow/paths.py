"""Gaussian probability paths x_t = alpha_t z + beta_t eps and conversions between predictions."""

import abc
import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp

SCHEDULES = ('linear', 'cosine', 'vp')
PARAMETERIZATIONS = ('velocity', 'score', 'noise')


def check_choice(argument: str, value: Any, allowed: Sequence[str]) -> None:
  """Raises ValueError naming `argument` and the `allowed` values unless `value` is one of them."""
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f'{argument} must be one of {tuple(allowed)}, got {value!r}.')


def _as_float(t):
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.floating):
    t = t.astype(jnp.float32)
  return t


def expand_time(t, x):
  """Broadcasts a time of shape () or (B,) against `x` of shape (B, ...) (appends unit axes)."""
  t = _as_float(t)
  x = jnp.asarray(x)
  if t.ndim == 0 or t.ndim == x.ndim:
    return t
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


class GaussianPath(abc.ABC):
  """Base class: x_t = alpha_t z + beta_t eps, t = 0 noise, t = 1 data.

  Subclasses define `alpha`, `beta`, `alpha_dot`, `beta_dot` (analytic, elementwise in t).
  Every other method is derived here. Times `t` are scalars or shape (B,) and broadcast over the
  trailing axes of `x`. Each docstring gives the closed range of t on which the result is finite
  for all three schedules; outside it the formula divides by zero (alpha_0 = 0 or beta_1 = 0).
  """

  name: str

  @abc.abstractmethod
  def alpha(self, t):
    """α_t of the schedule."""

  @abc.abstractmethod
  def beta(self, t):
    """β_t of the schedule."""

  @abc.abstractmethod
  def alpha_dot(self, t):
    """dα/dt of the schedule."""

  @abc.abstractmethod
  def beta_dot(self, t):
    """dβ/dt of the schedule."""

  def wronskian(self, t):
    """alpha_dot beta − beta_dot alpha (> 0); finite on [0, 1] (linear, cosine), [0, 1) (vp).

    It is the determinant of the map (z, eps) → (x, u); every conversion divides by it or by
    alpha or beta, never by a difference that cancels.
    """
    t = _as_float(t)
    return self.alpha_dot(t) * self.beta(t) - self.beta_dot(t) * self.alpha(t)

  # -- forward process and conditional targets

  def sample_xt(self, z, eps, t):
    """x_t = alpha_t z + beta_t eps; finite on [0, 1]."""
    t = expand_time(t, z)
    return self.alpha(t) * z + self.beta(t) * eps

  def conditional_velocity(self, x, z, t):
    """u_t(x|z) = (alpha_dot − alpha beta_dot/beta) z + (beta_dot/beta) x; finite on [0, 1)."""
    t = expand_time(t, x)
    ratio = self.beta_dot(t) / self.beta(t)
    return (self.alpha_dot(t) - self.alpha(t) * ratio) * z + ratio * x

  def conditional_velocity_from_noise(self, z, eps, t):
    """u_t(x|z) at x = alpha z + beta eps: alpha_dot z + beta_dot eps.

    Finite on [0, 1] for linear and cosine, on [0, 1) for vp (beta_dot → −∞ at t = 1).
    """
    t = expand_time(t, z)
    return self.alpha_dot(t) * z + self.beta_dot(t) * eps

  def conditional_score(self, x, z, t):
    """∇log p_t(x|z) = −(x − alpha z)/beta²; finite on [0, 1)."""
    t = expand_time(t, x)
    beta = self.beta(t)
    return -(x - self.alpha(t) * z) / (beta * beta)

  def conditional_score_from_noise(self, eps, t):
    """∇log p_t(x|z) at x = alpha z + beta eps: −eps/beta; finite on [0, 1)."""
    return self.score_from_noise(eps, t)

  # -- conversions between velocity, score, noise and the clean-data estimate x̂

  def velocity_coefficients(self, t):
    """(a_t, b_t) of u = a_t x + b_t s: a = alpha_dot/alpha, b = (alpha_dot beta² − beta_dot beta alpha)/alpha.

    Finite on (0, 1]; both blow up at t = 0 (alpha_0 = 0).
    """
    t = _as_float(t)
    alpha = self.alpha(t)
    return self.alpha_dot(t) / alpha, self.beta(t) * self.wronskian(t) / alpha

  def velocity_from_score(self, score, x, t):
    """u = a_t x + b_t s; finite on (0, 1]."""
    t = expand_time(t, x)
    a, b = self.velocity_coefficients(t)
    return a * x + b * score

  def score_from_velocity(self, velocity, x, t):
    """s = (alpha u − alpha_dot x)/(alpha_dot beta² − beta_dot beta alpha); finite on [0, 1)."""
    t = expand_time(t, x)
    return ((self.alpha(t) * velocity - self.alpha_dot(t) * x)
            / (self.beta(t) * self.wronskian(t)))

  def noise_from_score(self, score, t):
    """eps = −beta s; finite on [0, 1]."""
    t = expand_time(t, score)
    return -self.beta(t) * score

  def score_from_noise(self, noise, t):
    """s = −eps/beta; finite on [0, 1)."""
    t = expand_time(t, noise)
    return -noise / self.beta(t)

  def velocity_from_noise(self, noise, x, t):
    """u = a_t x − (b_t/beta_t) eps = (alpha_dot x − W eps)/alpha, W = `wronskian`.

    Finite on (0, 1] for linear and cosine, on (0, 1) for vp.
    """
    t = expand_time(t, x)
    return (self.alpha_dot(t) * x - self.wronskian(t) * noise) / self.alpha(t)

  def noise_from_velocity(self, velocity, x, t):
    """eps = −beta s = (alpha_dot x − alpha u)/W, W = `wronskian`.

    Finite on [0, 1] for linear and cosine, on [0, 1) for vp.
    """
    t = expand_time(t, x)
    return (self.alpha_dot(t) * x - self.alpha(t) * velocity) / self.wronskian(t)

  def x_hat_from_score(self, score, x, t):
    """x̂ = E[z | x_t = x] = (x + beta² s)/alpha; finite on (0, 1]."""
    t = expand_time(t, x)
    beta = self.beta(t)
    return (x + beta * beta * score) / self.alpha(t)

  def x_hat_from_noise(self, noise, x, t):
    """x̂ = (x − beta eps)/alpha; finite on (0, 1]."""
    t = expand_time(t, x)
    return (x - self.beta(t) * noise) / self.alpha(t)

  def x_hat_from_velocity(self, velocity, x, t):
    """x̂ = (beta u − beta_dot x)/W, W = `wronskian`; finite on [0, 1] (linear, cosine), [0, 1) (vp)."""
    t = expand_time(t, x)
    return (self.beta(t) * velocity - self.beta_dot(t) * x) / self.wronskian(t)

  # -- model predictions

  def velocity_from_prediction(self, prediction, x, t, parameterization):
    """Velocity from a model output in `parameterization`; finite on (0, 1) for score/noise."""
    check_choice('parameterization', parameterization, PARAMETERIZATIONS)
    if parameterization == 'velocity':
      return prediction
    if parameterization == 'score':
      return self.velocity_from_score(prediction, x, t)
    return self.velocity_from_noise(prediction, x, t)

  def score_from_prediction(self, prediction, x, t, parameterization):
    """Score from a model output in `parameterization`; finite on [0, 1) for velocity/noise."""
    check_choice('parameterization', parameterization, PARAMETERIZATIONS)
    if parameterization == 'velocity':
      return self.score_from_velocity(prediction, x, t)
    if parameterization == 'score':
      return prediction
    return self.score_from_noise(prediction, t)


@dataclasses.dataclass(frozen=True)
class LinearPath(GaussianPath):
  """CondOT path: alpha = t, beta = 1 − t."""

  name: str = 'linear'

  def alpha(self, t):
    return _as_float(t)

  def beta(self, t):
    return 1.0 - _as_float(t)

  def alpha_dot(self, t):
    return jnp.ones_like(_as_float(t))

  def beta_dot(self, t):
    return -jnp.ones_like(_as_float(t))

  def wronskian(self, t):
    return jnp.ones_like(_as_float(t))


@dataclasses.dataclass(frozen=True)
class CosinePath(GaussianPath):
  """Cosine path: alpha = sin(πt/2), beta = cos(πt/2) (variance preserving)."""

  name: str = 'cosine'

  # beta = sin(π(1 − t)/2) rather than cos(πt/2): float32 cos(π/2) is 4e-8, not 0.
  def alpha(self, t):
    return jnp.sin(0.5 * math.pi * _as_float(t))

  def beta(self, t):
    return jnp.sin(0.5 * math.pi * (1.0 - _as_float(t)))

  def alpha_dot(self, t):
    return 0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - _as_float(t)))

  def beta_dot(self, t):
    return -0.5 * math.pi * jnp.sin(0.5 * math.pi * _as_float(t))

  def wronskian(self, t):
    return jnp.full_like(_as_float(t), 0.5 * math.pi)


@dataclasses.dataclass(frozen=True)
class VPPath(GaussianPath):
  """DDPM / VP-SDE path (linear noise rate beta_min → beta_max), alpha² + beta² = 1.

  With diffusion time tau = 1 − t (tau = 0 data), the VP-SDE of Song et al. (2021) has
  alpha_bar(tau) = exp(−B(tau)/2), B(tau) = beta_min tau + (beta_max − beta_min) tau²/2, which
  leaves alpha = exp(−B(1)/2) ≈ 6.6e-3 at pure noise. We rescale it affinely so the boundary
  conditions hold exactly:

      alpha_t = (exp(−B(1 − t)/2) − c)/(1 − c),  c = exp(−B(1)/2),  beta_t = sqrt(1 − alpha_t²).

  alpha differs from the textbook VP by at most c. beta_dot = −alpha alpha_dot/beta → −∞ at
  t = 1 (beta ~ sqrt(1 − t), as for every VP path with alpha_dot(1) > 0).
  """

  name: str = 'vp'
  beta_min: float = 0.1
  beta_max: float = 20.0

  def _half_integral(self, t):
    tau = 1.0 - _as_float(t)
    return 0.5 * (self.beta_min * tau + 0.5 * (self.beta_max - self.beta_min) * tau * tau)

  @property
  def _c(self):
    return math.exp(-0.5 * (self.beta_min + 0.5 * (self.beta_max - self.beta_min)))

  def _one_minus_alpha(self, t):
    # From expm1: accurate (and exactly 0 at t = 1) where alpha → 1.
    return -jnp.expm1(-self._half_integral(t)) / (1.0 - self._c)

  def alpha(self, t):
    t = _as_float(t)
    # Near t = 0 write e − c = c expm1(B(1)/2 − B(1 − t)/2) with the difference expanded in t,
    # so alpha_0 is exactly 0; near t = 1 use 1 − (1 − alpha), exactly 1 at t = 1.
    gap = 0.5 * t * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * (2.0 - t))
    near_noise = self._c * jnp.expm1(gap) / (1.0 - self._c)
    return jnp.where(t < 0.5, near_noise, 1.0 - self._one_minus_alpha(t))

  def beta(self, t):
    # Near t = 1 write 1 − alpha² = (1 − alpha)(1 + alpha): no cancellation; near t = 0,
    # 1 − alpha² is exactly 1 at alpha_0 = 0.
    t = _as_float(t)
    alpha = self.alpha(t)
    one_minus_alpha_sq = jnp.where(
        t < 0.5, 1.0 - alpha * alpha, self._one_minus_alpha(t) * (1.0 + alpha))
    return jnp.sqrt(jnp.maximum(one_minus_alpha_sq, 0.0))

  def alpha_dot(self, t):
    tau = 1.0 - _as_float(t)
    noise_rate = self.beta_min + (self.beta_max - self.beta_min) * tau
    return 0.5 * noise_rate * jnp.exp(-self._half_integral(t)) / (1.0 - self._c)

  def beta_dot(self, t):
    return -self.alpha(t) * self.alpha_dot(t) / self.beta(t)

  def wronskian(self, t):
    # alpha_dot beta + alpha² alpha_dot/beta = alpha_dot/beta (alpha² + beta² = 1).
    return self.alpha_dot(t) / self.beta(t)


_PATHS = {'linear': LinearPath, 'cosine': CosinePath, 'vp': VPPath}


def get_path(name, **kwargs) -> GaussianPath:
  """Returns the path called `name` (one of SCHEDULES); a GaussianPath is returned unchanged.

  Paths are frozen dataclasses: hashable, so they can be static arguments of `jax.jit`.
  `kwargs` go to the constructor (e.g. `beta_min`, `beta_max` for 'vp').
  """
  if isinstance(name, GaussianPath):
    return name
  check_choice('path', name, SCHEDULES)
  return _PATHS[name](**kwargs)
