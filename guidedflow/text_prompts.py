"""Prompts → the condition a text model samples with (`models.text_conditioning`), its null
condition, and a negative prompt in ∅'s place.

A trained encoder's condition is the prompt's tokens (the model encodes them); a frozen
encoder's is its features, encoded here by the same encoder the text cache was written with
(`text_encoders.load`). An empty prompt is allowed: it is the unconditional prompt (logged).
"""

from absl import logging
import numpy as np

from guidedflow import errors
from guidedflow import text_encoders
from guidedflow.models import text_transformer


def read_prompts(config):
  """The prompts of `sampling.prompts` ('a;b;c') or `sampling.prompts_file` (one per line)."""
  sampling = config.sampling
  if sampling.prompts_file:
    try:
      with open(sampling.prompts_file, encoding='utf-8') as f:
        prompts = [line.rstrip('\n') for line in f if line.strip()]
    except OSError as e:
      raise errors.DataError(f'config.sampling.prompts_file={sampling.prompts_file}: '
                             f'{errors.one_line(e)}; give a text file, one prompt per line.'
                             ) from e
  else:
    prompts = (sampling.prompts or '').split(';') if sampling.prompts is not None else []
  if not prompts:
    raise errors.ConfigError("a text model samples prompts: --config.sampling.prompts='a dark "
                             "wide pullover;a small light sandal' or "
                             '--config.sampling.prompts_file=FILE (one per line).')
  return prompts


class Prompts:
  """condition(prompts) → the model's condition (numpy, 'null' = 0); null(condition) → ∅."""

  def __init__(self, config, encoder=None, tokenizer=None):
    """`encoder`: the frozen encoder when the caller has it loaded (else loaded here);
    `tokenizer`: the trained encoder's (`text_vocabulary.tokenizer`; 'words' needs it)."""
    text = config.text
    self.encoder = None
    if text.encoder == 'trained':
      self.tokenizer = tokenizer or text_transformer.tokenizer(text.tokenizer_kind,
                                                               text.max_length)
    else:
      self.encoder = encoder or text_encoders.load(config)

  def condition(self, prompts):
    prompts = list(prompts)
    if any(not p.strip() for p in prompts):
      logging.info('An empty prompt is the unconditional prompt: its samples are the model\'s '
                   'null condition, whatever w.')
    if self.encoder is None:
      tokens, mask = self.tokenizer(prompts)
      out = {'tokens': np.asarray(tokens, np.int32), 'mask': np.asarray(mask, np.int32)}
    else:
      tokens, mask = self.encoder.tokenize(prompts)
      features = self.encoder.encode(tokens, mask)
      out = {'hidden': features['hidden'], 'mask': np.asarray(mask, np.int32),
             'pooled': features['pooled']}
    empty = np.array([not p.strip() for p in prompts], np.int32)
    return dict(out, null=empty)  # '' is ∅ itself

  @staticmethod
  def null(condition):
    return dict(condition, null=np.ones_like(condition['null']))

  def negative(self, prompt, count):
    """The condition of `prompt` for `count` samples, to take ∅'s place in CFG."""
    return self.condition([prompt] * count)
