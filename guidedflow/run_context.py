"""What the loop shares with the tasks' periodic and final work: the `Run` context, the
TensorBoard `Writer`, the held-out metrics, `itstime`, and the loop's clock (`Chrono`).

It sits below both the tasks and the loop (`guidedflow.train`), so a task never imports the
loop that runs it.
"""

import contextlib
import dataclasses
import math
import os
import time

from absl import logging
import jax
import numpy as np

from guidedflow import batches
from guidedflow import sharding
from guidedflow import train_state


def itstime(step, every_n_steps, total_steps, *, last=True):
  """Whether periodic work is due after `step` (big_vision's `itstime`): at multiples of
  `every_n_steps` (0: never) and, when `last`, at the final step."""
  return bool((every_n_steps and step % every_n_steps == 0) or (last and step == total_steps))


class Chrono:
  """Training throughput and ETA, with the time of periodic work (grids, evaluations,
  checkpoints) left out."""

  def __init__(self, start_step, num_steps, batch_size):
    self.start_step, self.num_steps, self.batch_size = start_step, num_steps, batch_size
    self.t_start = time.time()
    self.compile_s = self.paused_s = 0.0
    self._window = (start_step, time.time(), 0.0)  # (step, time, paused seconds) of the last log

  def first_step(self, state):
    """Call after the first step of the run: it includes the compile."""
    jax.block_until_ready(state)
    self.compile_s = time.time() - self.t_start
    self._window = (self.start_step + 1, time.time(), self.paused_s)
    logging.info('First step (compile + run) took %.1f s.', self.compile_s)

  @contextlib.contextmanager
  def paused(self):
    t0 = time.time()
    try:
      yield
    finally:
      self.paused_s += time.time() - t0

  def tick(self, step):
    """Steps/s since the previous tick and the ETA of the run, in seconds."""
    last_step, last_time, last_paused = self._window
    now = time.time()
    busy = now - last_time - (self.paused_s - last_paused)
    steps_per_s = (step - last_step) / busy if step > last_step and busy > 0 else 0.0
    self._window = (step, now, self.paused_s)
    eta = (self.num_steps - step) / steps_per_s if steps_per_s else float('nan')
    return steps_per_s, eta

  def summary(self, step):
    total = time.time() - self.t_start
    train_s = total - self.compile_s - self.paused_s
    trained = step - self.start_step - 1  # the first step's time is in compile_s
    return {'steps_this_run': step - self.start_step,
            'train_images_per_s': (round(trained * self.batch_size / train_s, 1)
                                   if trained > 0 and train_s > 0 else None),
            'compile_s': round(self.compile_s, 2), 'periodic_s': round(self.paused_s, 2),
            'train_s': round(train_s, 2)}


def format_seconds(seconds):
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class Writer:
  """TensorBoard scalars and images (tensorboardX; no TensorFlow), on process 0 only."""

  def __init__(self, logdir):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # One event file per run (its PID in the name), also for two started in the same second.
      self._writer = SummaryWriter(logdir, filename_suffix=f'.{os.getpid()}')

  def scalars(self, step, values):
    if self._writer:
      for name, value in values.items():
        self._writer.add_scalar(name, value, step)

  def image(self, step, name, image):
    if self._writer:
      self._writer.add_image(name, image, step, dataformats='HWC')

  def close(self):
    if self._writer:
      self._writer.close()
      self._writer = None


@dataclasses.dataclass
class Run:
  """What a task's periodic and final work may use of the running program."""
  config: object
  workdir: str
  builder: train_state.StateBuilder
  writer: Writer
  image_shape: tuple
  num_steps: int
  task: object = None
  _eval_step: object = None

  def heldout(self, params, dataset, *, batch_size, num_batches=0):
    """The task's held-out metrics of `params` over `dataset` (or its first `num_batches`
    batches): the mean over real examples (the padded rows of the last batch weigh 0)."""
    if self._eval_step is None:
      self._eval_step = self.builder.make_eval_step(self.task.eval_metrics)
    return heldout_metrics(self._eval_step, params, dataset, batch_size=batch_size,
                           num_batches=num_batches, batch_sharding=self.builder.batch_sharding,
                           seed=self.config.train.seed)


def heldout_metrics(eval_step, params, dataset, *, batch_size, num_batches, batch_sharding,
                    seed):
  """Means of `eval_step(params, batch, key)` over the examples of `dataset`: each batch's
  means (over its real rows) weighted by its number of real rows. Batch i uses key
  fold_in(PRNGKey(seed + 1), i), so every call draws the same noise."""
  totals, count = {}, 0.0
  key = jax.random.PRNGKey(seed + 1)
  for i, batch in enumerate(batches.eval_batches(
      dataset, batch_size, num_batches=num_batches or None, sharding=batch_sharding)):
    weight = float(np.sum(sharding.to_host(batch['mask'])))
    for name, value in eval_step(params, batch, jax.random.fold_in(key, i)).items():
      totals[name] = totals.get(name, 0.0) + weight * float(value)
    count += weight
  return {name: total / max(count, 1.0) for name, total in totals.items()}
