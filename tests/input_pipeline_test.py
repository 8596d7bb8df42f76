"""Tests for guidedflow.input_pipeline: idx parsing and its errors, TFDS sources, iterator."""

import gzip
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from guidedflow import input_pipeline as ip

_INSTALL = 'apt-get install -y dataset-fashion-mnist'


# ---------------------------------------------------------------------------------------------
# Helpers.


def _idx_bytes(magic, array):
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path, data, compress=True):
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if compress else data)


def _write_split(directory, split='train', num_images=5, num_labels=None, compress=True,
                 images_magic=2051, labels_magic=2049):
  """Writes a small well-formed (unless told otherwise) idx pair; returns (images, labels)."""
  prefix = 'train' if split == 'train' else 't10k'
  suffix = '.gz' if compress else ''
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, (num_images if num_labels is None else num_labels,),
                        dtype=np.uint8)
  _write(os.path.join(directory, f'{prefix}-images-idx3-ubyte{suffix}'),
         _idx_bytes(images_magic, images), compress)
  _write(os.path.join(directory, f'{prefix}-labels-idx1-ubyte{suffix}'),
         _idx_bytes(labels_magic, labels), compress)
  return images, labels


def _index_dataset(num_examples, image_hw=(2, 2)):
  """Images whose every pixel is the example index (uint8), labels index % 10."""
  index = np.arange(num_examples)
  images = np.broadcast_to(index[:, None, None, None], (num_examples, *image_hw, 1))
  return ip.ArrayDataset(images.astype(np.uint8), index % 10, num_classes=10)


def _indices_of(batch):
  """Recovers the example indices from a batch of `_index_dataset` images in [-1, 1]."""
  return np.rint((np.asarray(batch['image'])[:, 0, 0, 0] + 1) * 127.5).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST files.


