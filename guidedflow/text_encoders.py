"""The frozen text encoders a config names (`text.encoder`): CLIP or T5 from a Hugging Face
model folder, each with its own tokenizer, behind one interface for the text cache.

`text.weights` is the encoder's folder (a transformers `config.json` beside `model.safetensors`,
sharded safetensors with their index, or — CLIP — `pytorch_model.bin`: the `text_encoder/` or
`text_encoder_3/` folder of a Stable Diffusion repository). The tokenizer is read from
`text.tokenizer`, or else found in that folder, its `tokenizer/` subfolder, or the sibling
`tokenizer/` folder of SD repositories (tokenizer.json, vocab.json + merges.txt, spiece.model).
`text.max_length` None takes the encoder's own (CLIP: its position table, 77; T5: 120).

'trained' (a small encoder trained with the generator) and 'none' have nothing frozen: `load`
returns None for them.
"""

import dataclasses
import os

from absl import logging
from flax import nnx
import jax
import numpy as np

from guidedflow import checksums
from guidedflow import errors
from guidedflow.models import clip_text
from guidedflow.models import clip_text_weights
from guidedflow.models import factory
from guidedflow.models import clip_tokenizer
from guidedflow.models import t5_encoder
from guidedflow.models import t5_tokenizer
from guidedflow.models import t5_weights

ENCODERS = ('none', 'clip', 't5', 'trained')
FROZEN = ('clip', 't5')
_CLIP_WEIGHTS = ('model.safetensors', 'pytorch_model.bin', 'open_clip_model.safetensors')
_TOKENIZER_FILES = ('tokenizer.json', 'vocab.json', 'spiece.model')


class FrozenEncoder:
  """tokenize(texts) → (ids, mask) int32 (B, max_length); encode(ids, mask) → {'hidden' (B, L,
  D), zero at padded positions, 'pooled' (B, D)} float32 numpy for any L ≤ max_length (ids
  trimmed of trailing padding give the same values at the real tokens); `fingerprint` names the
  weights, tokenizer and length."""

  def __init__(self, name, model, tokenizer, pool, *, max_length, width, source, salt):
    self.name, self.tokenizer, self.source = name, tokenizer, source
    self.max_length, self.width = int(max_length), int(width)
    self._graphdef, self._params = nnx.split(model)
    self.fingerprint = checksums.fingerprint(self._params, salt=f'{name}/{max_length}/{salt}')

    def run(params, ids, mask):
      return pool(nnx.merge(self._graphdef, params), ids, mask)

    self._encode = jax.jit(run)

  def tokenize(self, texts):
    return self.tokenizer(list(texts))

  def encode(self, ids, mask):
    hidden, pooled = self._encode(self._params, ids, mask)
    return {'hidden': np.asarray(hidden), 'pooled': np.asarray(pooled)}


def _clip_pool(model, ids, mask):
  out = model(ids, mask)
  return _zero_padding(out.last_hidden_state, mask), out.pooled


def _t5_pool(model, ids, mask):
  hidden, mask = model(ids, mask)
  weights = mask.astype(hidden.dtype)[..., None]
  return _zero_padding(hidden, mask), (hidden * weights).sum(1) / jax.numpy.maximum(
      weights.sum(1), 1.0)


def _zero_padding(hidden, mask):
  """Zeros at padded positions: the generators mask them out of cross-attention, and so the
  hidden states are the same whatever length a caption was padded to (the text cache encodes
  each batch at its longest caption's length; CLIP is causal and T5 masks its padding, so the
  real tokens' states do not depend on it)."""
  return jax.numpy.where(mask.astype(bool)[..., None], hidden, 0.0)


