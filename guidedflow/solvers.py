"""Multistep solvers of the guided probability-flow ODE in data prediction: DPM-Solver++(2M).

DPM-Solver++ (Lu et al. 2022) integrates the ODE in λ_t = log(α_t/β_t) with the data prediction
x̂ = E[z | x_t = x] (our t = 1 is data, so λ rises from −∞ at t = 0 to +∞ at t = 1). Its exact
solution from s to t is

    x_t = (β_t/β_s) x_s + β_t ∫_{λ_s}^{λ_t} e^λ x̂_λ dλ,

and the first-order step (x̂ constant, DDIM) is x_t = (β_t/β_s) x_s + (α_t − α_s β_t/β_s) x̂_s.
The 2M step replaces x̂_s by the linear extrapolation in λ through the previous data prediction:

    x_{i+1} = (β_{i+1}/β_i) x_i + (α_{i+1} − α_i β_{i+1}/β_i) (D_i + h_i/(2 h_{i−1}) (D_i − D_{i−1})),

h_i = λ_{i+1} − λ_i, D_i the guided data prediction at (x_i, t_i). This is diffusers'
`DPMSolverMultistepScheduler` (algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint')
with its flow-matching α = 1 − σ: with `prediction_type='flow_prediction'` it forms x̂ = x − σ v,
which is `paths.LinearPath.x_hat_from_velocity`; here every path converts the guided velocity
with its own `x_hat_from_velocity`, so one solver serves 'linear', 'cosine' and 'vp' and any
parameterization (the prediction goes to velocity first, as for Euler and Heun).

The coefficients depend only on the static grid and path: they are computed once on the host
(float64 arithmetic on the path's float32 α_t, β_t) as a (N, 3) table the scan indexes by step.
Written with ratios of α and β, no λ is ever infinite in the traced program.
"""

import jax
import jax.numpy as jnp
import numpy as np

MULTISTEP_METHODS = ('dpmpp_2m',)


def dpmpp_2m_coefficients(path, grid, first_step=0):
  """(N, 3) float32 table of (decay, gain, correction) per step of DPM-Solver++(2M):
  x_{i+1} = decay_i x_i + gain_i (D_i + correction_i (D_i − D_{i−1})).

  Endpoints: the first evaluated step (`first_step`, after CFG-Zero*'s zero-init steps) has no
  previous prediction and is first order (correction 0). The last step ends at t = 1, where
  β = 0 and λ = +∞: it is first order too (diffusers' `lower_order_final`, its
  `final_sigmas_type='zero'`), decay 0, gain α_1 = 1, so x_1 = D_{N−1}, the data prediction at
  the last grid time < 1 (the model is never evaluated at t = 1). A grid starting at t = 0
  (α_0 = 0, λ_0 = −∞) makes h_0 infinite: the step after it is first order as well (diffusers
  gets the same from 1/r = h_1/∞ = 0). Each of these steps has an O(h²) local error on 'linear'
  and 'cosine' (β/α ∝ 1 − t near t = 1), so the global order stays 2 there; on 'vp'
  (β/α ∝ √(1 − t)) the last step's error is O(h).
  """
  grid = np.asarray(grid, np.float32)
  with jax.ensure_compile_time_eval():  # concrete also while the sampler is being traced
    alpha = np.asarray(path.alpha(grid), np.float64)
    beta = np.asarray(path.beta(grid), np.float64)
  num_steps = len(grid) - 1
  table = np.zeros((num_steps, 3), np.float64)
  with np.errstate(divide='ignore'):
    lam = np.log(alpha) - np.log(beta)  # −inf at α = 0, +inf at β = 0 (host only)
  for i in range(num_steps):
    decay = beta[i + 1] / beta[i]
    gain = alpha[i + 1] - alpha[i] * decay
    correction = 0.0
    if i > first_step and i < num_steps - 1 and np.isfinite(lam[i - 1]):
      correction = (lam[i + 1] - lam[i]) / (2.0 * (lam[i] - lam[i - 1]))
    table[i] = (decay, gain, correction)
  return table.astype(np.float32)


def initial_state(guidance_state, x):
  """The multistep scan state: the guidance method's state and the previous data prediction."""
  return (guidance_state, jnp.zeros_like(x))


def make_step(fields, *, path, method, grid, first_step=0):
  """step(key, x, state, i, t, t_next, pattern) -> (key, x, state) of a multistep `method`, the
  signature of `sampling._make_step`'s steps; `state` = (guidance state, D_{i−1})
  (`initial_state`). One guided evaluation per step, at t_i (`pattern[0]` says whether it is
  guided), converted to the data prediction by `path.x_hat_from_velocity`."""
  if method not in MULTISTEP_METHODS:
    raise ValueError(f'method must be one of {MULTISTEP_METHODS}, got {method!r}.')
  table = dpmpp_2m_coefficients(path, grid, first_step)

  def step(key, x, state, i, t, t_next, pattern):
    del t_next  # in the table
    guidance_state, previous = state
    velocity, _, guidance_state = fields(x, t, pattern[0], False, guidance_state)
    data = path.x_hat_from_velocity(velocity, x, t)
    decay, gain, correction = (jnp.asarray(table)[i, k] for k in range(3))
    x = decay * x + gain * (data + correction * (data - previous))
    return key, x, (guidance_state, data)

  return step
