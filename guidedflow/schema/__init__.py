"""Every config key guidedflow reads, with its default: one schema per task.

`complete(config)` gives a config every key of its task's schema that it lacks: the run's
config is completed once, when it is loaded (`guidedflow.tasks.registry.prepare`, and
`trained.load` for a finished run's saved config), and the program reads `config.a.b` without
defaults of its own. A key a saved config lacks because it was written before the key existed
gets the value that meant the behaviour of that time (`PREDATED`), not today's default.
"""

import ml_collections

from guidedflow import errors
from guidedflow.schema import autoencoder
from guidedflow.schema import classifier
from guidedflow.schema import common
from guidedflow.schema import generator
from guidedflow.schema import noisy_classifier

__all__ = ['SCHEMAS', 'PREDATED', 'complete', 'common']

# config.task -> the function returning its schema (with every default).
SCHEMAS = {'generate': generator.get_config, 'classifier': classifier.get_config,
           'noisy_classifier': noisy_classifier.get_config,
           'autoencoder': autoencoder.get_config}

# Keys added after configs were first written, where the behaviour before the key existed
# differs from today's default: a config that lacks one (saved by an older version) gets this.
PREDATED = {'task': 'generate', 'model.attention_impl': 'einsum',
            'sampling.classifier_scale': 0.0, 'sampling.classifier_workdir': None}


def task_of(config):
  """config.task, checked: 'generate' when the config predates the key."""
  task = config['task'] if 'task' in config else PREDATED['task']
  if task not in SCHEMAS:
    raise errors.ConfigError(f'config.task={task!r} is not one of {tuple(SCHEMAS)}.')
  return task


def complete(config):
  """Adds to `config` (in place; also a locked one) every key of its task's schema that it
  lacks, with the schema's default (or `PREDATED` value); returns `config`.

  Raises:
    ConfigError: config.task names no task.
  """
  task = task_of(config)
  with config.unlocked():
    if 'task' not in config:
      config.task = task
    _fill(config, SCHEMAS[task](), '')
  return config


def _fill(node, schema, prefix):
  for key in schema.keys():
    dotted = prefix + key
    value = schema[key]
    if isinstance(value, ml_collections.ConfigDict):
      if key not in node or node[key] is None:
        node[key] = ml_collections.ConfigDict()
      _fill(node[key], value, dotted + '.')
    elif key not in node:
      # The schema's field itself, so that a typed field (FieldReference) keeps its type.
      node[key] = PREDATED[dotted] if dotted in PREDATED else schema.get_ref(key)
