"""Latent diffusion on Fashion-MNIST: the latent space of a trained autoencoder, the latent cache
(equal to on-the-fly encoding, sharded by process, foreign caches refused) and a latent
generator that trains, resumes bitwise and samples pixels."""

import json
import os

import jax
import numpy as np
import pytest

from guidedflow import errors
from guidedflow import input_pipeline
from guidedflow import latent_cache
from guidedflow import latents
from guidedflow import sampler as sampler_lib
from guidedflow import train
from guidedflow.tasks import registry

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a subprocess or
# a training run) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('latents')


def _autoencoder_config():
  from configs import fmnist_autoencoder  # pylint: disable=g-import-not-at-top
  config = fmnist_autoencoder.get_config()
  config.model.channels = (8, 16, 16)
  config.model.norm_groups = 4
  config.model.latent_channels = 4
  config.input.num_train_examples = 256
  config.eval.num_examples = 100
  config.eval.batch_size = 100
  config.eval.num_latent_examples = 200
  config.eval.num_quality_examples = 100
  config.eval.feature_network = 'none'
  config.loss.feature_weight = 0.0  # no classifier here
  config.train.num_steps = 3
  config.train.batch_size = 32
  return config


@pytest.fixture(scope='module')
def autoencoder_dir(latent_autoencoder_dir):
  """A run of `_autoencoder_config()` (tests/conftest.py: trained once, shared with
  tests/multiprocess_test.py)."""
  return latent_autoencoder_dir


def _generator_config(autoencoder_dir, **autoencoder):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.variant = 'test/1'  # 7×7×4 latents, 49 tokens
  config.input.space = 'latents'
  config.input.num_train_examples = 96
  config.eval.num_examples = 40
  config.eval.num_batches = 0
  config.autoencoder.workdir = autoencoder_dir
  config.autoencoder.batch_size = 32
  for key, value in autoencoder.items():
    config.autoencoder[key] = value
  return config


@pytest.fixture(scope='module')
def space(autoencoder_dir):
  return latents.load(_generator_config(autoencoder_dir))


@pytest.fixture(scope='module')
def pixels():
  images, labels = input_pipeline.load_fashion_mnist(None, 'test')
  return input_pipeline.ArrayDataset(images[:40], labels[:40], num_classes=10, split='test')


def test_latent_space_takes_shift_and_scale_from_the_autoencoder_run(autoencoder_dir, space):
  with open(os.path.join(autoencoder_dir, 'result.json')) as f:
    result = json.load(f)
  assert (space.shift, space.scale) == (result['latent_shift'], result['latent_scale'])
  assert space.latent_shape((28, 28, 1)) == (7, 7, 4)
  mean = np.full((1, 7, 7, 4), 0.5, np.float32)
  x = space.to_generator(mean, np.full_like(mean, -30.0), jax.random.PRNGKey(0))
  np.testing.assert_allclose(x, (0.5 - space.shift) * space.scale, atol=1e-5)
  with pytest.raises(errors.ConfigError, match='takes 1-channel images'):
    space.latent_shape((28, 28, 3))


@pytest.mark.parametrize('flip', [False, True])
def test_cache_yields_the_latents_of_on_the_fly_encoding(space, pixels, tmp_path, flip):
  cached = latent_cache.open_split(space, pixels, str(tmp_path / 'cache'), flip=flip,
                                   batch_size=16, dtype='float32', workers=0)
  encoded = latents.EncodedDataset(pixels, space, flip=flip)
  assert cached.num_examples == encoded.num_examples == 40 * (2 if flip else 1)
  assert cached.image_shape == encoded.image_shape == (7, 7, 4)
  indices = np.random.default_rng(0).permutation(cached.num_examples)[:16]
  a, b = cached.get_batch(indices), encoded.get_batch(indices)
  np.testing.assert_array_equal(a['label'], b['label'])
  for key in ('mean', 'logvar'):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
  key = jax.random.PRNGKey(7)  # the same ε: the same generator latents
  np.testing.assert_allclose(space.to_generator(a['mean'], a['logvar'], key),
                             space.to_generator(b['mean'], b['logvar'], key), atol=1e-4)
  if flip:  # example 2i + 1 is image i mirrored
    mirrored, _ = space.encode(pixels.get_batch([3])['image'][:, :, ::-1])
    np.testing.assert_allclose(cached.get_batch([7])['mean'], mirrored, rtol=1e-5, atol=1e-5)
    assert not np.allclose(cached.get_batch([6])['mean'], mirrored, atol=1e-3)


