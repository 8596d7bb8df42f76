"""Every network guidedflow trains, built from its run's config: `constructor(config, shape)`.

One factory for the training loop, inference and the loaders of finished runs, so that none of
them needs the task that trained a network to rebuild it. `config.task` picks the network: the
generator ('generate': `config.model.name` 'dit' or 'unet'), the feature classifier
('classifier'), the autoencoder ('autoencoder') or the noise-aware classifier
('noisy_classifier').
"""

import os

from absl import logging
import jax.numpy as jnp
from flax import nnx

from guidedflow import errors
from guidedflow import schema
from guidedflow import models
from guidedflow.models import autoencoder
from guidedflow.models import clip_text
from guidedflow.models import classifier
from guidedflow.models import dit_text
from guidedflow.models import noisy_classifier
from guidedflow.models import precision
from guidedflow.models import t5_encoder
from guidedflow.models import text_conditioning
from guidedflow.models import text_transformer


def checked(construct):
  """`construct`, once its model has been built abstractly (`nnx.eval_shape`): a model that
  refuses its arguments raises ConfigError with the model's message."""
  try:
    nnx.eval_shape(construct)
  except ValueError as e:
    raise errors.ConfigError(f'config.model: {e}') from None
  return construct


def generator_kwargs(config, text_dim=0):
  """The architecture arguments of `models.create_model` for the generator's `config.model`;
  with `text_dim` > 0 a U-Net's are those of the text U-Net for text features of that width."""
  model = config.model
  if model.name == 'dit':
    return {'variant': model.variant,
            'remat': models.dit.remat_policy_name(config.model.remat),
            'scan_blocks': bool(config.model.scan_blocks),
            'unroll_blocks': config.model.unroll_blocks,
            'attention_impl': config.model.attention_impl}
  kwargs = {'channels': tuple(model.unet_channels),
            'num_residual_layers': model.unet_num_residual_layers,
            'norm': config.model.unet_norm,
            'attention_heads': int(config.model.unet_attention_heads)}
  if text_dim:
    kwargs.update(text_dim=int(text_dim),
                  text_attention_levels=tuple(model.unet_text_attention_levels),
                  text_heads=int(model.unet_text_heads))
  return kwargs


def compute_dtype(config, backend=None):
  """(the dtype the generator computes in on `backend` (default: JAX's), why it is not the
  configured one or None): `precision.resolve_compute_dtype`."""
  return precision.resolve_compute_dtype(config.model.dtype, backend or precision.target_platform(),
                                         convolutional=config.model.name == 'unet')


def generator(config, image_shape, text_dim=0):
  """A zero-argument function building the configured generator for `image_shape` (H, W, C);
  `text_dim` > 0: the text-conditioned U-Net for text features of that width (the text encoder's
  width; config.model.name 'unet' only here).

  Raises:
    ConfigError: the model cannot take these images (the model's own check, e.g. a DiT patch
      size that does not divide the image size), with the model's message.
  """
  height, width, channels = image_shape
  if text_dim and config.model.name != 'unet':
    raise errors.ConfigError(f'factory.generator builds the text U-Net only; config.model.name='
                             f'{config.model.name!r} with text features of width {text_dim}.')
  dtype, reason = compute_dtype(config)
  if reason:
    logging.warning('config.model.dtype=%s: %s.', config.model.dtype, reason)

  def construct():
    return models.create_model(
        config.model.name, input_size=(height, width), in_channels=channels,
        num_classes=config.input.num_classes, dtype=models.DTYPES[dtype],
        param_dtype=models.DTYPES[config.model.param_dtype], rngs=nnx.Rngs(config.train.seed),
        **generator_kwargs(config, text_dim))

  try:
    nnx.eval_shape(construct)
  except ValueError as e:
    raise errors.ConfigError(f'config.model ({config.model.name}) cannot take the '
                             f'{height}x{width}x{channels} images of {config.input.dataset}: '
                             f'{e}') from None
  return construct


def feature_classifier(config, image_shape):
  """A zero-argument function building the classifier of `config.model` for `image_shape`."""
  height, _, channels = (int(d) for d in image_shape)

  def construct():
    return classifier.Classifier(
        num_classes=config.input.num_classes, in_channels=channels,
        feature_dim=config.model.feature_dim, channels=tuple(config.model.channels),
        input_size=height, group_norm=bool(config.model.group_norm),
        arch=config.model.arch,
        dtype=models.DTYPES[config.model.dtype], param_dtype=jnp.float32,
        rngs=nnx.Rngs(config.train.seed))

  return checked(construct)


def autoencoder_kl(config, image_shape):
  """A zero-argument function building the autoencoder of `config.model` for `image_shape`."""
  height, width, channels = (int(d) for d in image_shape)
  factor = 2 ** (len(config.model.channels) - 1)
  if height % factor or width % factor:
    raise errors.ConfigError(
        f'config.model.channels={tuple(config.model.channels)} downsamples by {factor}, which '
        f'does not divide the {height}x{width} images; use fewer levels.')

  def construct():
    return autoencoder.AutoencoderKL(
        in_channels=channels, channels=tuple(config.model.channels),
        layers_per_block=config.model.layers_per_block,
        latent_channels=config.model.latent_channels, norm_groups=config.model.norm_groups,
        dtype=models.DTYPES[config.model.dtype], param_dtype=jnp.float32,
        rngs=nnx.Rngs(config.train.seed))

  return checked(construct)


