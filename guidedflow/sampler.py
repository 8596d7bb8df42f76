"""Inference of the generator: its model from the config, EMA weights, CFG sampling, grids.

`Sampler.from_workdir(config, workdir)` restores the newest checkpoint's EMA weights;
`Sampler.from_train_state(...)` wraps the weights of a running training. `--mode=sample`,
evaluation, the periodic sample grids, the notebook and the benchmarks all sample through it.
The sampler costs exactly its NFE: w = 1 runs the conditional batch alone, and with a guidance
interval the doubled CFG batch runs only inside it (`sampling.cfg_plan`).
"""

import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow import latents
from guidedflow import models
from guidedflow import paths
from guidedflow import sampling
from guidedflow import sharding
from guidedflow import train_state
from guidedflow import validation
from guidedflow.models import precision

def model_kwargs(config):
  """The architecture arguments of `models.create_model` for `config.model`."""
  model = config.model
  if model.name == 'dit':
    return {'variant': model.variant,
            'remat': models.dit.remat_policy_name(validation.get(config, 'model.remat')),
            'scan_blocks': bool(validation.get(config, 'model.scan_blocks')),
            'attention_impl': validation.get(config, 'model.attention_impl')}
  return {'channels': tuple(model.unet_channels),
          'num_residual_layers': model.unet_num_residual_layers,
          'norm': validation.get(config, 'model.unet_norm')}


def model_constructor(config, image_shape):
  """A zero-argument function building the configured generator for `image_shape` (H, W, C).

  Raises:
    ConfigError: the model cannot take these images (the model's own check, e.g. a DiT patch
      size that does not divide the image size), with the model's message.
  """
  height, width, channels = image_shape
  dtype, reason = precision.resolve_compute_dtype(
      config.model.dtype, jax.default_backend(), convolutional=config.model.name == 'unet')
  if reason:
    logging.warning('config.model.dtype=%s: %s.', config.model.dtype, reason)

  def construct():
    return models.create_model(
        config.model.name, input_size=(height, width), in_channels=channels,
        num_classes=config.input.num_classes, dtype=models.DTYPES[dtype],
        param_dtype=models.DTYPES[config.model.param_dtype], rngs=nnx.Rngs(config.train.seed),
        **model_kwargs(config))

  try:
    nnx.eval_shape(construct)
  except ValueError as e:
    raise errors.ConfigError(f'config.model ({config.model.name}) cannot take the '
                             f'{height}x{width}x{channels} images of {config.input.dataset}: '
                             f'{e}') from None
  return construct


def state_builder(config, image_shape, mesh=None):
  """The generator's `StateBuilder` for `image_shape` on `mesh` (default: `config.mesh`)."""
  return train_state.StateBuilder(model_constructor(config, image_shape), config,
                                  mesh if mesh is not None else train_state.make_mesh(config))


