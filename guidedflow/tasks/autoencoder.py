"""The autoencoder task: a KL autoencoder (`models.autoencoder`) for latent diffusion.

Loss per example, as LDM weighs it but divided by the number of pixels D so that it reads as a
per-pixel error: mean |x̂ − x| (or squared, `loss.reconstruction='l2'`) + `loss.kl_weight` ·
KL(q(z|x) ‖ N(0, I)) / D, plus optionally `loss.feature_weight` · the mean squared difference
of guidedflow's own classifier features of x̂ and x (no LPIPS weights exist offline). That
classifier is `loss.feature_workdir`; leave it unset to use the evaluation's classifier
(`eval.classifier_workdir`), but then the reported FD and accuracy of the reconstructions are
measured by the network the loss optimised against.

Held-out metrics (periodic and final): L1, MSE and PSNR of the mean-latent reconstructions on
the eval split. At the end also: the latent statistics of training images (shift = mean and
scale = 1/std of z = mean + std·ε, what the generator multiplies latents by; stored in
result.json beside the checkpoints), the reconstructions' FD and class accuracy against the
originals' under the classifier (when its workdir exists), and a grid of originals above their
reconstructions.
"""

import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow import evaluation
from guidedflow import feature_networks
from guidedflow import images as images_lib
from guidedflow import models
from guidedflow import run_context
from guidedflow import trained
from guidedflow import validation
from guidedflow.models import autoencoder as autoencoder_lib
from guidedflow.tasks import base

def _per_example(values):
  return jnp.mean(values.reshape(values.shape[0], -1), axis=1)


# The feature networks that may judge the reconstructions (eval.feature_network): the ones whose
# weights the schema's eval section locates.
AUTOENCODER_JUDGES = ('none', 'fmnist_classifier', 'inception_v3')


