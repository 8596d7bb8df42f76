"""The text cache: a frozen text encoder's outputs for every caption of a caption set, encoded
once and read by caption id.

Layout of `<cache_dir>/`:
  ids.npy       (N, L) int32    the tokens (padded to the encoder's max_length L)
  mask.npy      (N, L) uint8    1 = a real token
  hidden.npy    (N, L, D)       the last hidden states, zero at padded positions (float16,
                                float32, or bfloat16 kept as its uint16 bits: numpy has no
                                bfloat16 .npy type)
  pooled.npy    (N, D) float32  the pooled vector (CLIP: the EOS token's; T5: masked mean)
  checksums.json                size and CRC-32 of each (`array_files`), checked on open
  captions.json                 the N captions, in id order
  meta.json                     the encoder (name, fingerprint of its weights), the caption
                                set's SHA-256, shapes, dtype, encode time; written last
A cache of another encoder, caption set or length is refused in one line, never overwritten.
For Fashion-MNIST the caption set is `captions.caption_table()` (3,960 captions): every caption
once, not once per image; a training batch looks its captions up by id.
"""

import hashlib
import json
import time

from absl import logging
from etils import epath
import ml_dtypes
import numpy as np

from guidedflow import array_files
from guidedflow import atomic
from guidedflow import errors

WHAT = 'text cache'
META = 'meta.json'
CHECKSUMS = 'checksums.json'
ARRAYS = ('ids.npy', 'mask.npy', 'hidden.npy', 'pooled.npy')
DTYPES = ('float16', 'bfloat16', 'float32')
_STORED = {'float16': np.float16, 'bfloat16': np.uint16, 'float32': np.float32}


class TextCacheMismatchError(errors.DataError):
  """The cache on disk holds another encoder's outputs, or another caption set."""


def captions_digest(texts):
  """SHA-256 of the caption set, in order (16 hex digits)."""
  digest = hashlib.sha256()
  for text in texts:
    digest.update(text.encode('utf-8') + b'\0')
  return digest.hexdigest()[:16]


def describe(encoder, texts):
  """What a cache of `encoder` (a `text_encoders.FrozenEncoder`) over `texts` holds."""
  return {'encoder': encoder.name, 'fingerprint': encoder.fingerprint,
          'captions': captions_digest(texts), 'num_captions': len(texts),
          'max_length': int(encoder.max_length), 'width': int(encoder.width)}


def _to_stored(values, dtype):
  values = np.asarray(values, np.float32)
  if dtype == 'bfloat16':
    return values.astype(ml_dtypes.bfloat16).view(np.uint16)
  return values.astype(_STORED[dtype])


_CHUNK = 8192  # captions tokenised (and sorted by length) at a time: bounded RAM for any set


def _padded_length(tokens, max_length):
  """The length a batch whose longest caption has `tokens` tokens is encoded at: the next power
  of two ≥ 8, at most max_length (a few shapes, so a few compiles)."""
  return min(int(max_length), max(8, 1 << (int(tokens) - 1).bit_length()))


def length_sorted_batches(encoder, texts, batch_size):
  """(rows, ids, mask, length) per encoding batch, `batch_size` rows padded by repeating the
  last (one shape per length): within each chunk of `_CHUNK` captions the rows go shortest
  first, and `length` is the batch's longest caption's padded length (`_padded_length`); ids and
  mask are the tokenizer's, full length."""
  for first in range(0, len(texts), _CHUNK):
    ids, mask = (np.asarray(a) for a in encoder.tokenize(list(texts[first:first + _CHUNK])))
    ends = (mask * np.arange(1, mask.shape[1] + 1)).max(1)  # 1 + the last real token's position
    order = np.argsort(ends, kind='stable')
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      fill = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows))])
      yield (first + rows, ids[fill], mask[fill],
             _padded_length(max(int(ends[rows].max()), 1), ids.shape[1]))


