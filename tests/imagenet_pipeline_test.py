"""The ImageNet-256 path of configs/imagenet256_latent.py, end to end on a tiny stand-in: JPEGs
of varying sizes in class folders → ADM center crop → the real SD-VAE architecture (random
weights, saved as diffusers safetensors) → latent cache with mirrors (grain workers decoding) →
a tiny DiT trained a few steps → sampling with decoding → Inception-v3 FD (random weights in
pytorch-fid's file format) and samples.npz in ADM's keys."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from guidedflow import image_folder
from guidedflow import input_pipeline
from guidedflow import train
from guidedflow.models import autoencoder
from guidedflow.models import inception
from guidedflow.models import sd_vae_weights
from guidedflow.tasks import registry

# One worker runs this module (`--dist loadgroup` in .ci/run): the stand-in (a random SD-VAE and
# Inception written to disk) is slow setup that each xdist worker would otherwise repeat, and the
# two end-to-end tests compile the same SD-VAE encoder and train step.
pytestmark = pytest.mark.xdist_group('imagenet')

SIZE = 32  # the crop; 256 on ImageNet (the code path is the same)


def test_center_crop_is_adm_box_halving_then_bicubic_then_center():
  rng = np.random.default_rng(0)
  square = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  np.testing.assert_array_equal(image_folder.center_crop_array(square, SIZE), square)
  # 2·SIZE square: one box halving (a 2×2 mean), then nothing left to resize or crop.
  big = rng.integers(0, 256, (2 * SIZE, 2 * SIZE, 3), dtype=np.uint8)
  halved = big.reshape(SIZE, 2, SIZE, 2, 3).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_allclose(image_folder.center_crop_array(big, SIZE), halved, atol=1)
  # Wide image of short side SIZE: the center SIZE columns, unresampled.
  wide = rng.integers(0, 256, (SIZE, 3 * SIZE + 2, 3), dtype=np.uint8)
  np.testing.assert_array_equal(image_folder.center_crop_array(wide, SIZE),
                                wide[:, SIZE + 1:2 * SIZE + 1])
  grey = rng.integers(0, 256, (50, 40), dtype=np.uint8)  # grey JPEGs exist in ImageNet
  assert image_folder.center_crop_array(grey, SIZE).shape == (SIZE, SIZE, 3)


def _write_jpegs(root):
  rng = np.random.default_rng(1)
  sizes = [(40, 56), (72, 48), (33, 90), (64, 64)]
  for split, per_class in (('train', 4), ('val', 2)):
    for c, wnid in enumerate(('n01440764', 'n01443537')):
      folder = root / split / wnid
      folder.mkdir(parents=True)
      for i in range(per_class):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 120 * c)], -1)
        noise = rng.integers(0, 40, (h, w, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
            folder / f'{wnid}_{i}.JPEG', quality=90)
  (root / 'train' / 'README.txt').write_text('not an image folder entry')


@pytest.fixture(scope='module')
def stand_in(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagenet')
  _write_jpegs(root / 'data')
  vae = autoencoder.AutoencoderKL(rngs=nnx.Rngs(0))  # sd-vae-ft-ema's architecture
  vae_file = root / 'diffusion_pytorch_model.safetensors'
  sd_vae_weights.save_weights(sd_vae_weights.export_state_dict(vae), vae_file,
                              metadata={'scaling_factor': '0.18215'})
  inception_file = root / 'pt_inception.pth'
  inception.save_weights(inception.init_state_dict(0), inception_file)
  return root, vae_file, inception_file


def _config(root, vae_file, inception_file):
  from configs import imagenet256_latent  # pylint: disable=g-import-not-at-top
  config = imagenet256_latent.get_config('test/1')
  config.model.dtype = 'float32'
  config.mesh.shape = (1, 1, 1)
  config.input.data_dir = str(root / 'data')
  config.input.image_size = SIZE
  config.input.num_classes = 2
  config.autoencoder.weights = str(vae_file)
  config.autoencoder.cache_dir = str(root / 'cache')
  config.autoencoder.batch_size = 4
  config.autoencoder.workers = 2
  config.train.num_steps = 3
  config.train.batch_size = 4
  config.train.log_every_steps = 1
  config.train.sample_every_steps = 0
  config.checkpoint.every_steps = 2
  config.eval.num_batches = 1
  config.sampling.num_steps = 2
  config.sampling.num_samples = 4
  config.sampling.batch_size = 4
  config.sampling.guidance_scale = 1.5
  config.sampling.grid_guidance_scales = (1.5,)
  config.sampling.grid_classes = None
  config.sampling.grid_samples_per_class = 2
  config.eval.guidance_scales = (1.5,)
  config.eval.samples_per_class = 2
  config.eval.num_real_images = 4
  config.eval.nearest_k = 1
  config.eval.grid_rows_per_class = 1
  config.eval.inception_weights = str(inception_file)
  config.eval.feature_batch_size = 4
  return config


def test_imagenet_path_end_to_end(stand_in, tmp_path):
  config = _config(*stand_in)
  workdir = str(tmp_path / 'run')
  dataset = input_pipeline.create_dataset(config.input, 'train')
  assert dataset.num_examples == 8 and dataset.image_shape == (SIZE, SIZE, 3)
  assert dataset.classes == ['n01440764', 'n01443537']

  encoded = registry.get_task(config, workdir).encode(workdir)  # --mode=encode
  meta = encoded['train']
  assert meta['num_examples'] == 16 and meta['flip'] and meta['dtype'] == 'float16'
  assert meta['latent_shape'] == [SIZE // 8, SIZE // 8, 4] and meta['scale'] == 0.18215
  assert encoded['eval']['num_examples'] == 4 and not encoded['eval']['flip']

  _, result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 3 and result['image_shape'] == [4, 4, 4]
  assert np.isfinite(result['heldout_loss_ema'])

  sampled = registry.get_task(config, workdir).sample(workdir)  # --mode=sample
  with np.load(sampled['output']) as f:
    assert f['arr_0'].shape == (4, SIZE, SIZE, 3) and f['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(f['arr_1'], [0, 1, 0, 1])

  evaluated = registry.get_task(config, workdir).evaluate(workdir)  # --mode=evaluate
  assert evaluated['feature_network'] == 'inception_v3'
  assert np.isfinite(evaluated['fd']) and evaluated['fd'] > 0
  with open(os.path.join(workdir, 'eval', 'evaluate.json')) as f:
    assert json.load(f)['num_samples'] == 4


def test_image_folder_errors_say_what_to_set(tmp_path):
  with pytest.raises(input_pipeline.DataError, match='input.data_dir'):
    image_folder.ImageFolderDataset(tmp_path, 'train', image_size=32, num_classes=2)
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  (tmp_path / 'train' / 'b').mkdir()
  (tmp_path / 'train' / 'c').mkdir()
  with pytest.raises(input_pipeline.DataError, match='input.image_size'):
    image_folder.ImageFolderDataset(tmp_path, 'train', image_size=0, num_classes=3)
  with pytest.raises(input_pipeline.DataError, match='num_classes=3'):
    image_folder.ImageFolderDataset(tmp_path, 'train', image_size=32, num_classes=2)
  with pytest.raises(input_pipeline.DataError, match='holds no images'):
    image_folder.ImageFolderDataset(tmp_path, 'train', image_size=32, num_classes=3)
  (tmp_path / 'train' / 'a' / 'broken.jpg').write_bytes(b'not a jpeg')
  dataset = image_folder.ImageFolderDataset(tmp_path, 'train', image_size=32, num_classes=3)
  with pytest.raises(input_pipeline.DataError, match='cannot decode .*broken.jpg'):
    dataset.get_batch([0])


def test_text_to_image_on_latents_end_to_end(stand_in, tmp_path):
  """configs/t2i_latent.py on the stand-in: a caption folder the test writes, the random SD-VAE
  above and the CLIP parity fixture (transformers format): --mode=encode writes both caches,
  each latent row keeps its caption (flips included), a few steps train, prompts sample."""
  from configs import t2i_latent  # pylint: disable=g-import-not-at-top
  from guidedflow import text_cache  # pylint: disable=g-import-not-at-top
  from tests import caption_data_test  # pylint: disable=g-import-not-at-top
  root, vae_file, _ = stand_in
  data = tmp_path / 'data'
  caption_data_test.make_folder(data, 'train', num=6)
  caption_data_test.make_folder(data, 'val', num=4)
  config = t2i_latent.get_config('test/1')
  for key, value in _config(root, vae_file, None).items():
    if key not in ('input', 'eval', 'sampling'):
      config[key] = value
  config.input.data_dir, config.input.image_size = str(data), SIZE
  config.autoencoder.cache_dir = str(tmp_path / 'latent_cache')
  config.text.encoder = 'clip'
  config.text.weights = os.path.join(os.path.dirname(__file__), 'fixtures', 'clip',
                                     'a_quick_gelu')
  config.text.max_length = None
  config.text.cache_dir = str(tmp_path / 'text_cache')
  config.sampling.num_steps, config.sampling.batch_size = 2, 4
  config.sampling.grid_guidance_scales = (1.0, 4.5)
  config.sampling.grid_samples_per_class = 1
  config.sampling.prompts = 'a red square;a blue circle'
  config.sampling.num_samples = 4
  workdir = str(tmp_path / 'run')

  task = registry.get_task(config, workdir)
  encoded = task.encode(workdir)  # --mode=encode
  assert encoded['train']['num_examples'] == 12 and encoded['train']['flip']
  assert encoded['text']['train']['num_captions'] == 6
  train_set = task.train_dataset()
  batch = train_set.get_batch(np.arange(12))
  np.testing.assert_array_equal(batch['caption'], np.arange(12) // 2)  # image e // 2, mirrored
  cache = text_cache.TextCache(tmp_path / 'text_cache' / 'train')
  np.testing.assert_array_equal(batch['text_pooled'], cache.get(np.arange(12) // 2)['text_pooled'])
  assert batch['mean'].shape == (12, SIZE // 8, SIZE // 8, 4)

  _, result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 3 and np.isfinite(result['heldout_loss_ema'])
  sampled = registry.get_task(config, workdir).sample(workdir)  # --mode=sample
  with np.load(sampled['output']) as f:
    assert f['images'].shape == (4, SIZE, SIZE, 3) and f['images'].dtype == np.uint8
    assert list(f['prompts']) == ['a red square'] * 2 + ['a blue circle'] * 2