class AutoencoderTask(base.Task):
  """Images ↔ latents; reports PSNR, latent statistics and the reconstructions' quality."""

  name = 'autoencoder'
  description = 'the autoencoder of latent diffusion'
  log_keys = ('reconstruction', 'kl')

  @staticmethod
  def validate(config):
    validation.integers(config, ('eval.batch_size', 'model.layers_per_block',
                                 'model.latent_channels', 'model.norm_groups',
                                 'eval.num_latent_examples', 'eval.num_quality_examples'))
    validation.counts(config, ('eval.num_batches',))
    validation.choices(config, {'model.dtype': tuple(models.DTYPES),
                                'loss.reconstruction': autoencoder_lib.RECONSTRUCTION_LOSSES,
                                'eval.feature_network': AUTOENCODER_JUDGES})
    validation.widths(config, 'model.channels', '(32, 64, 64)')
    for key in ('loss.kl_weight', 'loss.feature_weight'):
      validation.number(config, key, at_least=0)

  def __init__(self, config, workdir=None):
    super().__init__(config, workdir)
    self._features = None  # (graphdef, params) of the classifier for the feature loss

  def prepare(self):
    """The feature loss's classifier, restored before the step is traced (a missing one fails
    before the first step)."""
    if self.config.loss.feature_weight > 0:
      self._feature_fn()

  def _feature_fn(self):
    """The classifier's feature function for `loss.feature_weight > 0` (its weights frozen)."""
    if self._features is None:
      workdir = self.config.loss.feature_workdir
      if not workdir:
        workdir = self.config.eval.classifier_workdir
        logging.warning('The feature loss uses the evaluation\'s classifier (%s): the reported '
                        'reconstruction FD and accuracy are measured by the network the loss '
                        'optimises. Set loss.feature_workdir to a classifier trained with '
                        'another seed for an independent measurement.', workdir)
      try:
        network = feature_networks.load_classifier(workdir)
      except feature_networks.FeatureNetworkNotFoundError as e:
        raise feature_networks.FeatureNetworkNotFoundError(
            f'the feature loss (loss.feature_weight={self.config.loss.feature_weight}) needs '
            f'its classifier: {e}; add --config.train.seed=1 to keep it independent of the '
            'evaluation\'s classifier, or set --config.loss.feature_weight=0.') from None
      graphdef, params = nnx.split(network.model)
      self._features = lambda x: nnx.merge(graphdef, params).features(x)
    return self._features

  def loss(self, model, batch, key):
    config = self.config.loss
    x = batch['image']
    reconstruction, mean, logvar = model(x, key)
    error = reconstruction - x
    error = jnp.abs(error) if config.reconstruction == 'l1' else jnp.square(error)
    pixels = np.prod(x.shape[1:])
    rec = base.masked_mean(_per_example(error), batch)
    kl = base.masked_mean(autoencoder_lib.kl_divergence(mean, logvar), batch) / pixels
    total = rec + config.kl_weight * kl
    metrics = {'reconstruction': rec, 'kl': kl}
    if config.feature_weight > 0:
      features = self._feature_fn()
      feature = base.masked_mean(_per_example(jnp.square(
          features(reconstruction) - jax.lax.stop_gradient(features(x)))), batch)
      total = total + config.feature_weight * feature
      metrics['feature'] = feature
    return total, metrics

  def eval_metrics(self, model, batch, key):
    del key  # Unused: the mean latent.
    x = batch['image']
    reconstruction = jnp.clip(model.decode(model.encode(x)[0]), -1.0, 1.0)
    mse = _per_example(jnp.square(reconstruction - x))
    # PSNR on the [0, 1] scale: the data range of [−1, 1] is 2, so 10 log10(4 / MSE).
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
    return {'l1': base.masked_mean(_per_example(jnp.abs(reconstruction - x)), batch),
            'mse': base.masked_mean(mse, batch), 'psnr': base.masked_mean(psnr, batch)}

  def _heldout(self, run, params):
    return run.heldout(params, self.eval_dataset(), batch_size=self.config.eval.batch_size,
                       num_batches=self.config.eval.num_batches)

  def periodic(self, run, state, step):
    if not run_context.itstime(step, self.config.eval.every_steps, run.num_steps,
                         last=False):
      return {}
    return {f'eval/{k}': v for k, v in self._heldout(run, _weights(state)).items()}

  def final(self, run, state):
    t0 = time.time()
    params = _weights(state)
    result = {f'test_{k}': round(v, 5) for k, v in self._heldout(run, params).items()}
    model = run.builder.merge(params)
    result.update(latent_statistics(model, self.train_dataset(), self.config))
    result.update(self._reconstruction_quality(model, run.workdir))
    result['eval_s'] = round(time.time() - t0, 2)
    return result

  def _reconstruction_quality(self, model, workdir):
    """Originals vs reconstructions of the first `eval.num_examples` test images: a grid, and
    with the classifier, FD and class accuracy of each set against the originals."""
    dataset = self.eval_dataset()
    data = dataset.get_batch(np.arange(min(dataset.num_examples,
                                           self.config.eval.num_quality_examples)))
    originals = images_lib.to_uint8(data['image'])
    reconstructions = reconstruct(model, data['image'], self.config.eval.batch_size)
    if jax.process_index() == 0:
      rows = np.concatenate([originals[:16], reconstructions[:16]])
      images_lib.save_png(os.path.join(workdir, 'samples', 'reconstructions.png'),
                          images_lib.make_grid(rows, rows=2, cols=16), upscale=2)
    try:
      network = feature_networks.load(self.config)
    except (FileNotFoundError, errors.ConfigError) as e:
      logging.warning('Reconstruction FD and accuracy skipped: %s', e)
      return {}
    real = evaluation.compute_features(network, originals)
    fake = evaluation.compute_features(network, reconstructions)
    out = {'reconstruction_fd': round(evaluation.fid_from_features(real['features'],
                                                                   fake['features']), 4),
           'num_quality_examples': len(originals)}
    if real['logits'] is not None:
      labels = data['label']
      out['original_accuracy'] = evaluation.classification_accuracy(real['logits'], labels)
      out['reconstruction_accuracy'] = evaluation.classification_accuracy(fake['logits'],
                                                                          labels)
    return out

  def evaluate(self, workdir):
    """--mode=evaluate: the final report of the finished autoencoder in `workdir` again."""
    model, result, _ = trained.load(workdir, self.name,
                                    trained.train_command(workdir, trained.AUTOENCODER_CONFIG))
    out = {'step': result['step']}
    out.update(latent_statistics(model, self.train_dataset(), self.config))
    out.update(self._reconstruction_quality(model, workdir))
    return out


def _weights(state):
  return state['ema_params'] if 'ema_params' in state else state['params']


def reconstruct(model, images, batch_size):
  """uint8 reconstructions (from the mean latent) of dataset `images`, in batches."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    model = nnx.merge(graphdef, state)
    return model.decode(model.encode(x)[0])

  return np.concatenate([
      images_lib.to_uint8(forward(state, images_lib.to_model(images[i:i + batch_size])))
      for i in range(0, len(images), batch_size)])


def latent_statistics(model, dataset, config):
  """shift = mean and scale = 1/std of sampled latents z = mean + std·ε of the first
  `eval.num_latent_examples` training images (LDM's scale factor, SD3's shift)."""
  num = min(dataset.num_examples, config.eval.num_latent_examples)
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda state, x, key: autoencoder_lib.sample(
      *nnx.merge(graphdef, state).encode(x), key))
  latents = []
  for i, start in enumerate(range(0, num, config.eval.batch_size)):
    batch = dataset.get_batch(np.arange(start, min(num, start + config.eval.batch_size)))
    latents.append(np.asarray(encode(state, images_lib.to_model(batch['image']),
                                     jax.random.PRNGKey(i)), np.float64))
  latents = np.concatenate(latents)
  std = float(latents.std())
  return {'latent_shift': round(float(latents.mean()), 6), 'latent_scale': round(1.0 / std, 6),
          'latent_std': round(std, 6), 'latent_shape': list(latents.shape[1:]),
          'num_latent_examples': int(num)}
