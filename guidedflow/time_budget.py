"""`train.time_budget_minutes`: a run that fits a wall-clock budget on whatever CPU it lands on.

With a budget and no `train.num_steps`, the loop measures its own step rate over the first
steps of the run (steps `PROBE_FIRST`..`PROBE_LAST` after the start, compile excluded), then fixes
the step count: what the budget has left, less `RESERVED_SHARE` of it for the sample grids,
checkpoints and held-out metrics, at the measured rate. The learning-rate schedule is built for
that count and the count is written into the run's config (config.json and every checkpoint's),
so a resumed run continues with the same count and schedule, and `--config.train.num_steps=N`
with the N it chose reproduces the run exactly.

Exactness needs the schedule of the measured steps not to depend on the count: they lie inside
the linear warm-up, whose learning rate is the same for every count (`validation` asks for
`optim.warmup_steps >= MIN_WARMUP`; with fewer than `PROBE_LAST` the rate is measured over the
warm-up's steps). Until the count is fixed the optimizer runs on a provisional one
(`PROVISIONAL_STEPS`), which gives the warm-up's rates too.
"""

import math
import time

from absl import logging
import jax

from guidedflow import errors

PROBE_FIRST, PROBE_LAST = 10, 60  # steps after the run's first step that time the step rate
RESERVED_SHARE = 0.08  # of the budget: grids, checkpoints and held-out metrics (4.6-6.5 % measured)
MIN_WARMUP = 20  # warm-up steps a budgeted run needs (unless its schedule is one constant)
PROVISIONAL_STEPS = 10 ** 9  # the schedule's length until the count is fixed


def minutes(config):
  return float(config.train.time_budget_minutes or 0.0)


def is_active(config):
  """Whether the run chooses its step count (a budget is set and `train.num_steps` is not)."""
  return minutes(config) > 0 and config.train.num_steps is None


def schedule_steps(config):
  """The step count the learning-rate schedule is built for."""
  return config.train.num_steps if config.train.num_steps is not None else PROVISIONAL_STEPS


class TimeBudget:
  """Measures the step rate of a run and chooses its step count.

  Args:
    config: the run's config (`train.time_budget_minutes`, `optim.warmup_steps`).
    t_start: `time.time()` when the run's command started its work (the budget counts from it).
    start_step: the step the run starts (or resumes) at.
  """

  def __init__(self, config, t_start, start_step):
    self.budget_s = minutes(config) * 60
    self.t_start = t_start
    self.start_step = start_step
    warmup = self.warmup = int(config.optim.warmup_steps)
    if config.optim.schedule == 'constant' and warmup == 0:
      end = start_step + PROBE_LAST  # the schedule is one constant: any step will do
    else:
      end = min(start_step + PROBE_LAST, warmup)
    # A run resumed late in the warm-up measures over what it has left of it, but at least 2
    # timed steps (its schedule may then differ from a fixed count's in a step or two).
    self.last = max(end, start_step + 3)
    self.first = min(start_step + PROBE_FIRST, self.last - 2)
    self._t_first = None
    self.batch_size = int(config.train.batch_size)

  def observe(self, step, state, compile_s=0.0):
    """Call after each step with the new train state and the first step's compile time (the
    step is compiled again for the chosen count). Returns the chosen step count after step
    `self.last`, else None."""
    if step not in (self.first, self.last):
      return None
    jax.block_until_ready(state)  # dispatch runs ahead of the computation
    if step == self.first:
      self._t_first = time.time()
      return None
    now = time.time()
    steps_per_s = (self.last - self.first) / max(now - self._t_first, 1e-9)
    left_s = self.budget_s * (1 - RESERVED_SHARE) - (now - self.t_start) - compile_s
    chosen = step + max(int(math.floor(left_s * steps_per_s)), 0)
    if chosen <= max(step, self.warmup):
      raise errors.ConfigError(
          f'config.train.time_budget_minutes={self.budget_s / 60:g} leaves time for '
          f'{chosen} steps ({now - self.t_start:.0f} s spent by step {step}, '
          f'{steps_per_s:.2f} steps/s), no more than the warm-up\'s {self.warmup} '
          '(config.optim.warmup_steps): raise the budget, lower the warm-up, or set '
          '--config.train.num_steps.')
    logging.info('Time budget %g min: %.2f steps/s (%.0f img/s) measured over steps %d-%d, '
                 '%.0f s spent -> %d steps (the schedule and config.json say so; rerun with '
                 '--config.train.num_steps=%d to repeat the run on another machine).',
                 self.budget_s / 60, steps_per_s, steps_per_s * self.batch_size, self.first,
                 self.last, now - self.t_start, chosen, chosen)
    return chosen