def find_tokenizer(folder, explicit=None):
  """The tokenizer path: `explicit`, or the first of `folder`, its tokenizer/ subfolder and
  its sibling tokenizer/ folder that holds a tokenizer file."""
  if explicit:
    return os.fspath(explicit)
  folder = os.fspath(folder)
  for candidate in (folder, os.path.join(folder, 'tokenizer'),
                    os.path.join(os.path.dirname(os.path.abspath(folder)), 'tokenizer'),
                    os.path.dirname(os.path.abspath(folder))):
    if any(os.path.isfile(os.path.join(candidate, f)) for f in _TOKENIZER_FILES):
      return candidate
  raise errors.DataError(
      f'no tokenizer for the text encoder in {folder}: none of {_TOKENIZER_FILES} in it, its '
      'tokenizer/ subfolder or the tokenizer/ folder beside it; set --config.text.tokenizer to '
      'the folder holding them.')


def _weights_file(folder):
  for name in _CLIP_WEIGHTS:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise errors.DataError(f'no CLIP text-encoder weights in {folder}: expected one of '
                         f'{_CLIP_WEIGHTS}; set --config.text.weights to the text encoder\'s '
                         'folder (e.g. text_encoder/ of a Stable Diffusion repository).')


def _load_clip(text):
  folder = os.fspath(text.weights)
  config_file = os.path.join(folder, 'config.json')
  if not os.path.isfile(config_file):
    raise errors.DataError(f'no config.json in {folder}: the CLIP text encoder\'s transformers '
                           'config sizes the model; set --config.text.weights to its folder.')
  config = clip_text.config_from_hf(config_file)
  model = clip_text_weights.load_clip_text(_weights_file(folder), config)
  max_length = text.max_length or config.max_length
  if max_length > config.max_length:
    raise errors.ConfigError(f'config.text.max_length={max_length} is longer than the CLIP '
                             f'encoder\'s {config.max_length} positions.')
  tokenizer = clip_tokenizer.ClipTokenizer.from_files(find_tokenizer(folder, text.tokenizer),
                                                      max_length=max_length)
  return FrozenEncoder('clip', model, tokenizer, _clip_pool, max_length=max_length,
                       width=config.width, source=folder, salt=tokenizer.pad_id)


def _load_t5(text):
  folder = os.fspath(text.weights)
  max_length = text.max_length or t5_encoder.MAX_LENGTH_PIXART_ALPHA
  model = t5_weights.load_t5_encoder(folder, max_length=max_length)
  tokenizer = t5_tokenizer.T5Tokenizer(find_tokenizer(folder, text.tokenizer),
                                       max_length=max_length)
  return FrozenEncoder('t5', model, tokenizer, _t5_pool, max_length=max_length,
                       width=model.config.d_model, source=folder, salt='')


def abstract(config):
  """(model, pool, max_length) of the frozen `config.text` encoder with abstract parameters
  (carrying their logical axis names): what --mode=compile lowers, no weights read."""
  found = factory.frozen_text_config(config)
  _, max_length = factory.text_dims(config)
  if config.text.encoder == 'clip':
    model = nnx.eval_shape(lambda: clip_text.ClipTextEncoder(found, rngs=nnx.Rngs(0)))
    return model, _clip_pool, max_length
  found = dataclasses.replace(found, max_length=max_length)
  model = nnx.eval_shape(lambda: t5_encoder.T5Encoder(found, rngs=nnx.Rngs(0)))
  return model, _t5_pool, max_length


def load(config):
  """The `FrozenEncoder` of `config.text` (None for 'none' and 'trained')."""
  text = config.text
  if text.encoder not in FROZEN:
    return None
  if not text.weights:
    raise errors.ConfigError(f"config.text.encoder='{text.encoder}' needs its weights: "
                             '--config.text.weights=DIR (the encoder\'s Hugging Face folder).')
  if not os.path.isdir(text.weights):
    raise errors.DataError(f'config.text.weights={text.weights} is not a folder: give the '
                           f"{text.encoder} encoder's Hugging Face folder (config.json and its "
                           'weights).')
  encoder = (_load_clip if text.encoder == 'clip' else _load_t5)(text)
  logging.info('Text encoder %s from %s: width %d, %d tokens, fingerprint %s.', encoder.name,
               encoder.source, encoder.width, encoder.max_length, encoder.fingerprint)
  return encoder
