"""Feature networks of the sample metrics, behind one interface: uint8 images → features/logits.

Four networks: the two Fashion-MNIST classifiers guidedflow trains itself (workdirs of the
classifier task: `configs/fmnist_classifier.py`, and `configs/fmnist_gap_classifier.py`, another
architecture trained without augmentation), the encoder of a label-free autoencoder
(`configs/fmnist_encoder.py`: its latent means are the features, it has no logits), and the FID
Inception-v3 (user-provided pytorch-fid weights). All run through `FeatureNetwork`: one
padded-batch runner (fixed batch shape, so one compile), one fingerprint of the weights
(references cached under another network's weights are refused).
"""

import os

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow import images as images_lib
from guidedflow import trained
from guidedflow.models import inception

NAMES = ('fmnist_classifier', 'fmnist_gap_classifier', 'fmnist_encoder', 'inception_v3')
# The trained networks: (config file, the eval key of their workdir, wall minutes on a 2-core
# CPU, rounded up, quoted in the not-found error).
_TRAINED = {'fmnist_classifier': ('configs/fmnist_classifier.py', 'classifier_workdir', 4),
            'fmnist_gap_classifier': ('configs/fmnist_gap_classifier.py',
                                      'gap_classifier_workdir', 5),
            'fmnist_encoder': ('configs/fmnist_encoder.py', 'encoder_workdir', 12)}


class FeatureNetworkNotFoundError(errors.CheckpointNotFoundError):
  """No (finished) classifier in the workdir; the message gives the command that trains one."""


class FeatureNetwork:
  """uint8 NHWC images → {'features': float32 (N, D), 'logits': float32 (N, K) or None}.

  Args:
    name: identifies the network in the reference-statistics metadata.
    model: the nnx module; `apply(model, x)` returns (features, logits or None).
    preprocess: jnp uint8 images → the network's input (compiled once per input shape, apart
      from the network, which is compiled once per batch size).
    batch_size: images per compiled call; the last batch is zero-padded.
    meta: JSON-able facts about the weights (step, accuracy, file, ...).
    image_shape: (H, W, C) the network takes, or None for any size.
  """

  def __init__(self, name, model, apply, *, preprocess, batch_size, meta, image_shape=None):
    if batch_size < 1:
      raise ValueError(f'batch_size must be ≥ 1, got {batch_size}.')
    self.name = name
    self.model = model
    self.batch_size = int(batch_size)
    self.meta = dict(meta)
    self.image_shape = None if image_shape is None else tuple(image_shape)
    self.num_traces = 0  # compilations of the network (tests check it stays 1)
    graphdef, self._state = nnx.split(model)

    def forward(state, x):
      self.num_traces += 1  # runs at trace time only
      return apply(nnx.merge(graphdef, state), x)

    self._forward = jax.jit(forward)
    self._preprocess = jax.jit(preprocess)

  def _check(self, images):
    expected = ('(N, ' + ', '.join(str(d) for d in self.image_shape) + ')'
                if self.image_shape else '(N, H, W, C)')
    if images.ndim != 4 or (self.image_shape and tuple(images.shape[1:]) != self.image_shape):
      raise ValueError(f'{self.name} expects uint8 images of shape {expected} (NHWC, values '
                       f'0..255), got shape {images.shape}.')
    if images.dtype != np.uint8:
      raise ValueError(f'{self.name} expects uint8 images (0..255), got {images.dtype}; convert '
                       'model outputs in [-1, 1] with guidedflow.images.to_uint8.')

  def __call__(self, images):
    images = np.asarray(images)
    if images.ndim == 3 and self.image_shape is None:  # (N, H, W) grayscale
      images = images[..., None]
    self._check(images)
    features, logits, in_flight = [], [], None
    # One batch stays queued on the device while the host copies the previous one.
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.pad(chunk, ((0, self.batch_size - len(chunk)),) + ((0, 0),) * 3)
      queued = len(chunk), self._forward(self._state, self._preprocess(padded))
      if in_flight is not None:
        _collect(features, logits, *in_flight)
      in_flight = queued
    if in_flight is not None:
      _collect(features, logits, *in_flight)
    if not features:
      raise ValueError(f'{self.name}: no images given.')
    return {'features': np.concatenate(features),
            'logits': np.concatenate(logits) if logits else None}


def _collect(features, logits, count, out):
  batch_features, batch_logits = out
  features.append(np.asarray(batch_features, np.float32)[:count])
  if batch_logits is not None:
    logits.append(np.asarray(batch_logits, np.float32)[:count])


def fingerprint(network, image_shape):
  """Identifies the network's weights (a retrained classifier must not reuse old references):
  its features of two fixed probe images, to 4 significant digits."""
  height, width, channels = image_shape
  ramp = np.linspace(0, 255, height * width * channels).reshape(height, width, channels)
  probe = np.stack([ramp, ramp[::-1, ::-1]]).astype(np.uint8)
  features = np.asarray(network(probe)['features'], np.float64)
  return f'{np.abs(features).sum():.4g}/{features[:, 0].sum():.4g}'


# ----------------------------------------------------------------------------- the two networks


def _train_command(workdir, name='fmnist_classifier'):
  config_file, _, minutes = _TRAINED[name]
  return (f'python -m guidedflow.main --config {config_file} --workdir {workdir} '
          f'(about {minutes} minutes on a 2-core CPU)')


