"""The generator task: class-conditional flow matching / diffusion with CFG label dropout.

Periodic work: guidance grids every `train.sample_every_steps`; every `eval.every_steps` the
held-out loss of the EMA weights and sample metrics at a small N. At the end: a grid and the
held-out loss. `--mode=sample` writes samples.npz and a grid; `--mode=evaluate` measures sample
quality (guidedflow/evaluate.py).
"""

import json
import math
import os
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import atomic
from guidedflow import errors
from guidedflow import evaluate as evaluate_lib
from guidedflow import feature_networks
from guidedflow import images as images_lib
from guidedflow import latent_cache
from guidedflow import latents
from guidedflow import losses
from guidedflow import paths
from guidedflow import sampler as sampler_lib
from guidedflow import run_context
from guidedflow.models import precision
from guidedflow.models import factory
from guidedflow.tasks import base
from guidedflow.tasks import generator_checks

_PERIODIC_KEYS = ('fd', 'precision', 'recall', 'accuracy', 'black_fraction', 'pixel_std')


class GeneratorTask(base.Task):
  """u_θ(x|y) (or s_θ, ε_θ) trained by guided CFM / DSM; sampled with CFG."""

  name = 'generate'
  description = 'a generative model'
  validate = staticmethod(generator_checks.validate)

  def __init__(self, config, workdir=None):
    super().__init__(config, workdir)
    self.path = paths.get_path(config.path.schedule)
    self._sampler = None
    self._periodic_eval = None  # None: not set up yet; False: disabled
    self._grid_step = None  # the step of the last grid written
    self._latent_space = None

  def train_compiler_options(self, backend):
    """Where the step's dots run on XLA:CPU (`train.cpu_dots`, `precision.train_compiler_options`)."""
    return precision.train_compiler_options(
        self.config.train.cpu_dots,
        factory.compute_dtype(self.config, backend)[0], backend,
        convolutional=self.config.model.name == 'unet')

  # -- data: pixels, or latent moments of them (the cache, or encoded on the fly)

  def latent_space(self):
    """The frozen autoencoder of a latent generator (None in pixel space)."""
    if self._latent_space is None and latents.is_latent(self.config):
      self._latent_space = latents.load(self.config)
    return self._latent_space

  def pixel_train_dataset(self):
    return super().train_dataset()

  def pixel_eval_dataset(self):
    return super().eval_dataset()

  def abstract_batch(self, batch_size, image_shape):
    """Pixels and labels; for a latent generator the cache's latent moments (mean, logvar of
    `image_shape`, the latent shape) and labels, and the loss draws z from them as in training
    (the autoencoder itself is not loaded: `latents.CompileStandIn`)."""
    if not latents.is_latent(self.config):
      return super().abstract_batch(batch_size, image_shape)
    if self._latent_space is None:
      self._latent_space = latents.CompileStandIn(self.config)
    moments = ((batch_size, *image_shape), jnp.float32)
    return {'mean': moments, 'logvar': moments, 'label': ((batch_size,), jnp.int32)}

  def sample_condition(self, batch_size):
    """The condition a compiled sampler takes besides int labels ({name: (shape, dtype)}), or
    None: class labels (the text task: its caption's condition)."""
    del batch_size  # Unused.
    return None

  def check_inputs(self):
    """Opens the pixel eval split (the held-out loss and sample metrics read it): a latent
    run encodes it only when the held-out loss first needs it, not at start-up."""
    base.check_eval_split(self.pixel_eval_dataset, self.config)

  def train_dataset(self):
    return self._latent_dataset(self.pixel_train_dataset(), 'train', flip=True)

  def eval_dataset(self):
    return self._latent_dataset(self.pixel_eval_dataset(), 'eval', flip=False)

  def _latent_dataset(self, pixels, which, *, flip):
    space = self.latent_space()
    if space is None:
      return pixels
    config = self.config.autoencoder
    flip = flip and config.flip
    if not config.cache:
      return latents.EncodedDataset(pixels, space, flip=flip)
    if config.cache_dir is None and self.workdir is None:
      raise errors.ConfigError('the latent cache needs --config.autoencoder.cache_dir (or a '
                               'workdir: <workdir>/latent_cache).')
    root = config.cache_dir or os.path.join(self.workdir, 'latent_cache')
    return latent_cache.open_split(
        space, pixels, os.path.join(root, which), flip=flip, batch_size=config.batch_size,
        dtype=config.cache_dtype, workers=config.workers,
        process_local=which == 'train')

  def encode(self, workdir):
    """--mode=encode: writes the latent cache of the train and eval splits and the text cache
    of the caption set (each when absent) and returns what each holds and how fast it was
    encoded."""
    out = self._extra_caches(workdir)
    if self.latent_space() is not None:
      if not self.config.autoencoder.cache:
        raise errors.ConfigError('--mode=encode writes the latent cache, but '
                                 'config.autoencoder.cache=False encodes on the fly.')
      out.update({which: dict(dataset.meta, directory=os.fspath(dataset.directory))
                  for which, dataset in (('train', self.train_dataset()),
                                         ('eval', self.eval_dataset()))})
    return out or super().encode(workdir)

  def _extra_caches(self, workdir):
    """The caches `encode` writes besides the latent cache: none here (the text task: its
    text cache)."""
    del workdir  # Unused.
    return {}

  def loss(self, model, batch, key):
    config = self.config.loss
    space = self.latent_space()
    if space is not None:  # z = mean + std·ε drawn here, from the step's key
      key_z, key = jax.random.split(key)
      batch = dict(batch, image=space.to_generator(batch['mean'], batch['logvar'], key_z))
      del batch['mean'], batch['logvar']
    kwargs = None
    if config.time_sampler == 'logit_normal':
      kwargs = dict(mean=config.logit_normal_mean, std=config.logit_normal_std)
    return losses.loss_fn(
        lambda x, t, y: model(x, t, y), batch, key, path=self.path,
        parameterization=config.parameterization, null_label=self.config.input.num_classes,
        label_dropout=config.label_dropout, time_sampler=config.time_sampler,
        time_sampler_kwargs=kwargs, dsm_weighting=config.dsm_weighting, t_eps=config.t_eps)

  # -- periodic and final work

  def _sampler_of(self, run, state):
    if self._sampler is None:
      self._sampler = sampler_lib.Sampler.from_train_state(
          self.config, run.builder, state, run.image_shape, latent_space=self.latent_space())
    self._sampler.update(state)
    return self._sampler

  def _write_grid(self, run, state, step):
    scales = self.config.sampling.grid_guidance_scales
    grid = self._sampler_of(run, state).guidance_grid(
        jax.random.PRNGKey(self.config.sampling.seed), scales)
    if jax.process_index() == 0:
      for name in (f'grid_step{step:07d}.png', 'grid_latest.png'):
        images_lib.save_png(os.path.join(run.workdir, 'samples', name), grid, upscale=2)
    run.writer.image(step, 'samples/guidance_grid', grid)
    self._grid_step = step
    scale = 'λ of CFG++' if self.config.sampling.guidance_method == 'cfg_pp' else 'w'
    logging.info('Wrote sample grid at step %d (rows: classes; column blocks: %s = %s).', step,
                 scale, ', '.join(str(w) for w in scales))

  def _heldout_loss(self, run, state):
    return run.heldout(state['ema_params'], self.eval_dataset(),
                       batch_size=self.config.train.batch_size,
                       num_batches=self.config.eval.num_batches)['loss']

  def periodic(self, run, state, step):
    if run_context.itstime(step, self.config.train.sample_every_steps, run.num_steps, last=False):
      self._write_grid(run, state, step)
    if not run_context.itstime(step, self.config.eval.every_steps, run.num_steps, last=False):
      return {}
    t0 = time.time()
    scalars = {'eval/loss_ema': self._heldout_loss(run, state)}
    scalars.update(self._sample_metrics(run, state))
    logging.info('eval at step %d: %s (%.1f s)', step,
                 ', '.join(f'{k[5:]} {v:.4g}' for k, v in scalars.items()), time.time() - t0)
    return scalars

  def _sample_metrics(self, run, state):
    """Sample metrics at a small N; skipped, with one warning, without a feature network."""
    config = self.config.eval
    if self._periodic_eval is None:
      self._periodic_eval = False
      if config.feature_network != 'none' and config.periodic_samples_per_class > 0:
        try:
          network = feature_networks.load(self.config)
          self._periodic_eval = evaluate_lib.Evaluator(
              self.config, run.workdir, self._sampler_of(run, state), network,
              self.pixel_eval_dataset())
        except FileNotFoundError as e:  # no classifier / Inception weights: keep training
          logging.warning('Periodic sample metrics disabled: %s', e)
    if not self._periodic_eval:
      return {}
    self._sampler_of(run, state)
    row, _, _ = self._periodic_eval.evaluate(
        samples_per_class=config.periodic_samples_per_class,
        guidance_scale=self.config.sampling.guidance_scale)
    return {f'eval/{k}': float(row[k]) for k in _PERIODIC_KEYS if row.get(k) is not None}

  def final(self, run, state):
    if self._grid_step != int(state['step']):  # not when the periodic grid was this step's
      self._write_grid(run, state, int(state['step']))
    heldout = self._heldout_loss(run, state)
    run.writer.scalars(int(state['step']), {'eval/loss_ema': heldout})
    return {'heldout_loss_ema': round(heldout, 6)}

  # -- modes

  def sample(self, workdir):
    """--mode=sample: <workdir>/samples/samples.npz (uint8 `images`, int32 `labels`; `arr_0`,
    `arr_1` with sampling.npz_keys='adm') and grid.png from the EMA weights (decoded pixels for
    a latent generator); returns the settings, NFE, seconds and images/s."""
    sampler = sampler_lib.Sampler.from_workdir(self.config, workdir, self.latent_space(),
                                               self.model_constructor)
    sconfig = self.config.sampling
    num, num_classes = sconfig.num_samples, sampler.num_classes
    check_output_size(num, output_shape(sampler), sconfig.max_output_gib)
    labels, note = balanced_labels(num, num_classes)
    if note and not sampler.unconditional:
      logging.warning('%s', note)
    t0 = time.time()
    images, nfe, _ = sampler.sample_images(jax.random.PRNGKey(sconfig.seed), labels,
                                           sconfig.guidance_scale)
    seconds = time.time() - t0
    out_dir = os.path.join(workdir, 'samples')
    if jax.process_index() == 0:
      keys = (('arr_0', 'arr_1') if self.config.sampling.npz_keys == 'adm'
              else ('images', 'labels'))  # ADM's evaluator reads arr_0
      write_samples(out_dir, images, labels, num_classes, keys)
    result = {
        'num_samples': num, 'nfe': nfe, 'seconds': round(seconds, 2),
        'images_per_s': round(num / max(seconds, 1e-9), 2),
        'method': sconfig.method, 'num_steps': sconfig.num_steps, 'guidance': sampler.guidance,
        'guidance_method': sampler.guidance_method.name,  # 'cfg_pp': guidance_scale is λ
        'guidance_scale': sconfig.guidance_scale, 'sigma_schedule': sconfig.sigma_schedule,
        'sigma': sconfig.sigma, 'seed': sconfig.seed, 'step': sampler.step,
        'output': os.path.join(out_dir, 'samples.npz'),
        'grid': os.path.join(out_dir, 'grid.png'),
    }
    if sampler.guidance != 'cfg':
      result.update(classifier_scale=self.config.sampling.classifier_scale,
                    classifier_nfe=sampler.classifier_nfe,
                    classifier_workdir=sampler.classifier.workdir)
    logging.info('Samples: %s', json.dumps(result))
    return result

  def evaluate(self, workdir):
    """--mode=evaluate: held-out loss of the raw and EMA weights, then sample quality and
    sweeps (guidedflow/evaluate.py) unless `config.eval.feature_network='none'`."""
    space = self.latent_space()
    builder, state, image_shape = sampler_lib.load(self.config, workdir, space,
                                                   self.model_constructor)
    run = run_context.Run(self.config, workdir, builder, None, image_shape, 0, self)
    dataset = self.eval_dataset()
    heldout = {name: run.heldout(state[key], dataset, batch_size=self.config.train.batch_size,
                                 num_batches=self.config.eval.num_batches)['loss']
               for name, key in (('loss_ema', 'ema_params'), ('loss', 'params'))}
    result = {'step': int(state['step']), 'split': self.config.input.eval_split,
              'num_batches': self.config.eval.num_batches, **heldout,
              'parameterization': self.config.loss.parameterization}
    if self.config.eval.feature_network != 'none':
      sampler = sampler_lib.Sampler.from_train_state(
          self.config, builder, state, image_shape, latent_space=space,
          classifier=sampler_lib.load_classifier(self.config, image_shape, space),
          weak_params=sampler_lib.load_weak_model(self.config, builder, workdir,
                                                  int(state['step'])))
      result.update(self._sample_quality(workdir, sampler))
    return result

  def _feature_networks(self):
    """The primary feature network of `eval.feature_network`, then the extra ones."""
    primary, *extra = feature_networks.names(self.config)
    return (feature_networks.load(self.config, primary),
            [feature_networks.load(self.config, name) for name in extra])

  def _sample_quality(self, workdir, sampler):
    """--mode=evaluate's sample metrics and sweeps (guidedflow/evaluate.py)."""
    network, extra = self._feature_networks()
    return evaluate_lib.run(self.config, workdir, sampler, network, self.pixel_eval_dataset(),
                            self.pixel_train_dataset(), extra_networks=extra)


