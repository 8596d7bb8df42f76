"""The latent cache: a split encoded once into latent moments on disk, read by random access.

Layout of `<cache_dir>/<split>/`:
  moments-PPPPP-of-QQQQQ.npy  (n_p, 2, h, w, c): mean and log-variance of the examples of
                              process p's contiguous slice (example e = image e // 2, mirrored
                              when odd, with `autoencoder.flip`; else image e)
  labels-PPPPP-of-QQQQQ.npy   (n_p,) int32
  meta.json                   what was encoded (`latents.describe`: the autoencoder's
                              fingerprint, dataset, split, flips, shapes), shards, throughput
Each process encodes and writes its own slice (JPEG decoding in grain worker processes when
the dataset reads files); meta.json is written last, by process 0, so a cache without it is
incomplete and is written again. Reading memory-maps the shards: each process touches only
the rows of its slice of each batch. A cache whose meta.json describes other latents (another
autoencoder, dataset, split or flip setting) is refused, never overwritten.
"""

import json
import os
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from guidedflow import input_pipeline
from guidedflow import latents as latents_lib

META = 'meta.json'
DTYPES = ('float32', 'float16')


class CacheMismatchError(input_pipeline.DataError):
  """The cache on disk holds other latents than the config asks for."""


def _shard_names(process, count):
  suffix = f'{process:05d}-of-{count:05d}.npy'
  return f'moments-{suffix}', f'labels-{suffix}'


def _slice(num, process, count):
  return num * process // count, num * (process + 1) // count


def _image_batches(dataset, indices, flip, batch_size, workers):
  """(images, labels) of latent-dataset examples `indices` in batches; file-backed datasets
  decode in `workers` grain processes (in order)."""
  batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
  if workers and getattr(dataset, 'decodes_files', False):
    import grain  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags (library use, tests)
      flags.FLAGS.mark_as_parsed()
    source = grain.MapDataset.source(batches).map(
        lambda b: latents_lib.images_of(dataset, b, flip))
    yield from source.to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers))
  else:
    for batch in batches:
      yield latents_lib.images_of(dataset, batch, flip)


def write(space, dataset, directory, *, flip, batch_size=256, dtype='float32', workers=0,
          process_index=None, process_count=None):
  """Encodes `dataset` into the cache `directory` (this process's slice), then meta.json.

  Returns:
    meta (dict), with the encoding throughput of this process in images/s.
  """
  process = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  num = dataset.num_examples * (2 if flip else 1)
  lo, hi = _slice(num, process, count)
  shape = space.latent_shape(dataset.image_shape)
  moments = np.empty((hi - lo, 2) + shape, np.dtype(dtype))
  labels = np.empty((hi - lo,), np.int32)
  t0, done = time.time(), 0
  for images, batch_labels in _image_batches(dataset, np.arange(lo, hi), flip, batch_size,
                                             workers):
    n = len(batch_labels)
    padded = np.concatenate([images, np.repeat(images[-1:], batch_size - n, 0)])
    mean, logvar = space.encode(padded)  # one compiled batch shape
    moments[done:done + n, 0], moments[done:done + n, 1] = mean[:n], logvar[:n]
    labels[done:done + n] = batch_labels
    done += n
    logging.log_every_n_seconds(logging.INFO, 'Encoded %d/%d examples into %s.', 30, done,
                                hi - lo, directory)
  seconds = time.time() - t0
  names = _shard_names(process, count)
  for name, array in zip(names, (moments, labels)):
    tmp = directory / (name + '.tmp')
    with tmp.open('wb') as f:
      np.save(f, array)
    tmp.rename(directory / name)
  meta = dict(latents_lib.describe(space, dataset, flip), num_examples=int(num),
              dtype=str(np.dtype(dtype)), process_count=count,
              encode_images_per_s=round((hi - lo) / max(seconds, 1e-9), 1),
              encode_s=round(seconds, 2))
  _barrier(f'latent cache {directory}: shards written')
  if process == 0:
    (directory / META).write_text(json.dumps(meta, indent=2))
  _barrier(f'latent cache {directory}: meta written')
  logging.info('Latent cache %s: %d examples encoded at %.1f img/s (this process).', directory,
               hi - lo, meta['encode_images_per_s'])
  return meta