class Sampler:
  """Samples from a generator's weights with the configured sampler.

  A latent generator (`latent_space` given) decodes inside the same compiled program: what
  `sample` returns is pixels either way.

  Attributes:
    params: the weights sampled from (the EMA weights of a train state).
    step: the training step of those weights.
    image_shape: what the generator generates (latents of a latent generator).
    output_shape: what `sample` returns (pixels).
    num_classes, config, latent_space.
  """

  def __init__(self, config, builder, params, *, image_shape, step=None, latent_space=None):
    self.config = config
    self.builder = builder
    self.params = params
    self.step = step
    self.image_shape = tuple(image_shape)
    self.latent_space = latent_space
    self.output_shape = self.image_shape
    if latent_space is not None:
      height, width, _ = self.image_shape
      f = latent_space.downsample_factor
      self.output_shape = (height * f, width * f, latent_space.in_channels)
    self.num_classes = config.input.num_classes
    self.null_label = config.input.num_classes
    self.path = paths.get_path(config.path.schedule)
    self._compiled = {}

  @classmethod
  def from_train_state(cls, config, builder, state, image_shape, latent_space=None):
    return cls(config, builder, _weights(state), image_shape=image_shape,
               step=int(state['step']), latent_space=latent_space)

  @classmethod
  def from_workdir(cls, config, workdir, latent_space=None):
    """The newest checkpoint's EMA weights (CheckpointNotFoundError without one); a latent
    generator's autoencoder is `latent_space` or, when None, the config's."""
    if latent_space is None:
      latent_space = latents.load(config)
    builder, state, image_shape = load(config, workdir, latent_space)
    return cls.from_train_state(config, builder, state, image_shape, latent_space)

  def update(self, state):
    """Samples from `state`'s weights from now on (same compiled programs)."""
    self.params, self.step = _weights(state), int(state['step'])

  def _program(self, options, use_cfg):
    cache_key = tuple(sorted(options.items())) + (('use_cfg', use_cfg),)
    if cache_key not in self._compiled:
      parameterization = self.config.loss.parameterization

      def run(params, decoder_params, key, labels, guidance_scale, sigma):
        model = self.builder.merge(params)
        samples, info = sampling.sample(
            lambda x, t, y: model(x, t, y), key, labels, shape=self.image_shape, path=self.path,
            parameterization=parameterization, null_label=self.null_label,
            guidance_scale=guidance_scale if use_cfg else 1.0, sigma=sigma, **options)
        if self.latent_space is not None:
          samples = self.latent_space.decode(decoder_params, samples)
        return samples, info['nfe']

      # The batch is split over (data, fsdp) like a training batch; the noise is drawn with
      # the partitionable threefry, so the samples do not depend on the mesh.
      b = self.builder
      self._compiled[cache_key] = jax.jit(
          run, in_shardings=(b.param_shardings, b.replicated, b.replicated, b.batch_sharding,
                             b.replicated, b.replicated),
          out_shardings=(b.batch_sharding, b.replicated))
    return self._compiled[cache_key]

  def sample(self, key, labels, guidance_scale, *, num_steps=None, method=None,
             sigma_schedule=None, sigma=None):
    """Samples (float, [−1, 1]) for int `labels`, and the NFE per sample (the model
    evaluations run, a doubled batch counting 2).

    `guidance_scale` is a Python number: w = 1 compiles and runs the conditional batch alone,
    every other w shares one compiled doubled-batch program.
    """
    config = self.config.sampling
    options = dict(
        num_steps=num_steps or config.num_steps, method=method or config.method,
        sigma_schedule=sigma_schedule or config.sigma_schedule,
        guidance_interval=(tuple(config.guidance_interval)
                           if config.guidance_interval is not None else None))
    sigma = config.sigma if sigma is None else sigma
    sampling.validate_sampling_args(
        parameterization=self.config.loss.parameterization, null_label=self.null_label,
        guidance_scale=guidance_scale, labels=np.asarray(labels), **options)
    program = self._program(options, sampling.uses_cfg(guidance_scale))
    labels = np.asarray(labels, np.int32)
    num = len(labels)
    padded = np.pad(labels, (0, -num % sharding.batch_axes_size(self.builder.mesh)))
    with jax.set_mesh(self.builder.mesh):
      labels = jax.device_put(padded, self.builder.batch_sharding)
      decoder_params = self.latent_space.params if self.latent_space is not None else None
      samples, nfe = program(self.params, decoder_params, key, labels,
                             jnp.float32(guidance_scale), jnp.float32(sigma))
      if len(padded) != num:
        samples = samples[:num]
    return samples, int(nfe)

  def sample_images(self, key, labels, guidance_scale, *, batch_size=None, **options):
    """uint8 samples for any number of labels, in padded batches of one compiled shape.

    Batch i uses key fold_in(key, i), so equal seeds give equal noise for every w.

    Returns:
      (uint8 images (N, H, W, C), NFE per sample, seconds of the first call (with compile)).
    """
    labels = np.asarray(labels, np.int32)
    batch = min(batch_size or self.config.sampling.batch_size, len(labels))
    outputs, nfe, first_call_s = [], 0, 0.0
    for i, start in enumerate(range(0, len(labels), batch)):
      chunk = labels[start:start + batch]
      t0 = time.time()
      samples, nfe = self.sample(jax.random.fold_in(key, i),
                                 np.pad(chunk, (0, batch - len(chunk))), guidance_scale,
                                 **options)
      outputs.append(images_lib.to_uint8(sharding.to_host(samples))[:len(chunk)])
      if i == 0:
        first_call_s = time.time() - t0
      logging.log_every_n_seconds(logging.INFO, 'Sampled %d/%d images.', 30,
                                  start + len(chunk), len(labels))
    return np.concatenate(outputs), nfe, first_call_s

  def guidance_grid(self, key, scales):
    """uint8 grid: one row per class, one block of columns per guidance scale (same noise)."""
    per_class = self.config.sampling.grid_samples_per_class
    classes = self.config.sampling.grid_classes
    classes = np.arange(self.num_classes) if classes is None else np.asarray(classes)
    labels = np.repeat(classes, per_class).astype(np.int32)
    blocks = [images_lib.to_uint8(sharding.to_host(self.sample(key, labels, float(w))[0]))
              for w in scales]
    return images_lib.make_guidance_grid(blocks, num_classes=len(classes),
                                         samples_per_class=per_class)


def _weights(state):
  return state['ema_params'] if 'ema_params' in state else state['params']


def load(config, workdir, latent_space=None):
  """(StateBuilder, newest train state, generated shape) of a generator workdir; the shape is
  the latents' of `latent_space` when given.

  Raises:
    CheckpointNotFoundError: the workdir holds no checkpoint.
  """
  validation.validate_config(config)
  image_shape = input_pipeline.create_dataset(config.input, config.input.train_split).image_shape
  if latent_space is not None:
    image_shape = latent_space.latent_shape(image_shape)
  builder = state_builder(config, image_shape)
  return builder, train_state.load_latest(builder, config, workdir), tuple(image_shape)
