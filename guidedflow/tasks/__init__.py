"""Tasks: what each kind of model brings to the one training loop (`guidedflow.train`).

A task builds its model, gives its loss `(model, batch, key) -> (loss, metrics)` and its
held-out metrics, and says what to do periodically and what to report at the end; the loop
owns everything else (state in shards, the step, EMA, schedule, logging, checkpoints,
preemption, teardown). A new model is a new task, never a new loop.
"""

import json
import os

from etils import epath
import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import config_dict
import numpy as np

from guidedflow import checkpointing
from guidedflow import errors
from guidedflow import input_pipeline
from guidedflow import train_state


class Task:
  """Base class; `config.task` names the subclass (see `TASKS`).

  Hooks the loop calls (all optional but `model_constructor` and `loss`):
    train_dataset(), eval_dataset(): the data.
    check_inputs(): at start-up, before compiling: opens every other input the run will read
      (the train split is open already), so a missing one fails now, not after training.
    prepare(): loads the frozen networks `loss` needs, before the step is traced (also for
      --mode=compile).
    model_constructor(image_shape): zero-argument function building the nnx model.
    train_compiler_options(backend): XLA options for the train step, or None (the defaults);
      `make_train_step(builder)` compiles the step with them.
    loss(model, batch, key): (scalar loss, dict of scalar metrics), inside the jitted step.
    eval_metrics(model, batch, key): dict of means over the batch's real rows (batch['mask']).
    periodic(run, state, step): after every step; returns scalars for TensorBoard.
    final(run, state): after the last step; returns the JSON-able result of the run.
  Modes of `guidedflow.main` besides training: sample(workdir), evaluate(workdir),
  encode(workdir).
  """

  name = None
  # What --mode=evaluate / sample print about the task when they do not apply.
  description = ''
  # Metrics of `loss` printed in the log line besides loss, grad_norm and learning_rate (all
  # of them go to TensorBoard).
  log_keys = ()

  def __init__(self, config, workdir=None):
    self.config = config
    self.workdir = workdir  # None outside a run (e.g. a model loaded for inference)

  def train_dataset(self):
    """The train split, or its first `input.num_train_examples` (0 or absent: all)."""
    return input_pipeline.take(
        input_pipeline.create_dataset(self.config.input, self.config.input.train_split),
        self.config.input.get('num_train_examples', 0))

  def eval_dataset(self):
    """The eval split, or its first `eval.num_examples` (0 or absent: all)."""
    return input_pipeline.take(
        input_pipeline.create_dataset(self.config.input, self.config.input.eval_split),
        self.config.eval.get('num_examples', 0))

  def abstract_batch(self, batch_size, image_shape):
    """{key: (shape, dtype)} of a global train batch, for ahead-of-time compiles
    (`guidedflow.aot`): images and labels."""
    return {'image': ((batch_size, *image_shape), jnp.float32),
            'label': ((batch_size,), jnp.int32)}

  def check_inputs(self):
    """Opens the eval split, which the held-out metrics of `periodic` and `final` read: a
    missing or malformed split raises DataError before the first step, not after the last."""
    check_eval_split(self.eval_dataset, self.config)

  def prepare(self):
    """Loads what `loss` needs besides the model (a frozen network), before the train step is
    traced: the loop and --mode=compile call it first (restored inside the trace, a network
    would meet the training mesh). Default: nothing."""

  def model_constructor(self, image_shape):
    raise NotImplementedError

  def train_compiler_options(self, backend):
    """XLA compiler options for the train step on `backend`; default None: XLA's own (the
    convolutional networks of the other tasks measured fastest there, benchmarks/README.md)."""
    del backend  # Unused.
    return None

  def make_train_step(self, builder):
    """The loop's jitted step of `loss` for `builder`'s state, with this task's XLA options."""
    return builder.make_train_step(self.loss, self.train_compiler_options(builder.platform))

  def loss(self, model, batch, key):
    raise NotImplementedError

  def eval_metrics(self, model, batch, key):
    return {'loss': self.loss(model, batch, key)[0]}

  def periodic(self, run, state, step):
    del run, state, step  # Unused.
    return {}

  def final(self, run, state):
    del run, state  # Unused.
    return {}

  def encode(self, workdir):
    del workdir  # Unused.
    raise errors.ConfigError(f'--mode=encode does not apply to config.task={self.name!r} '
                             f'({self.description}): it writes the latent cache of a latent '
                             "generator (config.input.space='latents').")

  def sample(self, workdir):
    del workdir  # Unused.
    raise errors.ConfigError(f'--mode=sample does not apply to config.task={self.name!r} '
                             f'({self.description}): use --mode=train or --mode=evaluate.')

  def evaluate(self, workdir):
    raise NotImplementedError