def write(encoder, texts, directory, *, dtype='float16', batch_size=64):
  """Encodes `texts` with `encoder` into `directory` (streamed: one batch in RAM at a time).

  Each batch holds captions of similar length and is encoded trimmed to its longest one
  (`length_sorted_batches`): the real tokens' states are those of a full-length encode (the
  encoder's contract), the padded positions are zeros, and a short caption set costs a fraction
  of max_length's compute (Fashion-MNIST's at CLIP's 77 tokens: docs/text.md).

  Returns:
    meta (dict), with the encoding rate in captions/s and the tokens encoded per caption.
  """
  if dtype not in DTYPES:
    raise errors.ConfigError(f'text cache dtype {dtype!r} is not one of {DTYPES}.')
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  n, length, width = len(texts), int(encoder.max_length), int(encoder.width)
  arrays = {'ids.npy': array_files.open_rows(directory, 'ids.npy', (n, length), np.int32),
            'mask.npy': array_files.open_rows(directory, 'mask.npy', (n, length), np.uint8),
            'hidden.npy': array_files.open_rows(directory, 'hidden.npy', (n, length, width),
                                                _STORED[dtype]),
            'pooled.npy': array_files.open_rows(directory, 'pooled.npy', (n, width),
                                                np.float32)}
  t0, done, tokens = time.time(), 0, 0
  for rows, ids, mask, used in length_sorted_batches(encoder, texts, batch_size):
    out = encoder.encode(ids[:, :used], mask[:, :used])
    k = len(rows)
    hidden = np.zeros((k, length, width), np.float32)
    hidden[:, :used] = out['hidden'][:k]
    arrays['ids.npy'][rows] = ids[:k]
    arrays['mask.npy'][rows] = mask[:k]
    arrays['hidden.npy'][rows] = _to_stored(hidden, dtype)
    arrays['pooled.npy'][rows] = np.asarray(out['pooled'][:k], np.float32)
    done, tokens = done + k, tokens + k * used
    logging.log_every_n_seconds(logging.INFO, 'Encoded %d/%d captions into %s.', 30, done, n,
                                directory)
  seconds = time.time() - t0
  array_files.finish(directory, arrays, CHECKSUMS)
  atomic.write_text(directory / 'captions.json', json.dumps(list(texts), indent=0))
  meta = dict(describe(encoder, texts), dtype=dtype, encode_s=round(seconds, 2),
              captions_per_s=round(n / max(seconds, 1e-9), 1),
              tokens_encoded_per_caption=round(tokens / max(n, 1), 1))
  atomic.write_text(directory / META, json.dumps(meta, indent=2))
  logging.info('Text cache %s: %d captions encoded by %s in %.1f s (%.1f of %d tokens each).',
               directory, n, encoder.name, seconds, tokens / max(n, 1), length)
  return meta


class TextCache:
  """Read access to a written cache: `get(caption_ids)` → {'text_hidden' float32 (n, L, D),
  'text_mask' int32 (n, L), 'text_pooled' float32 (n, D)}."""

  def __init__(self, directory, expected=None):
    directory = epath.Path(directory)
    meta = array_files.read_json(WHAT, directory, META)
    if meta is None:
      raise errors.DataError(f'no text cache in {directory} ({META} is missing); write it with '
                             '--mode=encode.')
    _check(meta, expected, directory)
    array_files.verify(WHAT, directory, CHECKSUMS, ARRAYS)
    self.meta, self.directory = meta, directory
    self.num_captions, self.max_length = int(meta['num_captions']), int(meta['max_length'])
    self._arrays = {name: array_files.load(WHAT, directory, name) for name in ARRAYS}
    if len(self._arrays['hidden.npy']) != self.num_captions:
      raise array_files.damaged(WHAT, directory, 'hidden.npy',
                                f'it holds {len(self._arrays["hidden.npy"])} rows, not the '
                                f'{self.num_captions} of {META}')

  def get(self, caption_ids):
    rows = np.asarray(caption_ids, np.int64)
    hidden = np.asarray(self._arrays['hidden.npy'][rows])
    if self.meta['dtype'] == 'bfloat16':
      hidden = hidden.view(ml_dtypes.bfloat16)
    return {'text_hidden': hidden.astype(np.float32),
            'text_mask': self._arrays['mask.npy'][rows].astype(np.int32),
            'text_pooled': np.asarray(self._arrays['pooled.npy'][rows], np.float32)}


_IDENTITY = ('encoder', 'fingerprint', 'captions', 'num_captions', 'max_length', 'width')


def _check(meta, expected, directory):
  if expected is None:
    return
  wrong = array_files.differences(meta, expected, _IDENTITY)
  if wrong:
    raise TextCacheMismatchError(
        f'the text cache in {directory} holds other outputs: {"; ".join(wrong)}. Point '
        '--config.text.cache_dir at a new directory (or delete this one) to encode again.')


def open_or_write(encoder, texts, directory, *, dtype='float16', batch_size=64):
  """The cache of `texts` by `encoder` in `directory`, written first when absent."""
  expected = describe(encoder, texts)
  if array_files.read_json(WHAT, directory, META) is None:
    logging.info('Writing the text cache of %d captions (%s) to %s.', len(texts), encoder.name,
                 directory)
    write(encoder, texts, directory, dtype=dtype, batch_size=batch_size)
  return TextCache(directory, expected)
