"""What may change between a checkpoint's config and the config that resumes it.

Keys that change what the weights mean — the task, the model, the probability path, the
parameterization, the classes, the data and its space, a text model's encoder — are refused on
resume: the weights would
be trained on toward another objective (or read as another model) without a word. Every other
key (steps, learning rate, logging, sampling, evaluation, implementation choices such as the
compute dtype or attention kernel that give the same function) may change and is logged.
`--config.train.allow_config_change=true` resumes anyway and logs each refused key.
"""

import json

from absl import logging
from ml_collections import config_dict

from guidedflow import errors
from guidedflow import schema

# Prefixes of the keys that change the meaning of the weights.
MEANING_KEYS = ('task', 'model.', 'path.', 'loss.parameterization', 'input.dataset',
                'input.num_classes', 'input.space', 'input.image_size', 'autoencoder.workdir',
                'autoencoder.weights',
                # a text model's condition: its encoder, the weights and tokenizer of a frozen
                # one, the trained one's tokenizer (its vocabulary: text_vocabulary.py), the
                # tokens per caption and the null condition
                'text.encoder', 'text.weights', 'text.tokenizer', 'text.max_length', 'text.null',
                'text.encoder_width', 'text.encoder_depth', 'text.encoder_heads',
                'text.tokenizer_kind')
# Keys under those prefixes that only choose how the same function is computed.
IMPLEMENTATION_KEYS = ('model.dtype', 'model.attention_impl', 'model.remat', 'model.scan_blocks',
                       'model.unroll_blocks')


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _as_json(config):
  """The config as the checkpoint stores it (JSON: tuples become lists)."""
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return json.loads(json.dumps(config, default=str))


def _changes_meaning(key):
  if key in IMPLEMENTATION_KEYS:
    return False
  return any(key == p or (p.endswith('.') and key.startswith(p)) for p in MEANING_KEYS)


def differences(saved, config):
  """{dotted key: (saved value, new value)} of the keys whose values differ. Both sides are
  completed by the schema first: a key the saved config lacks (written before the key existed)
  counts with the value that meant the behaviour of that time (`schema.PREDATED`) or its
  default; a key dropped since the save is not compared."""
  old, new = _flatten(_completed(saved)), _flatten(_completed(config))
  out = {}
  for key in sorted(set(old) & set(new)):
    if key != 'train.allow_config_change' and old[key] != new[key]:
      out[key] = (old[key], new[key])
  return out


def _completed(config):
  """`config` as JSON with every key of its task's schema (as saved, when it names no task)."""
  tree = config_dict.ConfigDict(_as_json(config))
  try:
    schema.complete(tree)
  except errors.ConfigError:
    pass  # an unknown task: compared as saved
  return _as_json(tree)


def meaning_changes(saved, config, changed=None):
  """{dotted key: (saved value, new value)} of the `differences` that change what the weights
  mean (the keys a resume refuses; `changed`: the differences, when already computed)."""
  changed = differences(saved, config) if changed is None else changed
  return {k: v for k, v in changed.items() if _changes_meaning(k)}


def check(config, saved, step, directory):
  """Refuses (ConfigError) a resume that changes the meaning of the weights; logs the rest.

  Args:
    config: the config that resumes.
    saved: the config saved with checkpoint `step` (None: saved without one, nothing checked).
    step, directory: where the checkpoint is, for the messages.
  """
  if saved is None:
    return
  changed = differences(saved, config)
  refused = meaning_changes(saved, config, changed)
  allowed = {k: v for k, v in changed.items() if k not in refused}
  for key, (a, b) in allowed.items():
    logging.info('Step %d restored with a changed config.%s: %r -> %r.', step, key, a, b)
  if not refused:
    return
  if config.train.allow_config_change:
    for key, (a, b) in refused.items():
      logging.warning('Step %d restored with config.%s changed from %r to %r '
                      '(train.allow_config_change=true): the weights were trained for the old '
                      'value.', step, key, a, b)
    return
  key, (a, b) = next(iter(refused.items()))
  more = f' (and {len(refused) - 1} more: {", ".join(list(refused)[1:4])})' if len(
      refused) > 1 else ''
  raise errors.ConfigError(
      f'The checkpoint at step {step} in {directory} was trained with config.{key}={a!r}, this '
      f'config has {b!r}{more}; that changes what the weights mean. Pass the saved value '
      f'(--config.{key}=...), use a new --workdir, or pass '
      '--config.train.allow_config_change=true to fine-tune from these weights on purpose.')
