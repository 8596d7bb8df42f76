"""The latent cache: a split encoded once into latent moments on disk, read by random access.

Layout of `<cache_dir>/<split>/`:
  moments-PPPPP-of-QQQQQ.npy  (n_p, 2, h, w, c): mean and log-variance of process p's examples
                              p, p + Q, p + 2Q, ... (example e = image e // 2, mirrored when
                              odd, with `autoencoder.flip`; else image e)
  labels-PPPPP-of-QQQQQ.npy   (n_p,) int32: the class, or an image–caption dataset's caption id
  checksums-PPPPP-of-QQQQQ.json  size and CRC-32 of both (`checksums.file_record`), checked
                              when the shard is opened: a damaged file is one line naming it
  meta.json                   what was encoded (`latents.describe`: the autoencoder's
                              fingerprint, dataset, split, flips, shapes), shards, throughput
Each process encodes and writes its own shard, row by row into a memory-mapped file (RAM
does not grow with the split), then its checksums (JPEG decoding in grain worker processes when
the dataset reads files); meta.json is written last, by process 0, so a cache without it is
incomplete and is written again. Reading memory-maps the shards and touches only the rows of
this process's slice of each batch. For training, a cache written by as many processes as run
now is read process-locally: each process draws its part of every batch from its own shard
(`LatentCacheDataset(shard=p)`), so a host needs only its shard on its disk. A cache whose
meta.json describes other latents (another autoencoder, dataset, split or flip setting) is
refused, never overwritten.
"""

import json
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from guidedflow import array_files
from guidedflow import atomic
from guidedflow import input_pipeline
from guidedflow import latents as latents_lib

META = 'meta.json'
WHAT = 'latent cache'
DTYPES = ('float32', 'float16')


class CacheMismatchError(input_pipeline.DataError):
  """The cache on disk holds other latents than the config asks for."""


def _shard_names(process, count):
  suffix = f'{process:05d}-of-{count:05d}.npy'
  return f'moments-{suffix}', f'labels-{suffix}'


def _checksums_name(process, count):
  return f'checksums-{process:05d}-of-{count:05d}.json'


def _examples(num, process, count):
  """The examples of process `process`'s shard: every `count`-th, from `process` (a uniform
  sample of the split: an ImageFolder is sorted by class); example e is row e // count of
  shard e % count."""
  return np.arange(process, num, count)


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
  examples = _examples(num, process, count)
  moments_name, labels_name = _shard_names(process, count)
  moments = array_files.open_rows(directory, moments_name, (len(examples), 2) + tuple(
      space.latent_shape(dataset.image_shape)), np.dtype(dtype))
  labels = array_files.open_rows(directory, labels_name, (len(examples),), np.int32)
  t0, done = time.time(), 0
  for images, batch_labels in _image_batches(dataset, examples, flip, batch_size, workers):
    n = len(batch_labels)
    padded = np.concatenate([images, np.repeat(images[-1:], batch_size - n, 0)])
    mean, logvar = space.encode(padded)  # one compiled batch shape
    moments[done:done + n, 0], moments[done:done + n, 1] = mean[:n], logvar[:n]
    labels[done:done + n] = batch_labels
    done += n
    logging.log_every_n_seconds(logging.INFO, 'Encoded %d/%d examples into %s.', 30, done,
                                len(examples), directory)
  seconds = time.time() - t0
  array_files.finish(directory, {moments_name: moments, labels_name: labels},
                     _checksums_name(process, count))
  del moments, labels
  meta = dict(latents_lib.describe(space, dataset, flip), num_examples=int(num),
              dtype=str(np.dtype(dtype)), process_count=count,
              encode_images_per_s=round(len(examples) / max(seconds, 1e-9), 1),
              encode_s=round(seconds, 2))
  _barrier(f'latent cache {directory}: shards written')
  if process == 0:
    atomic.write_text(directory / META, json.dumps(meta, indent=2))
  _barrier(f'latent cache {directory}: meta written')
  logging.info('Latent cache %s: %d examples encoded at %.1f img/s (this process).', directory,
               len(examples), meta['encode_images_per_s'])
  return meta


def _barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def verify_shard(directory, process, count):
  """Checks the files of shard `process` against the checksums written with them."""
  array_files.verify(WHAT, directory, _checksums_name(process, count),
                     _shard_names(process, count))