@pytest.mark.parametrize('split,count', [('train', 60000), ('test', 10000)])
def test_fashion_mnist_from_debian_files(split, count):
  images, labels = ip.load_fashion_mnist(None, split)
  assert images.shape == (count, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (count,) and labels.dtype == np.int32
  # Fashion-MNIST is class-balanced: 6000 / 1000 images per class.
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, count // 10))
  assert 0 < images.mean() < 255 and images.max() == 255


def test_uncompressed_and_gzip_files_agree(tmp_path):
  plain, gz = tmp_path / 'plain', tmp_path / 'gz'
  plain.mkdir(), gz.mkdir()
  images, labels = _write_split(plain, 'test', compress=False)
  _write_split(gz, 'test', compress=True)
  for directory in (plain, gz):
    got_images, got_labels = ip.load_fashion_mnist(str(directory), 'test')
    np.testing.assert_array_equal(got_images[..., 0], images)
    np.testing.assert_array_equal(got_labels, labels)


def test_missing_directory(tmp_path):
  with pytest.raises(ip.DataError) as error:
    ip.load_fashion_mnist(str(tmp_path / 'nowhere'))
  message = str(error.value)
  assert 'does not exist' in message and _INSTALL in message
  assert '--config.input.data_dir' in message and 'train-images-idx3-ubyte.gz' in message


def test_missing_file(tmp_path):
  _write_split(tmp_path, 'train')
  os.remove(tmp_path / 'train-labels-idx1-ubyte.gz')
  with pytest.raises(ip.DataError, match='train-labels-idx1-ubyte.gz .* is missing') as error:
    ip.load_fashion_mnist(str(tmp_path))
  assert _INSTALL in str(error.value)


def test_wrong_magic_number(tmp_path):
  _write_split(tmp_path, 'train', images_magic=2049)  # A labels magic on the images file.
  with pytest.raises(ip.DataError) as error:
    ip.load_fashion_mnist(str(tmp_path))
  message = str(error.value)
  assert 'train-images-idx3-ubyte.gz' in message and 'wrong idx magic number' in message
  assert 'expected 2051' in message and 'found 2049' in message


def test_truncated_file(tmp_path):
  images, labels = _write_split(tmp_path, 'train', num_images=5)
  data = _idx_bytes(2051, images)[:-100]
  _write(tmp_path / 'train-images-idx3-ubyte.gz', data)
  with pytest.raises(ip.DataError) as error:
    ip.load_fashion_mnist(str(tmp_path))
  message = str(error.value)
  assert 'train-images-idx3-ubyte.gz is truncated' in message
  assert f'{16 + 5 * 28 * 28} bytes' in message and f'{len(data)} bytes' in message
  assert 're-install' in message.lower()


def test_truncated_header(tmp_path):
  _write_split(tmp_path, 'train')
  _write(tmp_path / 'train-labels-idx1-ubyte.gz', b'\x00\x00\x08')
  with pytest.raises(ip.DataError, match='truncated: its header needs 8 bytes but the file has 3'):
    ip.load_fashion_mnist(str(tmp_path))


def test_count_mismatch(tmp_path):
  _write_split(tmp_path, 'test', num_images=5, num_labels=4)
  with pytest.raises(ip.DataError) as error:
    ip.load_fashion_mnist(str(tmp_path), 'test')
  message = str(error.value)
  assert 'holds 5 images' in message and 'holds 4 labels' in message
  assert 'dataset-fashion-mnist' in message


@pytest.mark.parametrize('damage', ['garbage', 'cut'])
def test_corrupt_gzip(tmp_path, damage):
  images, _ = _write_split(tmp_path, 'train')
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  good = gzip.compress(_idx_bytes(2051, images))
  bad = good[:10] + b'\xff' * 40 if damage == 'garbage' else good[:len(good) // 2]
  _write(path, bad, compress=False)
  with pytest.raises(ip.DataError) as error:
    ip.load_fashion_mnist(str(tmp_path))
  message = str(error.value)
  assert 'train-images-idx3-ubyte.gz is a corrupt or truncated gzip file' in message
  assert '--reinstall' in message


def test_unknown_split(tmp_path):
  with pytest.raises(ip.DataError, match='train_split'):
    ip.load_fashion_mnist(str(tmp_path), 'validation')


def test_create_dataset_fashion_mnist_and_label_check(tmp_path):
  _write_split(tmp_path, 'train', num_images=30)
  config = {'dataset': 'fashion_mnist', 'data_dir': str(tmp_path), 'num_classes': 10}
  dataset = ip.create_dataset(config, 'train')
  assert (dataset.num_examples, dataset.image_shape, dataset.num_classes) == (30, (28, 28, 1), 10)
  batch = dataset.get_batch(np.array([3, 0, 3]))
  np.testing.assert_array_equal(batch['image'][0], batch['image'][2])
  with pytest.raises(ip.DataError, match=r'--config.input.num_classes=\d+'):
    ip.create_dataset(dict(config, num_classes=3), 'train')
  with pytest.raises(ip.DataError, match="'tfds:<name>'"):
    ip.create_dataset(dict(config, dataset='cifar'), 'train')


def test_same_seed_and_step_give_same_batch():
  dataset = _index_dataset(50)
  first = ip.BatchIterator(dataset, global_batch_size=8, seed=3)
  second = ip.BatchIterator(dataset, global_batch_size=8, seed=3, prefetch=2)
  other_seed = ip.BatchIterator(dataset, global_batch_size=8, seed=4)
  for _ in range(8):
    a, b, c = next(first), next(second), next(other_seed)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(a['image'], c['image'])
  assert a['image'].dtype == np.float32 and a['label'].dtype == np.int32
  second.close()


def test_resume_from_state_is_bitwise_identical():
  images, labels = ip.load_fashion_mnist(None, 'test')
  dataset = ip.ArrayDataset(images, labels, num_classes=10)
  stream = ip.BatchIterator(dataset, global_batch_size=64, seed=7)
  uninterrupted, state = [], None
  for step in range(12):
    if step == 5:
      state = stream.get_state()
    uninterrupted.append(jax.device_get(next(stream)))
  assert state == {'step': 5, 'seed': 7, 'global_batch_size': 64, 'num_examples': 10000}
  resumed = ip.BatchIterator(dataset, global_batch_size=64, seed=123, prefetch=1)
  next(resumed)  # Some other position, with prefetched work in flight.
  resumed.set_state(state)
  for step in range(5, 12):
    batch = jax.device_get(next(resumed))
    assert batch['image'].tobytes() == uninterrupted[step]['image'].tobytes()
    assert batch['label'].tobytes() == uninterrupted[step]['label'].tobytes()
  assert resumed.get_state()['step'] == 12
  restarted = ip.BatchIterator(dataset, global_batch_size=64, seed=7, start_step=11)
  np.testing.assert_array_equal(next(restarted)['image'], uninterrupted[11]['image'])
  resumed.close()


def test_each_example_once_per_epoch_across_straddling_batches():
  dataset = _index_dataset(50)
  iterator = ip.BatchIterator(dataset, global_batch_size=8, seed=0)  # 8 ∤ 50: batches straddle.
  seen = np.concatenate([_indices_of(next(iterator)) for _ in range(25)])  # 200 = 4 epochs.
  epochs = seen.reshape(4, 50)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(50))
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled every epoch.
  np.testing.assert_array_equal(iterator.global_indices(3), seen[24:32])


def test_processes_take_disjoint_contiguous_slices():
  dataset = _index_dataset(50)
  whole = ip.BatchIterator(dataset, global_batch_size=8, seed=1, process_index=0,
                           process_count=1)
  halves = [ip.BatchIterator(dataset, global_batch_size=8, seed=1, process_index=p,
                             process_count=2) for p in range(2)]
  for _ in range(7):
    expected = _indices_of(next(whole))
    parts = [_indices_of(next(h)) for h in halves]
    assert len(parts[0]) == len(parts[1]) == 4
    assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.concatenate(parts), expected)
  with pytest.raises(ip.DataError, match='multiple of 3'):
    ip.BatchIterator(dataset, global_batch_size=8, seed=1, process_index=0, process_count=3)


