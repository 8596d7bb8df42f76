"""The latent space of latent diffusion: a frozen autoencoder and the map to the generator's x.

A generator config with `input.space = 'latents'` names its autoencoder (`config.autoencoder`):
  workdir: a finished autoencoder run of guidedflow (configs/fmnist_autoencoder.py); the
      latent shift and scale come from its result.json (computed from training latents).
  weights: a Stable Diffusion VAE file (`models/sd_vae_weights.py`); scale 0.18215 and shift 0
      unless the file says otherwise.
The generator learns x = (z − shift) · scale with z = mean + exp(logvar / 2) · ε, ε drawn fresh
in every train step from the step's key (so a resumed run draws the same ε). The moments
(mean, logvar) of each image come either from the latent cache (`latent_cache.py`: encoded
once, read from disk) or from `EncodedDataset`, which encodes the pixel batch on the fly; both
yield the same arrays for the same indices. Sampling decodes x / scale + shift inside the
sampler's compiled program, so samples are pixels everywhere downstream.

Horizontal flips (fast-DiT's recipe, `autoencoder.flip`): example e of a latent dataset is
image e // 2, mirrored when e is odd; the dataset has twice the images' examples.
"""

import json

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import checksums
from guidedflow import errors
from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow import trained
from guidedflow.models import autoencoder as autoencoder_lib
from guidedflow.models import sd_vae_weights

SPACES = ('pixels', 'latents')


def is_latent(config):
  return config.input.space == 'latents'


