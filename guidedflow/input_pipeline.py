"""Input pipeline: datasets (Fashion-MNIST, TFDS array_record sources), deterministic batches.

Data flow: a `Dataset` (random access by example index) → `batches.HostBatches` (a grain
`MapDataset` whose element `s` is this process's slice of the global batch of step `s`, a pure
function of `(seed, s)`) → `batches.BatchIterator` (grain's iterator with a prefetch thread for
file-backed datasets, the loop's thread for in-memory arrays; jax arrays, optionally one global
array assembled with `jax.make_array_from_process_local_data`). The iterator's state is
`{'step', 'seed', ...}` (JSON; 'step' is grain's `next_index`); the checkpoint stores it, and a
resumed iterator yields bitwise the same batches as the uninterrupted stream.

Images come out as float32 NHWC in [-1, 1] (`images.to_model`: uint8 data → `x / 127.5 - 1`;
float data is in [-1, 1] already), labels as int32 in [0, num_classes).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

from guidedflow import batches
from guidedflow import caption_data
from guidedflow import errors
from guidedflow import fashion_mnist
from guidedflow import image_folder
from guidedflow import schema
from guidedflow.datasets import Dataset  # re-exported: input_pipeline.Dataset

# The Fashion-MNIST reader lives in its own module; these names stay importable from here.
DataError = errors.DataError
FASHION_MNIST_DIR = fashion_mnist.FASHION_MNIST_DIR
load_fashion_mnist = fashion_mnist.load_fashion_mnist
# The batches live in `batches` (a grain MapDataset of steps); these names stay importable here.
BatchIterator = batches.BatchIterator
eval_batches = batches.eval_batches
to_model = batches.to_model


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

  in_memory = True  # `BatchIterator` gathers in the loop's thread (no prefetch thread)

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
      `dataset` ('fashion_mnist' | 'tfds:<name>' | 'imagefolder' | 'caption_folder' |
      'webdataset'), `data_dir`, `image_key`, `label_key`, `num_classes`, `image_size` (> 0: ADM
      center crop, `image_folder`), `caption_column` (`caption_data`).
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
  if dataset == 'caption_folder':
    return caption_data.CaptionFolderDataset(data_dir or '', split, image_size=image_size,
                                             caption_column=_cfg(input_config, 'caption_column'))
  if dataset == 'webdataset':
    return caption_data.WebDatasetShards(data_dir or '', split, image_size=image_size)
  if dataset == 'fashion_mnist':
    images, labels = load_fashion_mnist(data_dir, split)
    return ArrayDataset(images, labels, num_classes=num_classes, name=dataset, split=split)
  if isinstance(dataset, str) and dataset.startswith('tfds:') and len(dataset) > 5:
    return _tfds_dataset(dataset[5:], split, data_dir, _cfg(input_config, 'image_key'),
                         _cfg(input_config, 'label_key'), num_classes, image_size)
  raise DataError(f'Unknown dataset {dataset!r}: set --config.input.dataset to '
                  "'fashion_mnist', 'tfds:<name>' (a TFDS dataset prepared as array_record), "
                  "'imagefolder' (class folders of JPEGs under input.data_dir/<split>), "
                  "'caption_folder' (input.data_dir/<split>/metadata.jsonl and its images) or "
                  "'webdataset' (.tar shards: input.data_dir/<split>/*.tar or a glob).")


def take(dataset: Dataset, num_examples: int) -> Dataset:
  """The first `num_examples` examples of `dataset` (0 or more than it has: all of it)."""
  if not num_examples or num_examples >= dataset.num_examples:
    return dataset
  batch = dataset.get_batch(np.arange(num_examples))
  return ArrayDataset(batch['image'], batch['label'], num_classes=dataset.num_classes,
                      name=dataset.name, split=f'{dataset.split}[:{num_examples}]')
