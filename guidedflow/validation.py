"""Config checks before anything is built: ConfigError names the key and its fix.

`check_common` checks the sections every task has (the loop, optimizer, checkpoints, mesh,
time budget); each task checks its own sections (`Task.validate`, with the helpers here), and
`tasks.registry.prepare` runs both once per run, after the schema has completed the config.
Allowed values come from the library's own constants (`train_state.SCHEDULES`,
`sharding.DISTRIBUTED_MODES`, ...), so a new choice there is accepted here without a copied
table.
"""

import math

import jax

from guidedflow import errors
from guidedflow import sharding
from guidedflow import time_budget
from guidedflow import train_state

_COMMON_CHOICES = {'optim.schedule': train_state.SCHEDULES,
                   'mesh.distributed': sharding.DISTRIBUTED_MODES,
                   'train.allow_config_change': (True, False), 'train.restart': (True, False)}
_COMMON_POSITIVE = ('train.num_steps', 'train.batch_size', 'train.log_every_steps',
                    'checkpoint.every_steps', 'checkpoint.max_to_keep', 'input.num_classes')


def value(config, dotted):
  """config.<dotted> (a completed config has every key of its task's schema)."""
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def choices(config, table):
  """Each config.<key> of `table` ({key: allowed values}) must be one of its values."""
  for key, allowed in table.items():
    got = value(config, key)
    if got not in allowed:
      raise errors.ConfigError(f'config.{key}={got!r} is not one of {tuple(allowed)}.')


def integers(config, keys, minimum=1):
  """Each config.<key> must be an int >= `minimum` (0: periodic work every N steps, 0 = none)."""
  for key in keys:
    got = value(config, key)
    if not isinstance(got, int) or isinstance(got, bool) or got < minimum:
      raise errors.ConfigError(
          f'config.{key}={got!r} must be a positive integer.' if minimum else
          f'config.{key}={got!r} must be a step count >= 0 (0: none during training), e.g. '
          f'--config.{key}=1000.')


def counts(config, keys):
  """Each config.<key> must be an integer >= 0 (0: all, or none)."""
  for key in keys:
    got = value(config, key)
    if not isinstance(got, int) or isinstance(got, bool) or got < 0:
      raise errors.ConfigError(f'config.{key}={got!r} must be an integer >= 0.')


def number(config, key, *, above=None, at_least=None, example=''):
  """config.<key> must be a finite number > `above` (or >= `at_least`): a bare comparison
  refuses nan but lets inf through, which then fails only once training runs."""
  got = value(config, key)
  bound = f'> {above}' if above is not None else f'>= {at_least}'
  if (not isinstance(got, (int, float)) or isinstance(got, bool) or not math.isfinite(got)
      or (above is not None and not got > above)
      or (at_least is not None and not got >= at_least)):
    raise errors.ConfigError(f'config.{key}={got!r} must be a finite number {bound}'
                             + (f', e.g. --config.{key}={example}.' if example else '.'))


def widths(config, key, example):
  """config.<key> must be a non-empty tuple of positive layer widths."""
  got = value(config, key)
  if not got or any(int(c) < 1 for c in got):
    raise errors.ConfigError(f'config.{key}={got!r} must be a non-empty tuple of positive '
                             f'widths, e.g. {example}.')


def check_common(config):
  """Checks the sections every task's config has; raises ConfigError naming key and fix."""
  choices(config, _COMMON_CHOICES)
  _check_time_budget(config)
  text_model = 'text' in config and config.text.encoder != 'none'
  integers(config, tuple(k for k in _COMMON_POSITIVE
                         if not (k == 'train.num_steps' and time_budget.is_active(config))
                         and not (k == 'input.num_classes' and text_model)))
  if text_model:  # captions, not classes: an image–caption dataset has none
    integers(config, ('input.num_classes',), minimum=0)
  integers(config, ('eval.every_steps',), minimum=0)
  counts(config, ('input.num_train_examples',))
  _check_optim(config)
  _check_mesh(config)
  batch, processes = config.train.batch_size, jax.process_count()
  if batch % processes:
    raise errors.ConfigError(f'config.train.batch_size={batch} must be divisible by the number '
                             f'of processes ({processes}).')


def _check_time_budget(config):
  """`train.time_budget_minutes`: a number >= 0; with a budget choosing the step count, a
  warm-up long enough to measure the step rate in (time_budget.py)."""
  number(config, 'train.time_budget_minutes', at_least=0, example='25')
  if config.train.num_steps is None and not time_budget.minutes(config):
    raise errors.ConfigError('config.train.num_steps is not set: give it (e.g. '
                             '--config.train.num_steps=6000) or a time budget (e.g. '
                             '--config.train.time_budget_minutes=25).')
  if not time_budget.is_active(config):
    return
  warmup = config.optim.warmup_steps
  constant = config.optim.schedule == 'constant' and warmup == 0
  if not constant and warmup < time_budget.MIN_WARMUP:
    raise errors.ConfigError(
        f'config.train.time_budget_minutes needs config.optim.warmup_steps >= '
        f'{time_budget.MIN_WARMUP} (got {warmup}): the step rate is measured in the warm-up, '
        'whose learning rate does not depend on the step count; raise the warm-up or set '
        '--config.train.num_steps.')


def _check_optim(config):
  optim = config.optim
  number(config, 'optim.learning_rate', above=0, example='3e-4')
  for key in ('optim.weight_decay', 'optim.grad_clip_norm', 'optim.b1', 'optim.b2'):
    number(config, key, at_least=0)
  for key in ('optim.b1', 'optim.b2'):
    if not value(config, key) < 1:
      raise errors.ConfigError(f'config.{key}={value(config, key)!r} must be in [0, 1), e.g. '
                               f'--config.{key}={0.9 if key.endswith("b1") else 0.999}.')
  if optim.schedule == 'cosine':
    number(config, 'optim.final_lr_factor', at_least=0)
  if not 0.0 <= optim.ema_decay < 1.0:
    raise errors.ConfigError(f'config.optim.ema_decay={optim.ema_decay} must be in [0, 1) '
                             '(0: no EMA).')
  if not isinstance(optim.warmup_steps, int) or optim.warmup_steps < 0:
    raise errors.ConfigError(f'config.optim.warmup_steps={optim.warmup_steps!r} must be an '
                             'integer >= 0.')


def _check_mesh(config):
  mesh = config.mesh
  for key in ('shape', 'dcn_shape'):
    shape = tuple(mesh[key])
    if len(shape) != 3 or any(not isinstance(s, int) or s == 0 or s < -1 for s in shape):
      raise errors.ConfigError(
          f'config.mesh.{key}={shape!r} must be three sizes (data, fsdp, tensor), each positive '
          'or -1 (all remaining devices), e.g. --config.mesh.shape=-1,8,1')
  if not isinstance(mesh.min_shard_size, int) or mesh.min_shard_size < 0:
    raise errors.ConfigError(f'config.mesh.min_shard_size={mesh.min_shard_size!r} must be an '
                             'integer >= 0.')
