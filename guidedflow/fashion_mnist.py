"""Fashion-MNIST (or any MNIST-format idx pair) from its idx files, gzip-compressed or not.

The Debian package `dataset-fashion-mnist` installs them offline in `FASHION_MNIST_DIR`; every
way the files can be missing or damaged is a `DataError` that names the file and the fix.
"""

import gzip
import os
import zlib

import numpy as np

from guidedflow.errors import DataError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker',
               'bag', 'ankle boot')
# split → (images file, labels file), without the optional '.gz'.
_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions.
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension.
_INSTALL_HINT = (
    'Install it with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; files go to '
    f'{FASHION_MNIST_DIR}), or set --config.input.data_dir=DIR to a directory containing '
    '{files} (gzip-compressed or not).')


def _fashion_mnist_hint(split: str) -> str:
  names = ', '.join(f'{name}.gz' for name in _FASHION_MNIST_FILES[split])
  return _INSTALL_HINT.format(files=names)


def _find_idx_file(data_dir: str, name: str, split: str) -> str:
  for candidate in (name + '.gz', name):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  if not os.path.isdir(data_dir):
    raise DataError(f'Fashion-MNIST directory {data_dir} does not exist. '
                    + _fashion_mnist_hint(split))
  raise DataError(f'Fashion-MNIST file {name}.gz (or {name}) is missing from {data_dir}. '
                  + _fashion_mnist_hint(split))


def _read_bytes(path: str, split: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'Cannot read {path}: {e}. ' + _fashion_mnist_hint(split)) from None
  if raw[:2] != b'\x1f\x8b':  # Not gzip: an uncompressed idx file.
    if path.endswith('.gz'):
      raise DataError(
          f'{path} is not a gzip file (it does not start with the gzip signature 1f 8b); the '
          'file is corrupt. Re-install it (`apt-get install --reinstall -y '
          'dataset-fashion-mnist`) or replace it with a good copy.')
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(
        f'{path} is a corrupt or truncated gzip file ({type(e).__name__}: {e}). Re-install it '
        '(`apt-get install --reinstall -y dataset-fashion-mnist`) or replace it with a good '
        'copy.') from None


def _parse_idx(path: str, data: bytes, *, magic: int, ndim: int) -> np.ndarray:
  """Parses an unsigned-byte idx file with `ndim` dimensions; checks magic and size."""
  header_bytes = 4 + 4 * ndim
  if len(data) < header_bytes:
    raise DataError(
        f'{path} is truncated: its header needs {header_bytes} bytes but the file has '
        f'{len(data)} (after decompression). Re-download or re-install the file.')
  found_magic = int.from_bytes(data[:4], 'big')
  if found_magic != magic:
    raise DataError(
        f'{path} has the wrong idx magic number: expected {magic} (0x{magic:08x}, '
        f'{"images" if ndim == 3 else "labels"} file) but found {found_magic} '
        f'(0x{found_magic:08x}). The file is corrupt or an images/labels file was swapped; '
        'check the file names or re-install `dataset-fashion-mnist`.')
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  expected = header_bytes + int(np.prod(dims))
  if len(data) != expected:
    what = 'truncated' if len(data) < expected else 'too long'
    raise DataError(
        f'{path} is {what}: its header declares shape {dims}, i.e. {expected} bytes, but the '
        f'file has {len(data)} bytes (after decompression). Re-download or re-install the '
        'file.')
  return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims)


def load_fashion_mnist(data_dir: str | None = None,
                       split: str = 'train') -> tuple[np.ndarray, np.ndarray]:
  """Reads Fashion-MNIST (or any MNIST-format idx pair) from `data_dir`.

  Args:
    data_dir: directory with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`; None means
      `/usr/share/datasets/fashion-mnist` (Debian package `dataset-fashion-mnist`).
    split: 'train' (60k) or 'test' (10k, the `t10k` files).

  Returns:
    images uint8 (N, 28, 28, 1) and labels int32 (N,).

  Raises:
    DataError: files missing, corrupt gzip, wrong magic number, truncated, count mismatch.
  """
  data_dir = FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
  if split not in _FASHION_MNIST_FILES:
    raise DataError(f'Unknown Fashion-MNIST split {split!r}: use one of '
                    f'{sorted(_FASHION_MNIST_FILES)} (--config.input.train_split / eval_split).')
  images_name, labels_name = _FASHION_MNIST_FILES[split]
  images_path = _find_idx_file(data_dir, images_name, split)
  labels_path = _find_idx_file(data_dir, labels_name, split)
  images = _parse_idx(images_path, _read_bytes(images_path, split),
                      magic=_IDX_IMAGES_MAGIC, ndim=3)
  labels = _parse_idx(labels_path, _read_bytes(labels_path, split),
                      magic=_IDX_LABELS_MAGIC, ndim=1)
  if images.shape[0] != labels.shape[0]:
    raise DataError(
        f'Fashion-MNIST {split} split: {images_path} holds {images.shape[0]} images but '
        f'{labels_path} holds {labels.shape[0]} labels; the files come from different '
        'datasets or versions. Re-install `dataset-fashion-mnist` or fix --config.input.data_dir.')
  return images[..., None], labels.astype(np.int32)
