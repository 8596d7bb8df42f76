"""The text cache: a frozen text encoder's outputs for every caption of a caption set, encoded
once and read by caption id.

Layout of `<cache_dir>/`:
  ids.npy       (N, L) int32    the tokens (padded to the encoder's max_length L)
  mask.npy      (N, L) uint8    1 = a real token
  hidden.npy    (N, L, D)       the last hidden states (float16, float32, or bfloat16 kept as
                                its uint16 bits: numpy has no bfloat16 .npy type)
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


def write(encoder, texts, directory, *, dtype='float16', batch_size=64):
  """Encodes `texts` with `encoder` into `directory` (streamed: one batch in RAM at a time).

  Returns:
    meta (dict), with the encoding rate in captions/s.
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
  t0 = time.time()
  for start in range(0, n, batch_size):
    chunk = list(texts[start:start + batch_size])
    ids, mask = encoder.tokenize(chunk + chunk[-1:] * (batch_size - len(chunk)))  # one shape
    out = encoder.encode(ids, mask)
    stop = start + len(chunk)
    arrays['ids.npy'][start:stop] = np.asarray(ids)[:len(chunk)]
    arrays['mask.npy'][start:stop] = np.asarray(mask)[:len(chunk)]
    arrays['hidden.npy'][start:stop] = _to_stored(out['hidden'][:len(chunk)], dtype)
    arrays['pooled.npy'][start:stop] = np.asarray(out['pooled'][:len(chunk)], np.float32)
    logging.log_every_n_seconds(logging.INFO, 'Encoded %d/%d captions into %s.', 30, stop, n,
                                directory)
  seconds = time.time() - t0
  array_files.finish(directory, arrays, CHECKSUMS)
  atomic.write_text(directory / 'captions.json', json.dumps(list(texts), indent=0))
  meta = dict(describe(encoder, texts), dtype=dtype, encode_s=round(seconds, 2),
              captions_per_s=round(n / max(seconds, 1e-9), 1))
  atomic.write_text(directory / META, json.dumps(meta, indent=2))
  logging.info('Text cache %s: %d captions encoded by %s in %.1f s.', directory, n,
               encoder.name, seconds)
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