def test_image_scaling_and_float_passthrough():
  dataset = ip.ArrayDataset(np.array([0, 255], np.uint8).reshape(2, 1, 1, 1), [0, 1],
                            num_classes=2)
  batch = ip.BatchIterator(dataset, global_batch_size=2, seed=0).host_batch(0)
  np.testing.assert_array_equal(np.sort(batch['image'].ravel()), [-1.0, 1.0])
  floats = np.array([-0.25, 0.75], np.float32).reshape(2, 1, 1, 1)
  dataset = ip.ArrayDataset(floats, [0, 1], num_classes=2)
  batch = ip.BatchIterator(dataset, global_batch_size=2, seed=0).host_batch(0)
  np.testing.assert_array_equal(np.sort(batch['image'].ravel()), [-0.25, 0.75])


def test_sharded_global_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None, None,
                                                                         None))
  batch_size = 4 * len(jax.devices())
  dataset = _index_dataset(50)
  iterator = ip.BatchIterator(dataset, global_batch_size=batch_size, seed=2, sharding=sharding)
  batch = next(iterator)
  assert batch['image'].sharding == sharding and batch['image'].shape == (batch_size, 2, 2, 1)
  assert batch['label'].sharding.spec == jax.sharding.PartitionSpec('data')
  np.testing.assert_array_equal(_indices_of(batch), iterator.global_indices(0))


def test_eval_batches_pad_and_mask():
  dataset = _index_dataset(50)
  batches = list(ip.eval_batches(dataset, 16))
  assert len(batches) == 4 and all(b['image'].shape == (16, 2, 2, 1) for b in batches)
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  indices = np.concatenate([_indices_of(b) for b in batches])
  np.testing.assert_array_equal(indices[masks > 0], np.arange(50))
  assert masks.sum() == 50 and masks[-14:].sum() == 0
  assert len(list(ip.eval_batches(dataset, 16, num_batches=2))) == 2
  second = list(ip.eval_batches(dataset, 16, process_index=1, process_count=2))
  np.testing.assert_array_equal(_indices_of(second[0]), np.arange(8, 16))


# ---------------------------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow).


class TinyGuidedflowDigits(tfds.core.GeneratorBasedBuilder):
  """20 train / 7 test examples; image pixels equal the example index."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'pixels': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {'train': self._generate_examples(20), 'test': self._generate_examples(7)}

  def _generate_examples(self, num_examples):
    for i in range(num_examples):
      yield i, {'pixels': np.full((8, 8, 1), i, np.uint8), 'label': i % 3}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  TinyGuidedflowDigits(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return str(data_dir)


def _tfds_config(data_dir, **overrides):
  config = {'dataset': 'tfds:tiny_guidedflow_digits', 'data_dir': data_dir,
            'image_key': 'pixels', 'label_key': 'label', 'num_classes': 3}
  config.update(overrides)
  return config


def test_tfds_dataset_through_iterator(tfds_dir):
  dataset = ip.create_dataset(_tfds_config(tfds_dir), 'train')
  assert (dataset.num_examples, dataset.image_shape, dataset.num_classes) == (20, (8, 8, 1), 3)
  batch = dataset.get_batch(np.array([4, 1, 4]))  # TFDS stores records in a shuffled order.
  pixels = batch['image'][:, 0, 0, 0]
  assert batch['image'].dtype == np.uint8 and pixels[0] == pixels[2] != pixels[1]
  np.testing.assert_array_equal(batch['label'], pixels % 3)
  iterator = ip.BatchIterator(dataset, global_batch_size=5, seed=0)  # prefetch: 2 threads ahead.
  batches = [next(iterator) for _ in range(8)]  # Two epochs.
  seen = np.concatenate([_indices_of(b) for b in batches])
  for epoch in seen.reshape(2, 20):
    np.testing.assert_array_equal(np.sort(epoch), np.arange(20))
  np.testing.assert_array_equal(np.concatenate([np.asarray(b['label']) for b in batches]),
                                seen % 3)
  iterator.close()
  test_split = ip.create_dataset(_tfds_config(tfds_dir), 'test')
  assert test_split.num_examples == 7


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(ip.DataError, match='not prepared') as error:
    ip.create_dataset(_tfds_config(str(tmp_path)), 'train')
  assert 'tfds build tiny_guidedflow_digits --file_format=array_record' in str(error.value)
  with pytest.raises(ip.DataError, match='not found'):
    ip.create_dataset(_tfds_config(tfds_dir, dataset='tfds:no_such_dataset_xyz'), 'train')
  with pytest.raises(ip.DataError, match='Unknown split'):
    ip.create_dataset(_tfds_config(tfds_dir), 'validation')
  with pytest.raises(ip.DataError, match='num_classes=3'):
    ip.create_dataset(_tfds_config(tfds_dir, num_classes=2), 'train')
  with pytest.raises(ip.DataError, match="no feature 'image'.*image_key"):
    ip.create_dataset(_tfds_config(tfds_dir, image_key='image'), 'train')