def balanced_labels(num_samples, num_classes):
  """(int32 labels cycling over 0..num_classes-1, so that per-class counts differ by at most
  one; a warning saying which classes get fewer, or None when every class gets as many)."""
  labels = (np.arange(num_samples) % num_classes).astype(np.int32)
  count, extra = divmod(num_samples, num_classes)
  fix = f'set --config.sampling.num_samples to a multiple of {num_classes} for equal counts.'
  if not count:
    return labels, (f'sampling.num_samples={num_samples} < {num_classes} classes: only classes '
                    f'0-{num_samples - 1} are drawn (1 sample each), classes {num_samples}-'
                    f'{num_classes - 1} get none; {fix}')
  if extra:
    return labels, (f'sampling.num_samples={num_samples} is not a multiple of {num_classes} '
                    f'classes: classes 0-{extra - 1} get {count + 1} samples, classes '
                    f'{extra}-{num_classes - 1} get {count}; {fix}')
  return labels, None


def output_shape(sampler):
  """The shape of one sample the Sampler returns: its image shape, or the decoded pixels' of a
  latent generator (traced, not computed)."""
  if sampler.latent_space is None:
    return tuple(sampler.image_shape)
  space = sampler.latent_space
  latent = jax.ShapeDtypeStruct((1,) + tuple(sampler.image_shape), jnp.float32)
  return tuple(jax.eval_shape(lambda x: space.decode(space.params, x), latent).shape[1:])