def test_each_process_writes_its_slice_and_the_shards_read_as_one(space, pixels, tmp_path):
  single = latent_cache.open_split(space, pixels, str(tmp_path / 'one'), flip=False,
                                   batch_size=16, dtype='float32', workers=0)
  for process in (1, 0):  # process 0 writes meta.json last
    latent_cache.write(space, pixels, str(tmp_path / 'two'), flip=False, batch_size=16,
                       process_index=process, process_count=2)
  shards = sorted(p for p in os.listdir(tmp_path / 'two') if p.startswith('moments'))
  assert shards == ['moments-00000-of-00002.npy', 'moments-00001-of-00002.npy']
  assert np.load(tmp_path / 'two' / shards[1]).shape == (20, 2, 7, 7, 4)
  two = latent_cache.LatentCacheDataset(str(tmp_path / 'two'),
                                        latents.describe(space, pixels, False))
  indices = np.array([39, 0, 21, 19, 20, 5])  # across the shard boundary, unsorted
  a, b = single.get_batch(indices), two.get_batch(indices)
  for key in ('mean', 'logvar', 'label'):
    np.testing.assert_array_equal(a[key], b[key])


def test_a_cache_of_other_latents_is_refused(space, pixels, tmp_path):
  latent_cache.open_split(space, pixels, str(tmp_path / 'c'), flip=False, batch_size=16,
                          dtype='float16', workers=0)
  other = latents.LatentSpace(space._model(space.params), shift=space.shift,
                              scale=space.scale * 2, source='another autoencoder')
  with pytest.raises(latent_cache.CacheMismatchError, match='fingerprint') as e:
    latent_cache.open_split(other, pixels, str(tmp_path / 'c'), flip=False, batch_size=16,
                            dtype='float32', workers=0)
  assert 'cache_dir' in str(e.value)
  with pytest.raises(latent_cache.CacheMismatchError, match='flip False'):
    latent_cache.open_split(space, pixels, str(tmp_path / 'c'), flip=True, batch_size=16,
                            dtype='float32', workers=0)
  assert os.path.exists(tmp_path / 'c' / 'meta.json')  # refused, never overwritten


def test_latent_config_errors(autoencoder_dir, tmp_path):
  config = _generator_config(autoencoder_dir)
  config.autoencoder.workdir = None
  with pytest.raises(errors.ConfigError, match='exactly one autoencoder'):
    registry.validate(config)
  config = _generator_config(str(tmp_path / 'missing'))
  with pytest.raises(errors.CheckpointNotFoundError, match='fmnist_autoencoder.py'):
    latents.load(config)


@pytest.fixture(scope='module')
def latent_run(autoencoder_dir, tmp_path_factory):
  """4 steps in one go, and 2 + 2 with a restart in between (the cache written once each)."""
  straight = str(tmp_path_factory.mktemp('straight'))
  state, result = train.train_and_evaluate(_generator_config(autoencoder_dir), straight)
  resumed = str(tmp_path_factory.mktemp('resumed'))
  config = _generator_config(autoencoder_dir)
  config.train.num_steps = 2
  train.train_and_evaluate(config, resumed)
  resumed_state, _ = train.train_and_evaluate(_generator_config(autoencoder_dir), resumed)
  return straight, state, result, resumed_state