def noisy_image_classifier(config, image_shape):
  """A zero-argument function building the noise-aware classifier of `config.model` for
  `image_shape`."""
  height, width, channels = (int(d) for d in image_shape)

  def construct():
    return noisy_classifier.NoisyClassifier(
        input_size=(height, width), in_channels=channels,
        num_classes=config.input.num_classes, channels=tuple(config.model.channels),
        num_residual_layers=config.model.num_residual_layers,
        t_embed_dim=config.model.t_embed_dim, norm=config.model.norm,
        dtype=models.DTYPES[config.model.dtype], param_dtype=jnp.float32,
        rngs=nnx.Rngs(config.train.seed))

  return checked(construct)


def frozen_text_config(config):
  """The `ClipTextConfig` / `T5Config` of a frozen `config.text` encoder without loading
  weights: a preset's, when `text.weights` names one (--mode=compile needs no weights), else
  the weights folder's transformers `config.json`."""
  text = config.text
  presets = clip_text.CONFIGS if text.encoder == 'clip' else t5_encoder.PRESETS
  config_file = os.path.join(os.fspath(text.weights or ''), 'config.json')
  if text.weights in presets:
    return presets[text.weights]
  if os.path.isfile(config_file):
    return (clip_text if text.encoder == 'clip' else t5_encoder).config_from_hf(config_file)
  raise errors.DataError(
      f"no config.json in config.text.weights={text.weights}: the {text.encoder} encoder's "
      f'transformers config gives its width (to compile without the weights, name a preset: '
      f'{", ".join(p for p in presets if p != "test")}).')


def text_dims(config):
  """(width D, tokens L) of `config.text`'s encoder without loading weights: the trained one's
  config, a frozen one's (`frozen_text_config`; its position table for CLIP; 120 for T5)."""
  text = config.text
  if text.encoder == 'trained':
    return int(text.encoder_width), int(
        text.max_length or text_transformer.TOKENIZER_KINDS[text.tokenizer_kind])
  if text.encoder not in ('clip', 't5'):
    raise errors.ConfigError(f"config.text.encoder='{text.encoder}' has no text features.")
  found = frozen_text_config(config)
  if text.encoder == 'clip':
    return int(found.width), int(text.max_length or found.max_length)
  return int(found.d_model), int(text.max_length or t5_encoder.MAX_LENGTH_PIXART_ALPHA)


def text_generator(config, image_shape, text_dim, max_length, tokenizer=None):
  """A zero-argument function building the text-conditioned generator of `config.text` for
  `image_shape`: its backbone (`model.name` 'unet': the text U-Net; 'dit': `dit_text.TextDiT`)
  behind the trained encoder (text.encoder='trained'; its embedding rows and empty prompt from
  `tokenizer`, which 'words' needs: the run's vocabulary) or cached features of width
  `text_dim`, and the null condition `text.null` (`text_conditioning.TextConditioned`)."""
  text = config.text
  if text.encoder == 'trained' and tokenizer is None:
    tokenizer = text_transformer.tokenizer(text.tokenizer_kind, max_length)
  if config.model.name == 'dit':
    backbone = dit_text.from_config(config, image_shape, text_dim)
  else:
    backbone = generator(config, image_shape, text_dim=text_dim)
  empty = None
  if text.null == 'empty':
    if text.encoder != 'trained':
      raise errors.ConfigError("config.text.null='empty' is built for the trained encoder; a "
                               "frozen encoder's cached features take text.null='learned'.")
    tokens, mask = tokenizer([''])
    empty = {'tokens': tokens[0], 'mask': mask[0]}

  def construct():
    rngs = nnx.Rngs(config.train.seed)
    encoder = None
    if text.encoder == 'trained':
      encoder = text_transformer.TextTransformer(
          rngs=rngs, width=text_dim, depth=int(text.encoder_depth),
          heads=int(text.encoder_heads), max_length=max_length,
          vocab_size=tokenizer.vocab_size)
    return text_conditioning.TextConditioned(backbone(), text_dim=text_dim,
                                             max_length=max_length, encoder=encoder,
                                             null=text.null, empty=empty, rngs=rngs)

  return checked(construct)


BY_TASK = {'generate': generator, 'classifier': feature_classifier,
           'autoencoder': autoencoder_kl, 'noisy_classifier': noisy_image_classifier}


def constructor(config, image_shape, text_dim=0, *, tokenizer=None):
  """The network of `config.task` ('generate' when the config has no such key) for
  `image_shape`, as a zero-argument function; `text_dim` > 0 (the generator only): conditioned
  on text features of that width; `tokenizer`: a trained text encoder's (`text_generator`)."""
  task = schema.task_of(config)
  if task == 'generate' and 'text' in config and config.text.encoder != 'none':
    return text_generator(config, image_shape, *text_dims(config), tokenizer=tokenizer)
  if text_dim:
    if task != 'generate':
      raise errors.ConfigError(f'config.task={task!r} has no text-conditioned network.')
    return generator(config, image_shape, text_dim=text_dim)
  return BY_TASK[task](config, image_shape)
