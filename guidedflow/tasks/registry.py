"""The tasks by name, and `prepare`: a run's config completed, checked and locked, once.

`get_task(config, workdir)` is the task `config.task` names.
"""

import weakref

from guidedflow import schema
from guidedflow import validation
from guidedflow.tasks import autoencoder
from guidedflow.tasks import classifier
from guidedflow.tasks import generator
from guidedflow.tasks import noisy_classifier
from guidedflow.tasks import text_generator

TASKS = {task.name: task for task in (generator.GeneratorTask, classifier.ClassifierTask,
                                      autoencoder.AutoencoderTask,
                                      noisy_classifier.NoisyClassifierTask)}
assert set(TASKS) == set(schema.SCHEMAS), 'every task has a schema (guidedflow/schema/)'
# The configs `prepare` checked, by id (held weakly: a config's id may be reused after it dies).
_PREPARED = weakref.WeakValueDictionary()


def validate(config):
  """Completes `config` in place with its task's schema (`schema.complete`) and checks it: the
  shared sections, then the task's own (`Task.validate`). Returns it.

  Raises:
    ConfigError: naming the key and its fix.
  """
  schema.complete(config)
  validation.check_common(config)
  TASKS[config.task].validate(config)
  return config


def prepare(config):
  """`validate`, then locks `config` (no new keys): once per run. `guidedflow.main` prepares
  the command line's config; the loop, given a prepared config, checks it no second time."""
  if _PREPARED.get(id(config)) is config:
    return config
  validate(config)
  config.lock()
  _PREPARED[id(config)] = config
  return config


def get_task(config, workdir=None):
  """The task named by `config.task`, for the run in `workdir`; a generator with a text
  encoder (`config.text.encoder`) is the text generator."""
  task = TASKS[schema.task_of(config)]
  if task is generator.GeneratorTask and config.text.encoder != 'none':
    task = text_generator.TextGeneratorTask
  return task(config, workdir)
