"""Finished runs of the loop, loaded for use by another: the feature networks of evaluation,
the autoencoder of latent diffusion, the noise-aware classifier of classifier guidance.

`load(workdir, task_name, train_command)` rebuilds the run's network from its saved config
(`models.factory`) and restores the weights its result.json reports on; it needs neither the
task that trained it nor the loop.
"""

import json
import os

from etils import epath
import jax
from ml_collections import config_dict
import numpy as np

from guidedflow import atomic
from guidedflow import checkpointing
from guidedflow import errors
from guidedflow import schema
from guidedflow import train_state

AUTOENCODER_CONFIG = 'configs/fmnist_autoencoder.py'
NOISY_CLASSIFIER_CONFIG = 'configs/fmnist_noisy_classifier.py'


RUN_INFO = 'run.json'


def write_run_info(workdir, task_name, input_shape):
  """Writes <workdir>/run.json: the task and the shape of one model input (the image, or its
  latent), so that inference rebuilds the model without opening the dataset."""
  if jax.process_index() == 0:
    atomic.write_text(epath.Path(workdir) / RUN_INFO, json.dumps(
        {'task': task_name, 'input_shape': [int(d) for d in input_shape]}))


def saved_input_shape(workdir):
  """The model input shape <workdir>/run.json saved, or None (a run of a version before it)."""
  path = epath.Path(workdir) / RUN_INFO
  if not path.exists():
    return None
  return tuple(json.loads(path.read_text())['input_shape'])


def train_command(workdir, config_path):
  """The command that trains (or resumes) the run of `config_path` in `workdir`."""
  return f'python -m guidedflow.main --config {config_path} --workdir {workdir}'


def load(workdir, task_name, train_command):
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
  """`load`'s restore of the finished run's newest step."""
  step = ckpt.latest_step()
  saved = ckpt.restore_config(step) if step is not None else None
  other = schema.task_of(saved or {})
  if saved is not None and other != task_name:
    raise errors.CheckpointNotFoundError(
        f'{workdir} holds a run of config.task={other!r}, not {task_name!r}: give the '
        f'--workdir of a {task_name!r} run.')
  if saved is None or result.get('task') != task_name or step != result.get('step'):
    raise errors.CheckpointNotFoundError(
        f'no finished {task_name} run in {workdir} (newest checkpoint: step {step}; '
        f'result.json: {result.get("task")} at step {result.get("step")}); train or resume it '
        f'with: {train_command}')
  config = schema.complete(config_dict.ConfigDict(saved))
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1, 1),
                           ('data', 'fsdp', 'tensor'))
  builder = train_state.builder(config, tuple(result['image_shape']), mesh)
  state, _ = ckpt.restore(builder.abstract_state(), step=step)
  # The weights the run reported on: its EMA when it kept one.
  return builder.merge(state.get('ema_params', state['params'])), result, config


def load_noisy_classifier(workdir, config_path=NOISY_CLASSIFIER_CONFIG):
  """(model, result, config) of the finished noisy-classifier run in `workdir` (its EMA weights
  when it kept an EMA), for classifier guidance.

  Raises:
    CheckpointNotFoundError: no finished run there; the message gives the command that trains
      (or resumes) it with `config_path`.
  """
  return load(workdir, 'noisy_classifier', train_command(workdir, config_path))