def load_classifier(workdir, *, batch_size=500, name='fmnist_classifier'):
  """The classifier trained by the classifier task in `workdir` (its finished checkpoint);
  `name` ('fmnist_classifier' or 'fmnist_gap_classifier') names its feature space.

  Raises:
    FeatureNetworkNotFoundError: no classifier there, or its training did not finish; the
      message gives the command that trains (or resumes) it.
  """
  workdir = os.fspath(workdir)
  ckpt_dir = epath.Path(workdir) / 'checkpoints'
  if not ckpt_dir.is_dir():
    raise FeatureNetworkNotFoundError(f'no Fashion-MNIST classifier checkpoint in {workdir} '
                                      f'({name}); train one with: '
                                      f'{_train_command(workdir, name)}')
  if ((epath.Path(workdir) / 'classifier_result.json').exists() and
      not (epath.Path(workdir) / 'result.json').exists()):
    raise FeatureNetworkNotFoundError(
        f'the classifier in {workdir} was trained by an older guidedflow (before every model '
        'trained through one loop) and its checkpoints cannot be read now; train it again in a '
        f'new --workdir: {_train_command(workdir + "_v2")}')
  try:
    model, result, config = trained.load(workdir, 'classifier',
                                               _train_command(workdir, name))
  except errors.CheckpointNotFoundError as e:
    raise FeatureNetworkNotFoundError(
        f'the Fashion-MNIST classifier in {workdir} did not finish training: {e}') from None
  step = result['step']
  meta = {'num_classes': model.num_classes, 'feature_dim': model.feature_dim,
          'channels': tuple(config.model.channels), 'test_accuracy': result['test_accuracy'],
          'step': step, 'workdir': workdir, 'dataset': config.input.dataset,
          'arch': config.model.arch}
  return FeatureNetwork(name, model, lambda m, x: m.features_and_logits(x),
                        preprocess=images_lib.to_model, batch_size=batch_size, meta=meta,
                        image_shape=(model.input_size, model.input_size, model.in_channels))


def load_encoder(workdir, *, batch_size=500):
  """The label-free feature network: the encoder of the autoencoder run in `workdir`; features
  are the flattened latent means (no logits)."""
  workdir = os.fspath(workdir)
  try:
    model, result, config = trained.load(workdir, 'autoencoder',
                                               _train_command(workdir, 'fmnist_encoder'))
  except errors.CheckpointNotFoundError as e:
    raise FeatureNetworkNotFoundError(f'the label-free feature encoder (fmnist_encoder): {e}'
                                      ) from None
  if config.loss.feature_weight > 0:
    logging.warning('The autoencoder in %s was trained with a classifier feature loss: its '
                    'feature space is not label-free.', workdir)
  meta = {'step': result['step'], 'workdir': workdir, 'dataset': config.input.dataset,
          'channels': tuple(config.model.channels), 'latent_channels': model.latent_channels,
          'test_psnr': result.get('test_psnr')}

  def apply(m, x):
    mean, _ = m.encode(x)  # (B, h, w, latent channels)
    return mean.reshape(mean.shape[0], -1).astype(jnp.float32), None

  height, width, channels = (int(d) for d in result['image_shape'])
  return FeatureNetwork('fmnist_encoder', model, apply, preprocess=images_lib.to_model,
                        batch_size=batch_size, meta=meta, image_shape=(height, width, channels))


def load_inception(path, *, batch_size=50, dtype=jnp.float32):
  """The FID Inception-v3 from the pytorch-fid weights file at `path` (pool3 features)."""
  model, meta = inception.load_model(path, batch_size=batch_size, dtype=dtype)
  return FeatureNetwork('inception_v3', model, lambda m, x: (m(x), None),
                        preprocess=inception.preprocess, batch_size=batch_size, meta=meta)


def extra_names(config):
  """`eval.extra_feature_networks` as a tuple of names (the command line's 'a,b' included)."""
  extra = config.eval.extra_feature_networks or ()
  extra = (extra,) if isinstance(extra, str) else tuple(extra)
  return tuple(n.strip() for item in extra for n in str(item).split(',') if n.strip())


def names(config):
  """The feature spaces `--mode=evaluate` measures in: `eval.feature_network` first (its logits
  give the class accuracy), then `eval.extra_feature_networks`, without repeats."""
  return tuple(dict.fromkeys((config.eval.feature_network,) + extra_names(config)))


def load(config, name=None):
  """The network `name` (default: `config.eval.feature_network`)."""
  name = name or config.eval.feature_network
  batch_size = config.eval.feature_batch_size  # 0: the network's default
  kwargs = {'batch_size': batch_size} if batch_size else {}
  if name in ('fmnist_classifier', 'fmnist_gap_classifier'):
    return load_classifier(config.eval[_TRAINED[name][1]] or f'runs/{name}', name=name,
                           **kwargs)
  if name == 'fmnist_encoder':
    return load_encoder(config.eval.encoder_workdir or 'runs/fmnist_encoder', **kwargs)
  if name == 'inception_v3':
    return load_inception(config.eval.inception_weights or '', **kwargs)
  raise errors.ConfigError(f'config.eval.feature_network={name!r} is not one of {NAMES}.')