class LatentSpace:
  """A frozen autoencoder with the generator's latent shift and scale.

  Attributes:
    params: the autoencoder's weights (nnx.State), an argument of the compiled programs.
    shift, scale: x = (z − shift) · scale.
    fingerprint: identifies weights, shift and scale (a cache of other latents is refused).
    source: where the autoencoder came from (a workdir or a weights file).
  """

  def __init__(self, model, *, shift, scale, source):
    self.graphdef, self.params = nnx.split(model)
    self.shift, self.scale, self.source = float(shift), float(scale), str(source)
    self.downsample_factor = int(model.downsample_factor)
    self.latent_channels = int(model.latent_channels)
    self.in_channels = int(model.in_channels)
    self.fingerprint = checksums.fingerprint(self.params, salt=f'{self.shift:.6g}/{self.scale:.6g}')
    self._encode = jax.jit(lambda params, x: self._model(params).encode(x))

  def _model(self, params):
    return nnx.merge(self.graphdef, params)

  def latent_shape(self, image_shape):
    height, width, channels = (int(d) for d in image_shape)
    f = self.downsample_factor
    if height % f or width % f or channels != self.in_channels:
      raise errors.ConfigError(
          f'the autoencoder of {self.source} takes {self.in_channels}-channel images whose '
          f'sides divide by {f}, not the {height}x{width}x{channels} images of this dataset; '
          'give config.autoencoder an autoencoder trained on this data.')
    return (height // f, width // f, self.latent_channels)

  def encode(self, images):
    """(mean, logvar) as float32 numpy for uint8 images or float images in [−1, 1]."""
    mean, logvar = self._encode(self.params, jnp.asarray(images_lib.to_model(images)))
    return np.asarray(mean), np.asarray(logvar)

  def to_generator(self, mean, logvar, key):
    """x = (mean + exp(logvar / 2) · ε − shift) · scale, inside jit."""
    return (autoencoder_lib.sample(mean, logvar, key) - self.shift) * self.scale

  def decode(self, params, x):
    """Pixels (float, about [−1, 1]) of generator latents x, inside jit; `params` are
    `self.params` passed as an argument (not baked into the program as constants)."""
    return self._model(params).decode(x / self.scale + self.shift)


class CompileStandIn:
  """The frozen autoencoder as ahead-of-time compiles (`guidedflow.aot`) see it, nothing loaded:
  the train step's z = mean + σ·ε, shifted and scaled (the run's real shift and scale are
  constants of the program that change neither its shapes nor its cost) and, for an SD-VAE
  config (`autoencoder.weights`: the architecture is fixed), the sampler's decoder with
  abstract weights. `has_decoder` is False for a guidedflow autoencoder run, whose sizes live
  in its workdir."""

  shift, scale, source = 0.0, 1.0, 'an ahead-of-time compile (no autoencoder loaded)'
  to_generator = LatentSpace.to_generator
  decode = LatentSpace.decode
  _model = LatentSpace._model  # pylint: disable=protected-access

  def __init__(self, config=None):
    self.graphdef = self.params = None
    self.has_decoder = bool(config is not None and config.autoencoder.weights)
    if self.has_decoder:
      model = nnx.eval_shape(lambda: autoencoder_lib.AutoencoderKL(rngs=nnx.Rngs(0)))
      self.graphdef, self.params = nnx.split(model)
      self.downsample_factor = int(model.downsample_factor)
      self.latent_channels = int(model.latent_channels)
      self.in_channels = int(model.in_channels)


def load(config):
  """The `LatentSpace` of `config.autoencoder` (None for a pixel-space config).

  `validation` has checked that exactly one of `autoencoder.workdir` / `weights` is set.

  Raises:
    CheckpointNotFoundError / SDVAEWeightsNotFoundError: the named autoencoder is missing;
      the message says how to train or download it.
  """
  if not is_latent(config):
    return None
  workdir, weights = config.autoencoder.workdir, config.autoencoder.weights
  if weights:
    model = sd_vae_weights.load_sd_vae(weights)
    space = LatentSpace(model, shift=model.shift_factor, scale=model.scale_factor,
                        source=weights)
  else:
    model, result, _ = trained.load(
        workdir, 'autoencoder', trained.train_command(workdir, trained.AUTOENCODER_CONFIG))
    space = LatentSpace(model, shift=result['latent_shift'], scale=result['latent_scale'],
                        source=workdir)
  logging.info('Latent space: autoencoder %s (x%d down, %d channels), shift %.4g, scale %.4g, '
               'fingerprint %s.', space.source, space.downsample_factor, space.latent_channels,
               space.shift, space.scale, space.fingerprint)
  return space


def flipped_indices(indices, flip):
  """(image indices, mirror mask) of latent-dataset example indices."""
  indices = np.asarray(indices, np.int64)
  if not flip:
    return indices, np.zeros(indices.shape, bool)
  return indices // 2, (indices % 2).astype(bool)


def images_of(dataset, indices, flip):
  """The (mirrored where asked) images and labels of latent-dataset examples `indices`; an
  image–caption dataset's "labels" are its caption ids, so the latents keep their captions."""
  image_indices, mirror = flipped_indices(indices, flip)
  batch = dataset.get_batch(image_indices)
  images = np.array(batch['image'])
  images[mirror] = images[mirror][:, :, ::-1]
  return images, batch['label'] if 'label' in batch else batch['caption']


class EncodedDataset(input_pipeline.Dataset):
  """The latent moments of a pixel dataset, encoded on the fly (`autoencoder.cache=False`)."""

  def __init__(self, dataset, space, *, flip):
    self.dataset, self.space, self.flip = dataset, space, bool(flip)
    self.name, self.split = dataset.name, dataset.split
    self.num_examples = dataset.num_examples * (2 if flip else 1)
    self.image_shape = space.latent_shape(dataset.image_shape)
    self.pixel_shape = tuple(dataset.image_shape)
    self.num_classes = dataset.num_classes

  def get_batch(self, indices):
    images, labels = images_of(self.dataset, indices, self.flip)
    mean, logvar = self.space.encode(images)
    return {'mean': mean, 'logvar': logvar, 'label': labels}


def describe(space, dataset, flip):
  """What a latent dataset of `dataset` under `space` is; a cache must match it."""
  return {'fingerprint': space.fingerprint, 'autoencoder': space.source,
          'shift': space.shift, 'scale': space.scale, 'dataset': dataset.name,
          'split': dataset.split, 'num_images': int(dataset.num_examples), 'flip': bool(flip),
          'image_shape': list(dataset.image_shape),
          'latent_shape': list(space.latent_shape(dataset.image_shape))}


def read_json(path):
  path = epath.Path(path)
  return json.loads(path.read_text()) if path.exists() else None