def check_output_size(num_samples, shape, max_gib):
  """Refuses, before anything is sampled, a sample count whose uint8 images exceed `max_gib`."""
  gib = num_samples * math.prod(shape) / 2**30
  if gib > max_gib:
    raise errors.ConfigError(
        f'config.sampling.num_samples={num_samples} makes {gib:.1f} GiB of uint8 images '
        f'({"x".join(map(str, shape))} each), above config.sampling.max_output_gib={max_gib:g}: '
        'sample fewer per call (and more calls with other --config.sampling.seed), or raise '
        'max_output_gib if this host has the memory.')


def write_npz(out_dir, arrays):
  """<out_dir>/samples.npz of `arrays`, written whole or not at all: a full disk keeps the
  previous samples.npz and grid.png. The previous grid goes only once the new samples are in
  place, so a grid never shows samples of another run than the samples.npz beside it."""
  out = epath.Path(out_dir)
  with atomic.open_write(out / 'samples.npz') as f:
    np.savez(f, **arrays)
    f.flush()
    (out / 'grid.png').unlink(missing_ok=True)


def write_samples(out_dir, images, labels, num_classes, keys):
  """<out_dir>/samples.npz (`keys` name the images and labels) and grid.png: one row per class
  drawn, up to 10 samples each. The previous grid.png goes first, so a grid never shows
  samples of another run than the samples.npz beside it."""
  out = epath.Path(out_dir)
  write_npz(out_dir, dict(zip(keys, (images, labels))))
  rows = min(len(labels), num_classes)  # balanced labels: classes 0..rows-1 are drawn
  per_class = min(max(len(labels) // num_classes, 1), 10)
  grid = images_lib.make_grid(evaluate_lib.first_per_class(images, labels, rows, per_class),
                              rows=rows, cols=per_class)
  images_lib.save_png(os.fspath(out / 'grid.png'), grid, upscale=2)
  logging.info('Wrote %s and grid.png (%d classes, %d per class).', out / 'samples.npz', rows,
               per_class)