class LatentCacheDataset(input_pipeline.Dataset):
  """Random access to a written cache: `get_batch` → {'mean', 'logvar', 'label'} (float32).

  `shard=p` opens only process p's shard (`process_local`: the batch iterator then draws this
  process's part of every batch from it alone, and the other shards need not be on this host).
  """

  def __init__(self, directory, expected=None, *, shard=None):
    directory = epath.Path(directory)
    meta = array_files.read_json(WHAT, directory, META)
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
    self.process_local = shard is not None
    self._count = 1 if shard is not None else count
    self._moments, self._labels = [], []
    for p in (range(count) if shard is None else [shard]):
      moments_name, labels_name = _shard_names(p, count)
      verify_shard(directory, p, count)
      self._moments.append(array_files.load(WHAT, directory, moments_name))
      self._labels.append(array_files.load(WHAT, directory, labels_name))
      expected_rows = len(_examples(self.num_examples, p, count))
      if len(self._labels[-1]) != expected_rows or len(self._moments[-1]) != expected_rows:
        raise input_pipeline.DataError(
            f'latent cache {directory}: shard {moments_name} holds {len(self._moments[-1])} '
            f'examples, not the {expected_rows} of its {META}: it is damaged; delete the '
            'directory and write it again.')
    if shard is not None:
      self.num_examples = len(self._labels[0])

  def __getstate__(self):  # pickled into grain workers: the shards' paths, mapped again there
    state = dict(self.__dict__)
    state['_moments'] = [m.filename for m in self._moments]
    state['_labels'] = [m.filename for m in self._labels]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._moments = [np.load(f, mmap_mode='r') for f in state['_moments']]
    self._labels = [np.load(f, mmap_mode='r') for f in state['_labels']]

  def get_batch(self, indices):
    indices = np.asarray(indices, np.int64)
    shards, rows = indices % self._count, indices // self._count
    moments = np.empty((len(indices), 2) + self.image_shape, np.float32)
    labels = np.empty((len(indices),), np.int32)
    for s in np.unique(shards):
      where = np.nonzero(shards == s)[0]
      where = where[np.argsort(rows[where])]  # ascending reads of the memory map
      moments[where] = self._moments[s][rows[where]]
      labels[where] = self._labels[s][rows[where]]
    return {'mean': moments[:, 0], 'logvar': moments[:, 1], 'label': labels}


_IDENTITY = ('fingerprint', 'dataset', 'split', 'num_images', 'flip', 'image_shape',
             'latent_shape')


def check(meta, expected, directory):
  """Refuses a cache whose meta differs from `expected` (`latents.describe`) in what it is."""
  if expected is None:
    return
  wrong = array_files.differences(meta, expected, _IDENTITY)
  if wrong:
    raise CacheMismatchError(
        f'the latent cache in {directory} holds other latents: {"; ".join(wrong)}. It was '
        f'written from the autoencoder {meta.get("autoencoder")}; point '
        '--config.autoencoder.cache_dir at a new directory (or delete this one) to encode '
        'again.')


def open_split(space, dataset, directory, *, flip, batch_size, dtype, workers,
               process_local=False):
  """The cache of `dataset` in `directory`, written first when absent or incomplete.

  With `process_local`, a cache written by as many processes as run now is opened as this
  process's shard only (each process trains on the examples it encoded).
  """
  expected = latents_lib.describe(space, dataset, flip)
  meta = array_files.read_json(WHAT, directory, META)
  if meta is None:
    logging.info('Writing the latent cache of %s %s to %s.', dataset.name, dataset.split,
                 directory)
    write(space, dataset, directory, flip=flip, batch_size=batch_size, dtype=dtype,
          workers=workers)
  shard = None
  if process_local and jax.process_count() > 1:
    written_by = int(array_files.read_json(WHAT, directory, META)['process_count'])
    if written_by == jax.process_count():
      shard = jax.process_index()
      logging.info('Reading the latent cache %s process-locally: shard %d of %d.', directory,
                   shard, written_by)
    else:
      logging.warning('The latent cache %s was written by %d processes, not %d: every process '
                      'reads the rows of its batch slices from all shards.', directory,
                      written_by, jax.process_count())
  cached = LatentCacheDataset(directory, expected, shard=shard)
  cached.num_classes = dataset.num_classes
  return cached