def _barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class LatentCacheDataset(input_pipeline.Dataset):
  """Random access to a written cache: `get_batch` → {'mean', 'logvar', 'label'} (float32)."""

  def __init__(self, directory, expected=None):
    directory = epath.Path(directory)
    meta = latents_lib.read_json(directory / META)
    if meta is None:
      raise input_pipeline.DataError(f'no latent cache in {directory} ({META} is missing); '
                                     'write it with --mode=encode.')
    check(meta, expected, directory)
    self.meta, self.directory = meta, directory
    self.name, self.split = meta['dataset'], meta['split']
    self.num_examples = int(meta['num_examples'])
    self.image_shape = tuple(meta['latent_shape'])
    self.pixel_shape = tuple(meta['image_shape'])
    self.num_classes = None  # set by `open_split`
    count = int(meta['process_count'])
    self._moments, self._labels, starts = [], [], [0]
    for p in range(count):
      moments_name, labels_name = _shard_names(p, count)
      self._moments.append(np.load(os.fspath(directory / moments_name), mmap_mode='r'))
      self._labels.append(np.load(os.fspath(directory / labels_name), mmap_mode='r'))
      starts.append(starts[-1] + len(self._labels[-1]))
    if starts[-1] != self.num_examples:
      raise input_pipeline.DataError(
          f'latent cache {directory} holds {starts[-1]} examples but its {META} says '
          f'{self.num_examples}: it is damaged; delete it and write it again.')
    self._starts = np.array(starts)

  def get_batch(self, indices):
    indices = np.asarray(indices, np.int64)
    shards = np.searchsorted(self._starts, indices, side='right') - 1
    moments = np.empty((len(indices), 2) + self.image_shape, np.float32)
    labels = np.empty((len(indices),), np.int32)
    for s in np.unique(shards):
      where = np.nonzero(shards == s)[0]
      rows = indices[where] - self._starts[s]
      order = np.argsort(rows)  # ascending reads of the memory map
      moments[where[order]] = self._moments[s][rows[order]]
      labels[where[order]] = self._labels[s][rows[order]]
    return {'mean': moments[:, 0], 'logvar': moments[:, 1], 'label': labels}


_IDENTITY = ('fingerprint', 'dataset', 'split', 'num_images', 'flip', 'image_shape',
             'latent_shape')


def check(meta, expected, directory):
  """Refuses a cache whose meta differs from `expected` (`latents.describe`) in what it is."""
  if expected is None:
    return
  wrong = [f'{key} {meta.get(key)!r} (this config: {expected[key]!r})' for key in _IDENTITY
           if meta.get(key) != expected[key]]
  if wrong:
    raise CacheMismatchError(
        f'the latent cache in {directory} holds other latents: {"; ".join(wrong)}. It was '
        f'written from the autoencoder {meta.get("autoencoder")}; point '
        '--config.autoencoder.cache_dir at a new directory (or delete this one) to encode '
        'again.')


def open_split(space, dataset, directory, *, flip, batch_size, dtype, workers):
  """The cache of `dataset` in `directory`, written first when absent or incomplete."""
  expected = latents_lib.describe(space, dataset, flip)
  meta = latents_lib.read_json(epath.Path(directory) / META)
  if meta is None:
    logging.info('Writing the latent cache of %s %s to %s.', dataset.name, dataset.split,
                 directory)
    write(space, dataset, directory, flip=flip, batch_size=batch_size, dtype=dtype,
          workers=workers)
  cached = LatentCacheDataset(directory, expected)
  cached.num_classes = dataset.num_classes
  return cached
