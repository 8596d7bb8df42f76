"""Tests for guidedflow.batches: the batch stream as a grain MapDataset, grain's iterator state
in the data state, old data states, worker processes."""

import logging
import pickle

import grain
import numpy as np
import pytest

from guidedflow import batches
from guidedflow import input_pipeline as ip


def _index_dataset(num_examples):
  """Images whose every pixel is the example index (uint8), labels index % 10."""
  index = np.arange(num_examples)
  images = np.broadcast_to(index[:, None, None, None], (num_examples, 2, 2, 1))
  return ip.ArrayDataset(images.astype(np.uint8), index % 10, num_classes=10)


def _indices_of(batch):
  return np.rint((np.asarray(batch['image'])[:, 0, 0, 0] + 1) * 127.5).astype(np.int64)


def test_host_batches_is_a_random_access_grain_dataset_in_the_old_order():
  """Element s is the batch of step s: the permutation of each epoch drawn by
  default_rng([seed, epoch]), batches straddling epochs, read in any order."""
  stream = batches.HostBatches(_index_dataset(50), global_batch_size=8, seed=5)
  assert isinstance(stream, grain.MapDataset)
  expected = np.concatenate([np.random.default_rng([5, e]).permutation(50) for e in range(3)])
  for step in (13, 0, 6, 7):  # 6 straddles epochs 0 and 1
    np.testing.assert_array_equal(_indices_of(stream[step]), expected[8 * step:8 * step + 8])
  through_grain = [_indices_of(b) for b in stream[3:7].to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=3))]
  np.testing.assert_array_equal(np.concatenate(through_grain), expected[24:56])


@pytest.mark.parametrize('prefetch', [0, 2])
def test_state_is_grains_next_index_and_resumes_to_the_same_batch(prefetch):
  dataset = _index_dataset(50)
  stream = batches.BatchIterator(dataset, global_batch_size=8, seed=3, prefetch=prefetch)
  for _ in range(4):
    next(stream)
  state = stream.get_state()
  assert state['step'] == 4
  if prefetch:  # read through grain's iterator: its state is the data state's step
    assert stream._iterator.get_state() == {'next_index': 4}  # pylint: disable=protected-access
  expected = [_indices_of(next(stream)) for _ in range(3)]
  resumed = batches.BatchIterator(dataset, global_batch_size=8, seed=3, prefetch=prefetch)
  next(resumed)
  resumed.set_state(state)
  np.testing.assert_array_equal(
      np.stack([_indices_of(next(resumed)) for _ in range(3)]), np.stack(expected))
  assert resumed.get_state() == dict(state, step=7)
  stream.close(), resumed.close()


def test_an_old_data_state_still_resumes(caplog):
  """Checkpoints written before the sizes were saved hold {'step', 'seed'} only."""
  dataset = _index_dataset(50)
  reference = batches.BatchIterator(dataset, global_batch_size=8, seed=9)
  expected = _indices_of(reference.host_batch(11))
  resumed = batches.BatchIterator(dataset, global_batch_size=8, seed=0, prefetch=2)
  next(resumed)
  with caplog.at_level(logging.WARNING):
    resumed.set_state({'step': 11, 'seed': 9})
    np.testing.assert_array_equal(_indices_of(next(resumed)), expected)
    assert not caplog.records
    resumed.set_state({'step': 0, 'seed': 9, 'global_batch_size': 16, 'num_examples': 50})
  assert 'global_batch_size=16' in caplog.text
  resumed.close()


def test_worker_processes_give_the_same_stream_and_resume():
  dataset = _index_dataset(50)
  expected = batches.BatchIterator(dataset, global_batch_size=8, seed=1)
  expected = [_indices_of(expected.host_batch(s)) for s in range(8)]
  with batches.BatchIterator(dataset, global_batch_size=8, seed=1, workers=2) as stream:
    got = [_indices_of(next(stream)) for _ in range(5)]
    state = stream.get_state()
  assert state['step'] == 5
  with batches.BatchIterator(dataset, global_batch_size=8, seed=1, workers=1) as resumed:
    resumed.set_state(state)
    got += [_indices_of(next(resumed)) for _ in range(3)]
  np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def test_host_batches_pickle_without_their_permutation_cache():
  stream = batches.HostBatches(_index_dataset(50), global_batch_size=8, seed=2)
  before = stream[3]
  copy = pickle.loads(pickle.dumps(stream))
  np.testing.assert_array_equal(copy[3]['image'], before['image'])
  np.testing.assert_array_equal(copy.with_seed(2)[3]['image'], before['image'])


def test_the_latent_cache_pickles_as_paths_and_reads_the_same_through_workers(tmp_path):
  """Grain workers get the cache's file names, not copies of its memory-mapped shards."""
  from guidedflow import latent_cache  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  moments = rng.standard_normal((40, 2, 4, 4, 4), np.float32)
  moments_name, labels_name = latent_cache._shard_names(0, 1)  # pylint: disable=protected-access
  np.save(tmp_path / moments_name, moments)
  np.save(tmp_path / labels_name, np.arange(40, dtype=np.int32) % 10)
  (tmp_path / latent_cache.META).write_text(
      '{"dataset": "synthetic", "split": "train", "num_examples": 40, "process_count": 1, '
      '"latent_shape": [4, 4, 4], "image_shape": [8, 8, 1]}')
  cache = latent_cache.LatentCacheDataset(str(tmp_path))
  data = pickle.dumps(cache)
  assert len(data) < moments.nbytes // 4
  np.testing.assert_array_equal(pickle.loads(data).get_batch([7, 3])['mean'], moments[[7, 3], 0])
  expected = batches.BatchIterator(cache, global_batch_size=8, seed=4)
  assert expected._prefetch == 2  # pylint: disable=protected-access  # file-backed: grain's thread
  expected = [np.asarray(next(expected)['logvar']) for _ in range(6)]
  with batches.BatchIterator(cache, global_batch_size=8, seed=4, workers=1) as workers:
    np.testing.assert_array_equal(np.stack([next(workers)['logvar'] for _ in range(6)]),
                                  np.stack(expected))
