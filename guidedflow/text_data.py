"""A captioned dataset's batches with their text condition: each batch's 'caption' ids looked up
in a table — the tokens of a trained encoder, or a frozen encoder's cached features.

The batch gains flat `text_*` arrays (`batches.to_jax` takes flat dicts) and `text_null` (0: a
real caption; caption dropout and CFG set it to 1 later); `condition(batch)` gathers them into
the dict a `models.text_conditioning.TextConditioned` takes.
"""

import numpy as np

from guidedflow import datasets

PREFIX = 'text_'


# What the batch iterator and --mode=encode read of a dataset besides its shape: passed through
# the wrappers below when the wrapped dataset has them.
_FORWARDED = ('in_memory', 'decodes_files', 'process_local', 'pixel_shape', 'meta', 'directory')


def _forward(wrapper, base):
  for name in _FORWARDED:
    if hasattr(base, name):
      setattr(wrapper, name, getattr(base, name))


class TokenTable:
  """The tokens of every caption of a caption set, for a trained encoder: `get(ids)` →
  {'text_tokens', 'text_mask'} int32 (n, L)."""

  def __init__(self, tokenizer, texts):
    self.tokens, self.mask = (np.asarray(a, np.int32) for a in tokenizer(list(texts)))

  def get(self, caption_ids):
    rows = np.asarray(caption_ids, np.int64)
    return {'text_tokens': self.tokens[rows], 'text_mask': self.mask[rows]}


class TextDataset(datasets.Dataset):
  """`base` (batches with 'caption' ids) with each caption's text condition from `table`
  (`TokenTable` or `text_cache.TextCache`: `get(ids)` → `text_*` arrays)."""

  def __init__(self, base, table):
    self.base, self.table = base, table
    self.name, self.split, self.num_examples = base.name, base.split, base.num_examples
    self.image_shape, self.num_classes = base.image_shape, base.num_classes
    self.draws_per_epoch = getattr(base, 'draws_per_epoch', False)
    _forward(self, base)

  def get_batch(self, indices, epochs=None, seed=0):
    if self.draws_per_epoch:
      batch = dict(self.base.get_batch(indices, epochs=epochs, seed=seed))
    else:
      batch = dict(self.base.get_batch(indices))
    batch.update(self.table.get(batch['caption']))
    batch['text_null'] = np.zeros(len(batch['caption']), np.int32)
    return batch


class LatentCaptions(datasets.Dataset):
  """A latent dataset of an image–caption dataset (the latent cache, or encoded on the fly),
  whose 'label' column holds each example's caption id (`latents.images_of`), as a captioned
  dataset: batches with 'caption' for `TextDataset` (flips and process-local shards keep their
  captions: the id is stored with each latent row)."""

  def __init__(self, base):
    self.base = base
    self.name, self.split, self.num_examples = base.name, base.split, base.num_examples
    self.image_shape, self.num_classes = base.image_shape, 0
    _forward(self, base)

  def get_batch(self, indices):
    batch = dict(self.base.get_batch(indices))
    batch['caption'] = batch.pop('label')
    return batch


def condition(batch):
  """The text condition of a model batch: {'tokens' or 'hidden', 'mask', ['pooled'], 'null'}."""
  return {key[len(PREFIX):]: value for key, value in batch.items() if key.startswith(PREFIX)}
