"""The noise-aware classifier task: p_t(y|x) on x_t of the generator's path (classifier guidance).

Classifier guidance (ũ = u(x) + w b_t ∇log p_t(y|x)) needs a classifier of *noisy* images at
every time of the sampler. `models.noisy_classifier.NoisyClassifier` (the U-Net's encoder half,
as ADM's) is trained here through the one training loop: from the batch's clean images z
(optionally flipped / shifted as the clean classifier's), t from the generator's time sampler,
ε ~ N(0, I), x_t = α_t z + β_t ε on the generator's path (`config.path.schedule` must be the
generator's), and cross-entropy of its logits at (x_t, t) with the labels. t is used as drawn,
in [0, 1]: t = 0 is pure noise (chance accuracy is all one can reach), t = 1 clean data.

Held-out metrics: every test image at each of `eval.time_bins` bin centres t_k = (k + ½)/K, with
one noise draw shared by all bins, so the accuracy-vs-t curve compares like with like. The
report gives that curve and the times where it crosses 50% and 90% accuracy.
"""

import time

from absl import logging
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from guidedflow import losses
from guidedflow import models
from guidedflow import paths
from guidedflow import run_context
from guidedflow import trained
from guidedflow import validation
from guidedflow.models import unet
from guidedflow.tasks import base
from guidedflow.tasks import classifier


def bin_centres(num_bins):
  """The times t_k = (k + ½)/K, k = 0..K−1, at which held-out accuracy is measured."""
  return [(k + 0.5) / num_bins for k in range(num_bins)]


def crossing_time(centres, accuracies, level):
  """The smallest t at which the accuracy reaches `level`, linearly interpolated between the
  bin centres (increasing); the first centre if it is reached there; None if never reached."""
  previous = None
  for t, accuracy in zip(centres, accuracies):
    if accuracy >= level:
      if previous is None:
        return float(t)
      t0, a0 = previous  # a0 < level <= accuracy
      return float(t0 + (level - a0) / (accuracy - a0) * (t - t0))
    previous = (t, accuracy)
  return None


def _bin_key(k):
  return f'accuracy_bin{k:02d}'


