"""Input pipeline: datasets (Fashion-MNIST, TFDS array_record sources), deterministic batches.

Data flow: a `Dataset` (random access by example index) → `BatchIterator` (global batch of
step `s` is a pure function of `(seed, s)`, each process takes its contiguous slice) → jax
arrays, optionally assembled into one global array with `jax.make_array_from_process_local_data`.
The iterator's state is `{'step', 'seed', ...}` (JSON); the checkpoint stores it, and a resumed
iterator yields bitwise the same batches as the uninterrupted stream.

Images come out as float32 NHWC in [-1, 1] (`images.to_model`: uint8 data → `x / 127.5 - 1`;
float data is in [-1, 1] already), labels as int32 in [0, num_classes).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import errors
from guidedflow import fashion_mnist
from guidedflow import image_folder
from guidedflow import images as images_lib
from guidedflow import schema
from guidedflow.datasets import Dataset  # re-exported: input_pipeline.Dataset

# The Fashion-MNIST reader lives in its own module; these names stay importable from here.
DataError = errors.DataError
FASHION_MNIST_DIR = fashion_mnist.FASHION_MNIST_DIR
load_fashion_mnist = fashion_mnist.load_fashion_mnist


# ---------------------------------------------------------------------------------------------
# Datasets: random access by example index.


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises DataError unless every label is in [0, num_classes), with the fix the labels
  suggest: 1-based ids (subtract 1), a dense 0..M (num_classes=M+1), or a few odd values
  such as an 'unlabeled' marker -1 or 255 (drop or remap them; raising num_classes to 256
  would train 246 empty classes)."""
  if labels.size == 0:
    return
  low, high = int(labels.min()), int(labels.max())
  if low >= 0 and high < num_classes:
    return
  allowed = f'--config.input.num_classes={num_classes} allows only [0, {num_classes - 1}]'
  values, counts = np.unique(labels, return_counts=True)
  if low == 1 and (high == num_classes or len(values) == high):  # 1..K, or every id of 1..high
    resize = (f' and set --config.input.num_classes={high}' if high != num_classes else '')
    raise DataError(
        f'{where} has labels 1..{high}: they look 1-based, but {allowed} (index {num_classes} '
        f'is the null label of classifier-free guidance). Subtract 1 from every label when '
        f'preparing the data{resize}, or check --config.input.label_key.')
  if low == 0 and len(values) == high + 1:  # every id of 0..high occurs: real classes
    raise DataError(
        f'{where} has labels 0..{high}, every one of them used, but {allowed}. Set '
        f'--config.input.num_classes={high + 1} (labels must be 0..K-1; index K is the null '
        'label of classifier-free guidance) or check --config.input.label_key.')
  outside = (values < 0) | (values >= num_classes)
  shown = ', '.join(f'{v} ({c} example{"s" if c > 1 else ""})'
                    for v, c in zip(values[outside][:5], counts[outside][:5]))
  more = f', and {int(outside.sum()) - 5} more' if outside.sum() > 5 else ''
  num_outside = int(counts[outside].sum())
  # Several values on many examples may be classes; one value (a marker) or a few never are.
  classes = (f'; if they are classes, set --config.input.num_classes={high + 1}'
             if low >= 0 and outside.sum() > 1 and num_outside > labels.size // 10 else '')
  raise DataError(
      f'{where}: {num_outside} of {labels.size} examples have labels outside '
      f'[0, {num_classes - 1}]: {shown}{more}; {allowed}. Drop or remap those examples (e.g. '
      'an "unlabeled" marker such as -1 or 255) when preparing the data, or check '
      f'--config.input.label_key{classes}.')


def _as_nhwc(images: np.ndarray, where: str) -> np.ndarray:
  if images.ndim == 3:  # (N, H, W) grey images.
    return images[..., None]
  if images.ndim != 4:
    raise DataError(f'{where}: expected images of shape (H, W) or (H, W, C) per example, got '
                    f'{images.shape[1:]}. Check --config.input.image_key.')
  return images


class ArrayDataset(Dataset):
  """In-memory dataset (numpy arrays); `get_batch` is one vectorised gather."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int,
               name: str = 'arrays', split: str = 'train'):
    where = f'Dataset {name!r} split {split!r}'
    images = _as_nhwc(np.asarray(images), where)
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
      raise DataError(f'{where}: {images.shape[0]} images but labels of shape {labels.shape}; '
                      'need one integer label per image.')
    if not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f'{where}: labels have dtype {labels.dtype}; need integer class ids.')
    _check_labels(labels, num_classes, where)
    self.images = images
    self.labels = labels.astype(np.int32)
    self.name, self.split = name, split
    self.num_examples = int(images.shape[0])
    self.image_shape = tuple(int(d) for d in images.shape[1:])
    self.num_classes = int(num_classes)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    return {'image': self.images[indices], 'label': self.labels[indices]}


class TfdsDataset(Dataset):
  """A TFDS dataset prepared in array_record format, read through a random-access source."""

  def __init__(self, source: Any, *, name: str, split: str, image_key: str, label_key: str,
               num_classes: int, image_shape: tuple[int, ...] | None = None,
               image_size: int = 0):
    self.source = source
    self.image_size = int(image_size or 0)  # > 0: ADM center crop (images of varying size)
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    self.num_examples = len(source)
    self.num_classes = int(num_classes)
    if self.num_examples == 0:
      raise DataError(f'TFDS dataset {name!r} split {split!r} is empty; choose another split '
                      '(--config.input.train_split / eval_split).')
    if self.image_size and image_shape is not None:
      channels = image_shape[-1] if len(image_shape) == 3 and image_shape[-1] else 3
      image_shape = (self.image_size, self.image_size, channels)
    if image_shape is None or any(d is None for d in image_shape):
      image_shape = np.shape(self._read([0])[image_key])[1:]  # Shape of the first example.
    image_shape = tuple(int(d) for d in image_shape)
    self.image_shape = image_shape + (1,) if len(image_shape) == 2 else image_shape
    self._lock = threading.Lock()  # array_record readers are not documented as thread-safe.

  def _read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    keys = [int(i) for i in indices]
    getitems = getattr(self.source, '__getitems__', None)
    records = getitems(keys) if getitems is not None else [self.source[k] for k in keys]
    out = {}
    crop = lambda x: x
    if self.image_size:
      crop = lambda x: image_folder.center_crop_array(x, self.image_size)
    for key in (self.image_key, self.label_key):
      try:
        out[key] = np.stack([crop(np.asarray(r[key])) if key == self.image_key
                             else np.asarray(r[key]) for r in records])
      except KeyError:
        raise DataError(
            f'TFDS dataset {self.name!r} has no feature {key!r}; its features are '
            f'{sorted(records[0])}. Set --config.input.image_key / label_key.') from None
    return out

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    with self._lock:
      raw = self._read(indices)
    where = f'TFDS dataset {self.name!r} split {self.split!r}'
    images = _as_nhwc(raw[self.image_key], where)
    if images.shape[1:] != self.image_shape:
      raise DataError(f'{where}: example images have shapes {self.image_shape} and '
                      f'{images.shape[1:]}; all images must share one shape (resize when '
                      'preparing the dataset).')
    labels = raw[self.label_key]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f'{where}: feature {self.label_key!r} is {labels.dtype} of shape '
                      f'{labels.shape[1:]} per example; need a scalar integer class id. Set '
                      '--config.input.label_key.')
    _check_labels(labels, self.num_classes, where)
    return {'image': images, 'label': labels.astype(np.int32)}


def load_tfds_source(name: str, split: str, data_dir: str | None = None) -> tuple[Any, Any]:
  """Opens a prepared TFDS dataset (array_record) as a random-access source; no network.

  Returns:
    (source, builder): `source[i]` / `source.__getitems__(indices)` give feature dicts.
  """
  import tensorflow_datasets as tfds  # Heavy import; only TFDS users pay for it.

  how_to_prepare = (
      f'Prepare it in array_record format first, e.g. `tfds build {name} '
      '--file_format=array_record' + (f' --data_dir={data_dir}`' if data_dir else '`')
      + ' (or builder.download_and_prepare(file_format="array_record")), and pass the same '
      'directory as --config.input.data_dir (None = $TFDS_DATA_DIR or ~/tensorflow_datasets).')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends: show the short reason only.
    reason = (str(e).strip() or type(e).__name__).splitlines()[0].rstrip('.')
    raise DataError(f'TFDS dataset {name!r} not found in data_dir={data_dir!r}: '
                    f'{reason}. {how_to_prepare}') from None
  if not builder.is_prepared():
    raise DataError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir}. '
                    + how_to_prepare)
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:  # Prepared as tfrecord: no random access.
    raise DataError(f'TFDS dataset {name!r} in {builder.data_dir} has no random-access '
                    f'format ({str(e).splitlines()[0]}). {how_to_prepare}') from None
  except ValueError as e:  # Unknown split.
    raise DataError(f'TFDS dataset {name!r}: {e} Set --config.input.train_split / '
                    'eval_split.') from None
  return source, builder


def _tfds_dataset(name: str, split: str, data_dir: str | None, image_key: str, label_key: str,
                  num_classes: int, image_size: int = 0) -> TfdsDataset:
  source, builder = load_tfds_source(name, split, data_dir)
  features = builder.info.features
  image_shape = None
  try:
    image_shape = tuple(features[image_key].shape)
  except (KeyError, AttributeError, TypeError):
    if image_key not in features.keys():
      raise DataError(f'TFDS dataset {name!r} has no feature {image_key!r}; its features are '
                      f'{sorted(features.keys())}. Set --config.input.image_key.') from None
  if label_key not in features.keys():
    raise DataError(f'TFDS dataset {name!r} has no feature {label_key!r}; its features are '
                    f'{sorted(features.keys())}. Set --config.input.label_key.')
  declared = getattr(features[label_key], 'num_classes', None)
  if declared is not None and declared > num_classes:
    raise DataError(
        f'TFDS dataset {name!r} declares {declared} classes in {label_key!r} but '
        f'--config.input.num_classes={num_classes}. Set --config.input.num_classes={declared}.')
  return TfdsDataset(source, name=name, split=split, image_key=image_key, label_key=label_key,
                     num_classes=num_classes, image_shape=image_shape, image_size=image_size)


# The input section's defaults (the schema's): what a partial `input_config` lacks.
_INPUT_DEFAULTS = schema.common.image_data()


def _cfg(config: Any, key: str) -> Any:
  """input_config.<key> of a ConfigDict, dict or attribute object; the schema's default when
  it lacks the key (a test's or a library user's partial section)."""
  if isinstance(config, Mapping):
    return config[key] if key in config else _INPUT_DEFAULTS[key]
  return getattr(config, key, _INPUT_DEFAULTS[key])


def create_dataset(input_config: Any, split: str) -> Dataset:
  """Builds the dataset named by `input_config.dataset` for `split`.

  Args:
    input_config: the config's `input` group (ConfigDict, dict or any attribute object) with
      `dataset` ('fashion_mnist' | 'tfds:<name>' | 'imagefolder'), `data_dir`, `image_key`,
      `label_key`, `num_classes`, `image_size` (> 0: ADM center crop, `image_folder`).
    split: split name, e.g. `input_config.train_split` ('train') or `eval_split` ('test'); TFDS
      slicing like 'train[:90%]' works for TFDS datasets.
  """
  dataset = _cfg(input_config, 'dataset')
  data_dir = _cfg(input_config, 'data_dir')
  num_classes = int(_cfg(input_config, 'num_classes'))
  image_size = int(_cfg(input_config, 'image_size') or 0)
  if dataset == 'imagefolder':
    return image_folder.ImageFolderDataset(data_dir or '', split, image_size=image_size,
                                           num_classes=num_classes)
  if dataset == 'fashion_mnist':
    images, labels = load_fashion_mnist(data_dir, split)
    return ArrayDataset(images, labels, num_classes=num_classes, name=dataset, split=split)
  if isinstance(dataset, str) and dataset.startswith('tfds:') and len(dataset) > 5:
    return _tfds_dataset(dataset[5:], split, data_dir, _cfg(input_config, 'image_key'),
                         _cfg(input_config, 'label_key'), num_classes, image_size)
  raise DataError(f'Unknown dataset {dataset!r}: set --config.input.dataset to '
                  "'fashion_mnist', 'tfds:<name>' (a TFDS dataset prepared as array_record) or "
                  "'imagefolder' (class folders of JPEGs under input.data_dir/<split>).")


def take(dataset: Dataset, num_examples: int) -> Dataset:
  """The first `num_examples` examples of `dataset` (0 or more than it has: all of it)."""
  if not num_examples or num_examples >= dataset.num_examples:
    return dataset
  batch = dataset.get_batch(np.arange(num_examples))
  return ArrayDataset(batch['image'], batch['label'], num_classes=dataset.num_classes,
                      name=dataset.name, split=f'{dataset.split}[:{num_examples}]')


# ---------------------------------------------------------------------------------------------
# Batches.


def _process_slice(global_batch_size: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise DataError(f'Global batch size {global_batch_size} is not divisible by the number '
                    f'of processes {process_count}; set --config.train.batch_size to a multiple '
                    f'of {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  local = global_batch_size // process_count
  return process_index * local, (process_index + 1) * local


def to_model(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A dataset batch as the model takes it: 'image' through `images.to_model`, the rest (labels,
  latent moments) as it is."""
  out = dict(batch)
  if 'image' in out:
    out['image'] = images_lib.to_model(out['image'])
  return out


def _to_jax(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, jax.Array]:
  if sharding is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  out = {}
  for key, value in batch.items():
    if value.ndim < len(sharding.spec):  # Labels, masks: shard the batch axis only.
      spec = jax.sharding.PartitionSpec(*sharding.spec[:value.ndim])
      value_sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    else:
      value_sharding = sharding
    out[key] = jax.make_array_from_process_local_data(value_sharding, value)
  return out


class BatchIterator:
  """Infinite, deterministic, resumable iterator of shuffled training batches.

  The stream is the concatenation of epochs; epoch `e` is the permutation drawn by
  `np.random.default_rng([seed, e])`. Step `s` reads stream positions `[s*B, (s+1)*B)` (a batch
  may straddle two epochs, so every example appears exactly once per epoch). Every process
  computes the same global indices and gathers only its slice `[p*B/P, (p+1)*B/P)`.

  Args:
    dataset: a `Dataset`.
    global_batch_size: B, summed over all processes.
    seed: shuffling seed.
    sharding: optional `NamedSharding` for the image batch (batch axis first); the global batch
      is assembled with `jax.make_array_from_process_local_data`; labels use its first axis
      entries. None: arrays on the default device (process-local batches).
    start_step: first step to produce.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    prefetch: batches prepared ahead in one background thread (0 disables; None: 2 for
      file-backed datasets, 0 for in-memory ones, whose ~60 µs gathers gain nothing from a
      thread). Batches are a pure function of the step, so prefetching never changes them.
  """

  def __init__(self, dataset: Dataset, *, global_batch_size: int, seed: int, sharding=None,
               start_step: int = 0, process_index: int | None = None,
               process_count: int | None = None, prefetch: int | None = None):
    if global_batch_size <= 0:
      raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
    if dataset.num_examples == 0:
      raise DataError(f'{dataset!r} is empty.')
    self.dataset = dataset
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.sharding = sharding
    self.step = int(start_step)
    self._lo, self._hi = _process_slice(self.global_batch_size, process_index, process_count)
    # A process-local dataset (this process's shard of the latent cache): this process's part
    # of every batch is drawn from it alone, by its own permutations.
    self._stream_batch, self._rng_extra = self.global_batch_size, ()
    if getattr(dataset, 'process_local', False):
      self._stream_batch, self._lo, self._hi = self._hi - self._lo, 0, self._hi - self._lo
      self._rng_extra = (jax.process_index() if process_index is None else process_index,)
    self._permutations: dict[int, np.ndarray] = {}
    self._perm_lock = threading.Lock()
    if prefetch is None:
      prefetch = 0 if isinstance(dataset, ArrayDataset) else 2
    self._prefetch = int(prefetch)
    self._executor = (concurrent.futures.ThreadPoolExecutor(1, 'batch_prefetch')
                      if self._prefetch > 0 else None)
    self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}

  # -- pure functions of (seed, step) -----------------------------------------------------------

  def _permutation(self, seed: int, epoch: int) -> np.ndarray:
    with self._perm_lock:
      perm = self._permutations.get((seed, epoch))
      if perm is None:
        perm = np.random.default_rng([seed, epoch, *self._rng_extra]).permutation(
            self.dataset.num_examples)
        if len(self._permutations) >= 4:  # A batch touches at most a few consecutive epochs.
          self._permutations.pop(min(self._permutations))
        self._permutations[(seed, epoch)] = perm
      return perm

  def global_indices(self, step: int, seed: int | None = None) -> np.ndarray:
    """Dataset indices of the whole global batch of `step` (same on every process); of this
    process's part of it for a process-local dataset."""
    seed = self.seed if seed is None else seed
    n = self.dataset.num_examples
    positions = np.arange(step * self._stream_batch, (step + 1) * self._stream_batch,
                          dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      indices[where] = self._permutation(seed, int(epoch))[offsets[where]]
    return indices

  def host_batch(self, step: int, seed: int | None = None) -> dict[str, np.ndarray]:
    """This process's slice of the batch of `step` as numpy (`to_model`)."""
    indices = self.global_indices(step, seed)[self._lo:self._hi]
    return to_model(self.dataset.get_batch(indices))

  # -- iteration ----------------------------------------------------------------------------------

  def _get_host_batch(self, step: int) -> dict[str, np.ndarray]:
    if self._executor is None:
      return self.host_batch(step)
    future = self._pending.pop((self.seed, step), None)
    # Drop stale work (after set_state) and keep `prefetch` future steps in flight.
    for key in [k for k in self._pending if k[0] != self.seed or not step < k[1]]:
      self._pending.pop(key).cancel()
    for ahead in range(step + 1, step + 1 + self._prefetch):
      if (self.seed, ahead) not in self._pending:
        self._pending[(self.seed, ahead)] = self._executor.submit(self.host_batch, ahead,
                                                                  self.seed)
    return future.result() if future is not None else self.host_batch(step)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = _to_jax(self._get_host_batch(self.step), self.sharding)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """JSON-able state; the next batch is the one of `step`."""
    return {'step': self.step, 'seed': self.seed, 'global_batch_size': self.global_batch_size,
            'num_examples': self.dataset.num_examples}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues the stream described by `state` (from `get_state`, e.g. via a checkpoint)."""
    for key, current in (('global_batch_size', self.global_batch_size),
                         ('num_examples', self.dataset.num_examples)):
      if key in state and int(state[key]) != current:
        logging.warning('Resuming a data stream saved with %s=%s, now %s: the batches differ '
                        'from the uninterrupted run.', key, state[key], current)
    self.step = int(state['step'])
    self.seed = int(state.get('seed', self.seed))

  def close(self) -> None:
    if self._executor is not None:
      for future in self._pending.values():
        future.cancel()
      self._pending.clear()
      self._executor.shutdown(wait=True)
      self._executor = None

  def __enter__(self) -> 'BatchIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # Interpreter shutdown.
      pass


def eval_batches(dataset: Dataset, batch_size: int, *, sharding=None,
                 num_batches: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Yields the split in order, in fixed-shape batches, for held-out metrics.

  The last partial batch is padded (with copies of the first examples) to `batch_size`; each
  batch carries `mask` (float32, 1 = real example, 0 = padding): average losses as
  `sum(loss * mask) / sum(mask)`. Fixed shapes mean one compile. Processes split each global
  batch as `BatchIterator` does.

  Args:
    dataset: a `Dataset`.
    batch_size: global batch size.
    sharding: as in `BatchIterator`.
    num_batches: stop after this many batches; None or 0 = the whole split.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
  """
  lo, hi = _process_slice(batch_size, process_index, process_count)
  total = -(-dataset.num_examples // batch_size)
  if num_batches:
    total = min(total, num_batches)
  for b in range(total):
    positions = np.arange(b * batch_size, (b + 1) * batch_size)[lo:hi]
    mask = (positions < dataset.num_examples).astype(np.float32)
    batch = dataset.get_batch(np.where(mask > 0, positions, positions % dataset.num_examples))
    yield _to_jax(dict(to_model(batch), mask=mask), sharding)
