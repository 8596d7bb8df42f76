"""The tasks by name: `get_task(config, workdir)` is the task `config.task` names."""

from guidedflow import errors
from guidedflow.tasks import autoencoder
from guidedflow.tasks import classifier
from guidedflow.tasks import generator
from guidedflow.tasks import noisy_classifier

TASKS = {task.name: task for task in (generator.GeneratorTask, classifier.ClassifierTask,
                                      autoencoder.AutoencoderTask,
                                      noisy_classifier.NoisyClassifierTask)}


def get_task(config, workdir=None):
  """The task named by `config.task` ('generate' when the config has no such key), for the
  run in `workdir`."""
  name = config.get('task', 'generate')
  if name not in TASKS:
    raise errors.ConfigError(f'config.task={name!r} is not one of {tuple(TASKS)}.')
  return TASKS[name](config, workdir)