def test_latent_generator_trains_on_latents_and_resumes_bitwise(latent_run):
  straight, state, result, resumed_state = latent_run
  assert result['image_shape'] == [7, 7, 4] and result['step'] == 4
  assert os.path.exists(os.path.join(straight, 'latent_cache', 'train', 'meta.json'))
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(resumed_state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_latent_generator_samples_pixels(autoencoder_dir, latent_run):
  straight = latent_run[0]
  config = _generator_config(autoencoder_dir)
  sampler = sampler_lib.Sampler.from_workdir(config, straight)
  assert sampler.image_shape == (7, 7, 4) and sampler.output_shape == (28, 28, 1)
  images, nfe, _ = sampler.sample_images(jax.random.PRNGKey(0), np.arange(4), 2.0)
  assert images.shape == (4, 28, 28, 1) and images.dtype == np.uint8
  assert nfe == 2 * 3  # Heun, 2 steps: 3 evaluations (the last step is Euler's), CFG doubles
  out = registry.get_task(config, straight).sample(straight)
  with np.load(out['output']) as f:
    assert f['images'].shape == (20, 28, 28, 1)
  assert os.path.exists(os.path.join(straight, 'samples', 'grid_latest.png'))


def test_on_the_fly_encoding_trains_like_the_cache(autoencoder_dir, latent_run, tmp_path):
  """`autoencoder.cache=False` feeds the same moments, so the same steps give the same loss."""
  _, _, result, _ = latent_run
  config = _generator_config(autoencoder_dir, cache=False)
  _, fly = train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'latent_cache')
  assert fly['train_loss'] == pytest.approx(result['train_loss'], rel=1e-4)


def test_a_process_trains_on_its_own_shard_alone(space, pixels, tmp_path):
  """Process-local reading: with the other shard gone from this host, process 1 still draws
  its half of every batch, from its own examples only, a permutation per epoch, resumably."""
  for process in (1, 0):
    latent_cache.write(space, pixels, str(tmp_path), flip=False, batch_size=16,
                       process_index=process, process_count=2)
  whole = latent_cache.LatentCacheDataset(str(tmp_path))
  os.remove(tmp_path / 'moments-00000-of-00002.npy')
  mine = latent_cache.LatentCacheDataset(str(tmp_path), shard=1)
  assert mine.process_local and mine.num_examples == 20
  kwargs = dict(global_batch_size=8, seed=3, process_index=1, process_count=2)
  iterator = input_pipeline.BatchIterator(mine, **kwargs)
  epoch = np.concatenate([iterator.host_batch(s)['label'] for s in range(5)])  # 5 × 4 = 20
  expected = whole.get_batch(np.arange(1, 40, 2))['label']  # process 1 holds examples 1, 3, ...
  np.testing.assert_array_equal(np.sort(epoch), np.sort(expected))
  batch = iterator.host_batch(2)
  np.testing.assert_array_equal(
      batch['mean'], whole.get_batch(2 * iterator.global_indices(2) + 1)['mean'])
  resumed = input_pipeline.BatchIterator(mine, start_step=2, **kwargs)
  np.testing.assert_array_equal(resumed.host_batch(2)['mean'], batch['mean'])


def test_encode_mode_needs_a_latent_generator(autoencoder_dir, tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match='--mode=encode'):
    registry.get_task(tiny.get_config(), str(tmp_path)).encode(str(tmp_path))
  with pytest.raises(errors.ConfigError, match='on the fly'):
    config = _generator_config(autoencoder_dir, cache=False)
    registry.get_task(config, str(tmp_path)).encode(str(tmp_path))


def _damage(directory, how):
  moments = directory / 'moments-00000-of-00001.npy'
  if how == 'truncated':
    with open(moments, 'r+b') as f:
      f.truncate(os.path.getsize(moments) - 100)
    return moments.name
  if how == 'replaced':  # random bytes in place of the labels file, same size
    labels = directory / 'labels-00000-of-00001.npy'
    labels.write_bytes(np.random.default_rng(0).bytes(os.path.getsize(labels)))
    return labels.name
  if how == 'changed':  # one float of the data region: numpy would read it without a word
    with open(moments, 'r+b') as f:
      f.seek(os.path.getsize(moments) - 64)
      f.write(np.float32(1e4).tobytes())
    return moments.name
  (directory / 'meta.json').write_bytes(b'\x89\xff\x00garbage')  # how == 'meta'
  return 'meta.json'


