"""The classifier task: the Fashion-MNIST feature network of the sample metrics.

For Fashion-MNIST there is no standard feature network, so guidedflow trains
`models.classifier.Classifier` (`configs/fmnist_classifier.py`, a few minutes on a 2-core CPU)
through the one training loop: cross-entropy on augmented batches (random flips and shifts),
exact resume, preemption and the non-finite stop like every task. Its penultimate activations
are the features of FD and precision/recall, its logits the class accuracy of samples
(`feature_networks.load_classifier` reads the finished workdir).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from guidedflow import feature_networks
from guidedflow import images as images_lib
from guidedflow import models
from guidedflow import run_context
from guidedflow import validation
from guidedflow.models import classifier as classifier_lib
from guidedflow.tasks import base


def augment(images, key, *, random_flip, max_shift):
  """Random horizontal flips (garments are left/right symmetric) and shifts by up to
  `max_shift` pixels, padded with the background value −1; images (B, H, W, C) in [−1, 1]."""
  batch, height, width, _ = images.shape
  flip_key, shift_key = jax.random.split(key)
  if random_flip:
    flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
  if max_shift:
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     constant_values=-1.0)
    offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(  # pylint: disable=g-long-lambda
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  return images


class ClassifierTask(base.Task):
  """A CNN classifier p(y|x) of clean images; reports its test accuracy at the end."""

  name = 'classifier'
  description = 'the feature network for the sample metrics'
  log_keys = ('accuracy',)

  @staticmethod
  def validate(config):
    validation.integers(config, ('eval.batch_size', 'model.feature_dim'))
    validation.counts(config, ('eval.num_examples', 'train.random_shift_pixels'))
    validation.widths(config, 'model.channels', '(32, 64, 128)')
    validation.choices(config, {'model.dtype': tuple(models.DTYPES),
                                'model.arch': classifier_lib.ARCHS})

  def _logits(self, model, batch):
    return model(batch['image'])  # (B, K)

  def loss(self, model, batch, key):
    config = self.config.train
    images = augment(batch['image'], key, random_flip=bool(config.random_flip),
                     max_shift=int(config.random_shift_pixels))
    metrics = self.eval_metrics(model, dict(batch, image=images), key)
    return metrics['loss'], {'accuracy': metrics['accuracy']}

  def eval_metrics(self, model, batch, key):
    del key  # Unused: no noise at evaluation.
    logits = self._logits(model, batch)
    labels = batch['label']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {'loss': base.masked_mean(loss, batch), 'accuracy': base.masked_mean(hits, batch)}

  def _test(self, run, params):
    t0 = time.time()
    dataset = self.eval_dataset()
    metrics = run.heldout(params, dataset, batch_size=self.config.eval.batch_size)
    return {'test_accuracy': round(metrics['accuracy'], 5), 'test_loss': round(metrics['loss'], 5),
            'num_test_examples': dataset.num_examples, 'eval_s': round(time.time() - t0, 2)}

  def periodic(self, run, state, step):
    if not run_context.itstime(step, self.config.eval.every_steps, run.num_steps,
                         last=False):
      return {}
    return {f'eval/{k[5:]}': v for k, v in self._test(run, state['params']).items()
            if k in ('test_accuracy', 'test_loss')}

  def final(self, run, state):
    return self._test(run, state['params'])

  def evaluate(self, workdir):
    """--mode=evaluate: test accuracy of the finished classifier in `workdir` on the eval split,
    through the feature-network path the sample metrics use (uint8 images)."""
    network = feature_networks.load_classifier(workdir, batch_size=self.config.eval.batch_size)
    dataset = self.eval_dataset()
    data = dataset.get_batch(np.arange(dataset.num_examples))
    t0 = time.time()
    logits = network(images_lib.to_uint8(data['image']))['logits']
    return {
        'test_accuracy': round(float(np.mean(np.argmax(logits, -1) == data['label'])), 5),
        'num_test_examples': int(dataset.num_examples), 'split': dataset.split,
        'trained_test_accuracy': network.meta.get('test_accuracy'),
        'step': network.meta.get('step'), 'seconds': round(time.time() - t0, 2),
    }