def checked_constructor(construct):
  """`construct`, once its model has been built abstractly (`nnx.eval_shape`): a model that
  refuses its arguments raises ConfigError with the model's message."""
  try:
    nnx.eval_shape(construct)
  except ValueError as e:
    raise errors.ConfigError(f'config.model: {e}') from None
  return construct


def check_eval_split(open_split, config):
  """Calls `open_split()`; its DataError is raised again saying which split it is and why the
  run needs it at all."""
  try:
    open_split()
  except input_pipeline.DataError as e:
    raise input_pipeline.DataError(
        f'the eval split {config.input.eval_split!r} (config.input.eval_split; the held-out '
        f'metrics read it during and after training) cannot be opened: {e}') from None


def get_task(config, workdir=None):
  """The task named by `config.task` ('generate' when the config has no such key), for the
  run in `workdir`."""
  # pylint: disable=g-import-not-at-top  # the tasks import this module
  from guidedflow.tasks import autoencoder
  from guidedflow.tasks import classifier
  from guidedflow.tasks import generator
  from guidedflow.tasks import noisy_classifier
  tasks = {t.name: t for t in (generator.GeneratorTask, classifier.ClassifierTask,
                               autoencoder.AutoencoderTask,
                               noisy_classifier.NoisyClassifierTask)}
  name = config.get('task', 'generate')
  if name not in tasks:
    raise errors.ConfigError(f'config.task={name!r} is not one of {tuple(tasks)}.')
  return tasks[name](config, workdir)


def load_trained(workdir, task_name, train_command):
  """(model with the weights of the finished `task_name` run in `workdir` — its EMA weights
  when it kept an EMA, the weights its result.json reports on —, its result.json, its config),
  on this process's first device.

  A run is finished when the loop wrote result.json for the newest checkpoint.

  Raises:
    CheckpointNotFoundError: no such run, or it did not finish; the message gives
      `train_command`, which trains or resumes it.
  """
  workdir = os.fspath(workdir)
  if not (epath.Path(workdir) / 'checkpoints').is_dir():  # checked first: opening creates it
    raise errors.CheckpointNotFoundError(f'no {task_name} run in {workdir}; train it with: '
                                         f'{train_command}')
  result_path = epath.Path(workdir) / 'result.json'
  result = json.loads(result_path.read_text()) if result_path.exists() else {}
  checkpoints = config_dict.ConfigDict({'checkpoint': {'every_steps': 0, 'max_to_keep': 1}})
  with train_state.open_checkpointer(checkpoints, workdir, handle_sigterm=False) as ckpt:
    try:
      return _restore_finished(ckpt, workdir, task_name, train_command, result)
    except checkpointing.DamagedCheckpointError as e:
      raise errors.CheckpointNotFoundError(
          f'the {task_name} run in {workdir} is unusable: {e}. Rerun its training, which sets '
          f'the damaged step aside and redoes it from the one before: {train_command}') from e


def _restore_finished(ckpt, workdir, task_name, train_command, result):
  """`load_trained`'s restore of the finished run's newest step."""
  step = ckpt.latest_step()
  saved = ckpt.restore_config(step) if step is not None else None
  other = (saved or {}).get('task', 'generate')
  if saved is not None and other != task_name:
    raise errors.CheckpointNotFoundError(
        f'{workdir} holds a run of config.task={other!r}, not {task_name!r}: give the '
        f'--workdir of a {task_name!r} run.')
  if saved is None or result.get('task') != task_name or step != result.get('step'):
    raise errors.CheckpointNotFoundError(
        f'no finished {task_name} run in {workdir} (newest checkpoint: step {step}; '
        f'result.json: {result.get("task")} at step {result.get("step")}); train or resume it '
        f'with: {train_command}')
  config = config_dict.ConfigDict(saved)
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1, 1),
                           ('data', 'fsdp', 'tensor'))
  construct = get_task(config).model_constructor(tuple(result['image_shape']))
  builder = train_state.StateBuilder(construct, config, mesh)
  state, _ = ckpt.restore(builder.abstract_state(), step=step)
  # The weights the run reported on: its EMA when it kept one.
  return builder.merge(state.get('ema_params', state['params'])), result, config


def masked_mean(values, batch):
  """Mean of per-example `values` over the batch's real rows (`batch['mask']`, when padded)."""
  mask = batch.get('mask')
  if mask is None:
    return jnp.mean(values)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