@pytest.mark.parametrize('how', ['truncated', 'replaced', 'changed', 'meta'])
def test_a_damaged_cache_is_one_error_naming_the_file_and_the_fix(space, pixels, tmp_path, how):
  kwargs = dict(flip=False, batch_size=16, dtype='float32', workers=0)
  directory = tmp_path / 'cache'
  latent_cache.open_split(space, pixels, str(directory), **kwargs)
  assert json.loads((directory / 'checksums-00000-of-00001.json').read_text())['algorithm'] \
      == 'crc32/v1'
  name = _damage(directory, how)
  with pytest.raises(errors.DataError) as e:
    latent_cache.open_split(space, pixels, str(directory), **kwargs)
  message = str(e.value)
  assert '\n' not in message and str(directory / name) in message and 'Delete' in message
  assert os.path.exists(directory / name)  # refused, nothing rewritten


def test_a_cache_written_before_checksums_is_read_with_a_warning(space, pixels, tmp_path,
                                                                    caplog):
  directory = tmp_path / 'cache'
  written = latent_cache.open_split(space, pixels, str(directory), flip=False, batch_size=16,
                                    dtype='float32', workers=0)
  os.remove(directory / 'checksums-00000-of-00001.json')
  reread = latent_cache.LatentCacheDataset(str(directory))
  np.testing.assert_array_equal(reread.get_batch([3, 1])['mean'], written.get_batch([3, 1])['mean'])
  assert any('unverified' in r.getMessage() for r in caplog.records)


def test_the_cache_is_written_row_by_row_not_whole_in_ram(space, tmp_path):
  """Peak numpy allocation while writing stays far below the shard's size (a shard assembled in
  RAM, then saved, would need all of it)."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  images, labels = input_pipeline.load_fashion_mnist(None, 'test')
  pixels = input_pipeline.ArrayDataset(images[:640], labels[:640], num_classes=10, split='test')
  latent_cache.write(space, pixels, str(tmp_path / 'warm'), flip=False, batch_size=16)  # compile
  tracemalloc.start()
  try:
    latent_cache.write(space, pixels, str(tmp_path / 'c'), flip=False, batch_size=16)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  shard = os.path.getsize(tmp_path / 'c' / 'moments-00000-of-00001.npy')
  assert shard > 480_000 and peak < shard / 4, (peak, shard)
  cached = latent_cache.LatentCacheDataset(str(tmp_path / 'c'))
  np.testing.assert_array_equal(cached.get_batch(np.arange(600, 640))['label'], labels[600:640])


def test_a_damaged_cache_stops_the_command_line_in_one_line(autoencoder_dir, latent_run,
                                                            tmp_path):
  """Through `python -m guidedflow.main --mode=encode`, as a user meets it (the run's own cache,
  copied, with one float changed in its data region)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import subprocess_env  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'cache'
  shutil.copytree(os.path.join(latent_run[0], 'latent_cache'), cache)
  name = _damage(cache / 'train', 'changed')
  before = (cache / 'train' / name).read_bytes()

  overrides = ['--config.model.variant=test/1', '--config.input.space=latents',
               '--config.input.num_train_examples=96', '--config.eval.num_examples=40',
               f'--config.autoencoder.workdir={autoencoder_dir}',
               '--config.autoencoder.batch_size=32', f'--config.autoencoder.cache_dir={cache}']
  proc = subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
       f'--workdir={tmp_path / "run"}', '--mode=encode', *overrides],
      cwd=subprocess_env.REPO, env=subprocess_env.env(), capture_output=True, text=True,
      timeout=600)
  subprocess_env.one_error_line(proc, str(cache / 'train' / name), 'CRC-32', 'Delete')
  assert (cache / 'train' / name).read_bytes() == before