class NoisyClassifierTask(base.Task):
  """p_t(y|x) of noisy images x_t; reports test accuracy per time bin at the end."""

  name = 'noisy_classifier'
  description = 'the noise-aware classifier of classifier guidance'
  log_keys = ('accuracy',)

  @staticmethod
  def validate(config):
    validation.integers(config, ('eval.batch_size', 'eval.time_bins',
                                 'model.num_residual_layers', 'model.t_embed_dim'))
    validation.choices(config, {'model.dtype': tuple(models.DTYPES), 'model.norm': unet.NORMS,
                                'path.schedule': paths.SCHEDULES,
                                'loss.time_sampler': losses.TIME_SAMPLERS})
    validation.counts(config, ('eval.num_examples', 'train.random_shift_pixels'))
    validation.widths(config, 'model.channels', '(32, 64, 128)')
    if config.loss.time_sampler == 'logit_normal':
      validation.number(config, 'loss.logit_normal_std', above=0)

  def __init__(self, config, workdir=None):
    super().__init__(config, workdir)
    self.path = paths.get_path(config.path.schedule)

  def _cross_entropy(self, model, images, t, batch):
    logits = model(images, t)  # (B, K)
    labels = batch['label']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return base.masked_mean(loss, batch), base.masked_mean(hits, batch)

  def loss(self, model, batch, key):
    config = self.config
    key_augment, key_time, key_noise = jax.random.split(key, 3)
    z = classifier.augment(batch['image'], key_augment,
                           random_flip=bool(config.train.random_flip),
                           max_shift=int(config.train.random_shift_pixels))
    kwargs = None
    if config.loss.time_sampler == 'logit_normal':
      kwargs = dict(mean=config.loss.logit_normal_mean, std=config.loss.logit_normal_std)
    t = losses.sample_time(key_time, (z.shape[0],), config.loss.time_sampler, kwargs)
    eps = jax.random.normal(key_noise, z.shape, z.dtype)
    x = self.path.sample_xt(z, eps, t.astype(z.dtype))
    loss, accuracy = self._cross_entropy(model, x, t, batch)
    return loss, {'accuracy': accuracy}

  def eval_metrics(self, model, batch, key):
    """Loss and accuracy at each bin centre (one noise draw from `key` for all bins), their
    means over the bins ('loss', 'accuracy') and the accuracy per bin ('accuracy_binNN')."""
    z = batch['image']
    eps = jax.random.normal(key, z.shape, z.dtype)
    centres = jnp.asarray(bin_centres(self.config.eval.time_bins), jnp.float32)
    graphdef, state = nnx.split(model)

    def one_bin(t):
      t = jnp.full((z.shape[0],), t, jnp.float32)
      x = self.path.sample_xt(z, eps, t.astype(z.dtype))
      return self._cross_entropy(nnx.merge(graphdef, state), x, t, batch)

    # One bin at a time (lax.map): the bins' activations never sit in memory together.
    loss, accuracy = jax.lax.map(one_bin, centres)  # (K,), (K,)
    metrics = {'loss': jnp.mean(loss), 'accuracy': jnp.mean(accuracy)}
    metrics.update({_bin_key(k): accuracy[k] for k in range(len(centres))})
    return metrics

  def _test(self, heldout):
    """The report (`time_report`) of `heldout(dataset, batch_size)` on the eval split."""
    t0 = time.time()
    dataset = self.eval_dataset()
    report = time_report(heldout(dataset, self.config.eval.batch_size),
                         self.config.eval.time_bins)
    report.update(num_test_examples=int(dataset.num_examples),
                  eval_s=round(time.time() - t0, 2))
    logging.info('Noisy classifier test accuracy by t: %s',
                 '  '.join(f'{b["t"]:.2f}:{b["accuracy"]:.3f}'
                           for b in report['accuracy_per_time_bin']))
    return report

  def _test_state(self, run, state):
    return self._test(lambda dataset, batch_size: run.heldout(_weights(state), dataset,
                                                              batch_size=batch_size))

  def periodic(self, run, state, step):
    if not run_context.itstime(step, self.config.eval.every_steps, run.num_steps,
                         last=False):
      return {}
    report = self._test_state(run, state)
    scalars = {'eval/loss': report['test_loss'], 'eval/accuracy': report['test_accuracy']}
    for k, entry in enumerate(report['accuracy_per_time_bin']):
      scalars[f'eval/{_bin_key(k)}'] = entry['accuracy']
    for level in ('50', '90'):
      if report[f't_accuracy_{level}'] is not None:
        scalars[f'eval/t_accuracy_{level}'] = report[f't_accuracy_{level}']
    return scalars

  def final(self, run, state):
    return self._test_state(run, state)

  def evaluate(self, workdir):
    """--mode=evaluate: the per-time-bin test accuracy of the finished run in `workdir` again
    (same noise as its final report), and its step."""
    model, result, _ = trained.load(
        workdir, self.name, trained.train_command(workdir, trained.NOISY_CLASSIFIER_CONFIG))
    graphdef, params = nnx.split(model)
    eval_step = jax.jit(lambda p, b, k: self.eval_metrics(nnx.merge(graphdef, p), b, k))
    # The loop's held-out means with the loop's keys: the noise of the run's final report.
    report = self._test(lambda dataset, batch_size: run_context.heldout_metrics(
        eval_step, params, dataset, batch_size=batch_size, num_batches=0, batch_sharding=None,
        seed=self.config.train.seed))
    return {'step': result['step'], **report}


def time_report(metrics, num_bins):
  """The JSON report of held-out `metrics` (means of `eval_metrics`): test loss and accuracy,
  accuracy per time bin, and the times where accuracy crosses 0.5 and 0.9 (None: never)."""
  centres = bin_centres(num_bins)
  accuracies = [float(metrics[_bin_key(k)]) for k in range(num_bins)]
  crossing = {level: crossing_time(centres, accuracies, level / 100) for level in (50, 90)}
  return {
      'test_loss': round(float(metrics['loss']), 5),
      'test_accuracy': round(float(metrics['accuracy']), 5),
      'accuracy_per_time_bin': [{'t': round(t, 5), 'accuracy': round(a, 5)}
                                for t, a in zip(centres, accuracies)],
      **{f't_accuracy_{level}': None if t is None else round(t, 4)
         for level, t in crossing.items()},
  }


def _weights(state):
  return state['ema_params'] if 'ema_params' in state else state['params']
