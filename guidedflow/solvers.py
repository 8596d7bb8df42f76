"""Multistep solvers of the guided probability-flow ODE in data prediction: DPM-Solver++(2M), UniPC.

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

UniPC (Zhao et al. 2023; diffusers' `UniPCMultistepScheduler`, predict_x0, solver_type='bh2',
solver_order=2) is the same predictor (UniP-2 with B(h) = e^{−h} − 1 is the 2M step) plus the
UniC corrector, which re-does the previous step with the new evaluation D_i before x_i is used
(see `unipc_coefficients`): no extra evaluation, so its NFE is 2M's.
"""

import jax
import jax.numpy as jnp
import numpy as np

MULTISTEP_METHODS = ('dpmpp_2m', 'unipc')


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


def unipc_coefficients(path, grid, first_step=0):
  """(N, 8) float32 table of UniPC (bh2, order 2) per step: the predictor's (decay, gain,
  correction), the DPM-Solver++(2M) row (UniP-2 with B(h) = e^{−h} − 1 is that step), then the
  corrector of x_i before step i uses it: (decay_{i−1}, gain_{i−1}, c1, c2, on), so that

      x_i ← decay_{i−1} x_{i−1} + gain_{i−1} (D_{i−1} + c1 (D_{i−1} − D_{i−2}) + c2 (D_i − D_{i−1})),

  with D_i evaluated at the uncorrected x_i (no extra evaluation, as in diffusers). UniC's
  weights solve R ρ = b, R = [[1, 1], [r, 1]], r = (λ_{i−2} − λ_{i−1})/h, b_k from the φ
  functions of h = λ_i − λ_{i−1} (c1 = −ρ_1/r, c2 = ρ_2); after a first-order predictor step
  (the first evaluated one) the corrector is first order, c2 = 1/2. With λ_{i−2} = −∞ (a grid
  from t = 0) r = −∞ and the limit ρ_1 = 0, ρ_2 = b_1 is taken. `on` is 0 at the first
  evaluated step (nothing to correct). The last step is not corrected (its decay is 0 and x_1 =
  D_{N−1}, as diffusers' last UniPC step).
  """
  predictor = dpmpp_2m_coefficients(path, grid, first_step).astype(np.float64)
  grid = np.asarray(grid, np.float32)
  with jax.ensure_compile_time_eval():
    alpha = np.asarray(path.alpha(grid), np.float64)
    beta = np.asarray(path.beta(grid), np.float64)
  with np.errstate(divide='ignore'):
    lam = np.log(alpha) - np.log(beta)
  num_steps = len(grid) - 1
  table = np.zeros((num_steps, 8), np.float64)
  table[:, :3] = predictor
  for i in range(first_step + 1, num_steps):
    c1, c2 = 0.0, 0.5  # after the first (first-order) evaluated step
    if i - 1 > first_step:
      h = lam[i] - lam[i - 1]
      b_h = np.expm1(-h)
      phi = b_h / -h - 1.0
      b1 = phi / b_h
      b2 = 2.0 * (phi / -h - 0.5) / b_h
      if np.isfinite(lam[i - 2]):
        ratio = (lam[i - 2] - lam[i - 1]) / h
        rho1 = (b1 - b2) / (1.0 - ratio)
        c1, c2 = -rho1 / ratio, b1 - rho1
      else:
        c2 = b1
    table[i, 3:] = (predictor[i - 1, 0], predictor[i - 1, 1], c1, c2, 1.0)
  return table.astype(np.float32)


def initial_state(guidance_state, x, method='dpmpp_2m'):
  """The multistep scan state: the guidance method's state and the previous data prediction
  (UniPC: also the one before it and the previous corrected x)."""
  if method == 'unipc':
    return (guidance_state, jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros_like(x))
  return (guidance_state, jnp.zeros_like(x))


def make_step(fields, *, path, method, grid, first_step=0):
  """step(key, x, state, i, t, t_next, pattern) -> (key, x, state) of a multistep `method`, the
  signature of `sampling._make_step`'s steps; `state` as `initial_state`'s. One guided
  evaluation per step, at t_i (`pattern[0]` says whether it is guided), converted to the data
  prediction by `path.x_hat_from_velocity` (CFG++'s velocity is that of the step to t_{i+1} in
  this data form, `guidance.cfg_pp_velocity`)."""
  if method not in MULTISTEP_METHODS:
    raise ValueError(f'method must be one of {MULTISTEP_METHODS}, got {method!r}.')
  if method == 'unipc':
    table = unipc_coefficients(path, grid, first_step)
  else:
    table = dpmpp_2m_coefficients(path, grid, first_step)

  def step(key, x, state, i, t, t_next, pattern):
    row = [jnp.asarray(table)[i, k] for k in range(table.shape[1])]
    guidance_state = state[0]
    velocity, _, guidance_state = fields(x, t, pattern[0], False, guidance_state, t_next=t_next)
    data = path.x_hat_from_velocity(velocity, x, t)
    if method == 'dpmpp_2m':
      previous = state[1]
      x = row[0] * x + row[1] * (data + row[2] * (data - previous))
      return key, x, (guidance_state, data)
    _, previous, before_previous, previous_x = state
    corrected = row[3] * previous_x + row[4] * (
        previous + row[5] * (previous - before_previous) + row[6] * (data - previous))
    x = jnp.where(row[7] > 0, corrected, x)
    x_next = row[0] * x + row[1] * (data + row[2] * (data - previous))
    return key, x_next, (guidance_state, data, previous, x)

  return step
