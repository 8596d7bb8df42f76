"""Closed-form oracle for tests: a class-conditional 2-D Gaussian mixture on any Gaussian path.

Each class y is a mixture of diagonal Gaussians N(mu_k, diag v_k). On the path x_t = alpha z +
beta eps, component k becomes N(alpha mu_k, diag(alpha² v_k + beta²)) = N(m, C), whose score is
−(x − m)/C and whose (linear) marginal velocity is E[alpha_dot z + beta_dot eps | x, k] =
alpha_dot mu_k + (alpha alpha_dot v_k + beta beta_dot)/C (x − m). The mixture's score and
velocity are the responsibility-weighted sums. Both stay finite at t = 0 and t = 1, unlike
a_t x + b_t s, so the oracle is exact on the whole grid.
"""

import jax
import jax.numpy as jnp

NUM_CLASSES = 2
NULL = NUM_CLASSES
MEANS = jnp.array([[-2.0, -1.0], [-1.0, 2.0], [2.0, 1.5], [1.5, -2.0]], jnp.float32)
STDS = jnp.array([[0.5, 0.3], [0.3, 0.6], [0.4, 0.4], [0.6, 0.25]], jnp.float32)
CLASS_OF = jnp.array([0, 0, 1, 1], jnp.int32)
WITHIN_CLASS = jnp.array([0.6, 0.4, 0.5, 0.5], jnp.float32)  # p(k | y), sums to 1 per class
CLASS_PRIOR = jnp.array([0.5, 0.5], jnp.float32)


def log_component_weights(y):
  """(B, 4) log p(k | y); y == NULL gives the marginal weights p(k) = p(y_k) p(k | y_k)."""
  same = CLASS_OF[None, :] == y[:, None]
  conditional = jnp.where(same, jnp.log(WITHIN_CLASS)[None], -jnp.inf)
  marginal = jnp.log(WITHIN_CLASS * CLASS_PRIOR[CLASS_OF])[None]
  return jnp.where((y == NULL)[:, None], marginal, conditional)


def _components(path, x, t, std_scale=1.0):
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])[:, None, None]  # (B, 1, 1)
  alpha, beta = path.alpha(t), path.beta(t)
  alpha_dot, beta_dot = path.alpha_dot(t), path.beta_dot(t)
  var = (std_scale * STDS[None]) ** 2
  mean = alpha * MEANS[None]                                    # (B, 4, 2)
  cov = alpha**2 * var + beta**2                                # (B, 4, 2)
  diff = x[:, None, :] - mean
  log_density = -0.5 * jnp.sum(diff**2 / cov + jnp.log(2 * jnp.pi * cov), axis=-1)  # (B, 4)
  score = -diff / cov
  velocity = alpha_dot * MEANS[None] + (alpha * alpha_dot * var + beta * beta_dot) / cov * diff
  return log_density, score, velocity


def log_prob(path, x, t, y):
  """log p_t(x | y) (y == NULL: log p_t(x)), shape (B,)."""
  log_density, _, _ = _components(path, x, t)
  return jax.nn.logsumexp(log_component_weights(y) + log_density, axis=-1)


def fields(path, x, t, y, std_scale=1.0):
  """(velocity, score) of p_t(· | y), each (B, 2); `std_scale` widens every component (a
  blurrier p, the toy's 'weaker model' for autoguidance)."""
  log_density, score, velocity = _components(path, x, t, std_scale)
  resp = jax.nn.softmax(log_component_weights(y) + log_density, axis=-1)[..., None]
  return jnp.sum(resp * velocity, axis=1), jnp.sum(resp * score, axis=1)


def model(path, parameterization, std_scale=1.0):
  """The exact model (x, t, y) -> prediction in `parameterization` (of the data with every
  component's std scaled by `std_scale`)."""

  def model_fn(x, t, y):
    velocity, score = fields(path, x, t, y, std_scale)
    if parameterization == 'velocity':
      return velocity
    if parameterization == 'score':
      return score
    beta = path.beta(jnp.broadcast_to(t, x.shape[:1]))[:, None]
    return -beta * score

  return model_fn


def classifier_log_prob(path, x, t, y):
  """log p_t(y | x) from Bayes' rule, shape (B,)."""
  log_joint_y = log_prob(path, x, t, y) + jnp.log(CLASS_PRIOR[y])
  return log_joint_y - log_prob(path, x, t, jnp.full_like(y, NULL))


def sample_data(key, y):
  """Draws x ~ p_data(· | y) (y == NULL: p_data), shape (B, 2)."""
  key_component, key_noise = jax.random.split(key)
  k = jax.random.categorical(key_component, log_component_weights(y), axis=-1)
  return MEANS[k] + STDS[k] * jax.random.normal(key_noise, (y.shape[0], 2))


def energy_distance(a, b):
  """2 E|A − B| − E|A − A'| − E|B − B'| (V-statistics), a scalar >= 0."""

  def mean_dist(p, q):
    d2 = jnp.sum((p[:, None, :] - q[None, :, :]) ** 2, axis=-1)
    return jnp.mean(jnp.sqrt(jnp.maximum(d2, 1e-12)))

  return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)
