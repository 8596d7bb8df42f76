"""The task interface (`Task`) and the helpers the tasks share."""

import jax.numpy as jnp

from guidedflow import errors
from guidedflow import input_pipeline
from guidedflow.models import factory


class Task:
  """Base class; `config.task` names the subclass (`tasks.registry`).

  validate(config): checks the task's own config sections, once per run
  (`tasks.registry.prepare`).
  Hooks the loop calls (all optional but `loss`):
    train_dataset(), eval_dataset(): the data.
    check_inputs(): at start-up, before compiling: opens every other input the run will read
      (the train split is open already), so a missing one fails now, not after training.
    prepare(): loads the frozen networks `loss` needs, before the step is traced (also for
      --mode=compile).
    model_constructor(image_shape): zero-argument function building the nnx model (default:
      `models.factory.constructor`, the network `config.task` names).
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

  @staticmethod
  def validate(config):
    """Checks the task's own config sections (the shared ones: `validation.check_common`);
    raises ConfigError naming the key and its fix. Default: nothing more."""
    del config  # Unused.

  def __init__(self, config, workdir=None):
    self.config = config
    self.workdir = workdir  # None outside a run (e.g. a model loaded for inference)

  def train_dataset(self):
    """The train split, or its first `input.num_train_examples` (0 or absent: all)."""
    return input_pipeline.take(
        input_pipeline.create_dataset(self.config.input, self.config.input.train_split),
        self.config.input.num_train_examples)

  def eval_dataset(self):
    """The eval split, or its first `eval.num_examples` (0 or absent: all)."""
    return input_pipeline.take(
        input_pipeline.create_dataset(self.config.input, self.config.input.eval_split),
        self.config.eval.num_examples)

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
    return factory.constructor(self.config, image_shape)

  def train_compiler_options(self, backend):
    """XLA compiler options for the train step on `backend`; default None: XLA's own (the
    convolutional networks of the other tasks measured fastest there, benchmarks/README.md)."""
    del backend  # Unused.
    return None

  def make_train_step(self, builder):
    """The loop's jitted step of `loss` for `builder`'s state, with this task's XLA options."""
    return builder.make_train_step(self.loss, self.train_compiler_options(builder.platform))

  def loss(self, model, batch, key):
    raise NotImplementedError(f'{type(self).__name__} must define loss(model, batch, key).')

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
                             "generator (config.input.space='latents') and the text cache of a "
                             "generator's frozen text encoder (config.text.encoder).")

  def sample(self, workdir):
    del workdir  # Unused.
    raise errors.ConfigError(f'--mode=sample does not apply to config.task={self.name!r} '
                             f'({self.description}): use --mode=train or --mode=evaluate.')

  def evaluate(self, workdir):
    raise NotImplementedError(f'{type(self).__name__} must define evaluate(workdir).')


def check_eval_split(open_split, config):
  """Calls `open_split()`; its DataError is raised again saying which split it is and why the
  run needs it at all."""
  try:
    open_split()
  except input_pipeline.DataError as e:
    raise input_pipeline.DataError(
        f'the eval split {config.input.eval_split!r} (config.input.eval_split; the held-out '
        f'metrics read it during and after training) cannot be opened: {e}') from None


def masked_mean(values, batch):
  """Mean of per-example `values` over the batch's real rows (`batch['mask']`, when padded)."""
  mask = batch.get('mask')
  if mask is None:
    return jnp.mean(values)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
