"""Trains and loads guidedflow's own Fashion-MNIST feature network (a small CNN classifier).

The generated-sample metrics (FD, precision/recall, class accuracy) need a feature network
trained on the data; for Fashion-MNIST there is no standard one, so this module trains
`models.classifier.Classifier` (`train_and_evaluate`, a few minutes on a 2-core CPU) and
loads it for the evaluator (`load_feature_network`).

Checkpoint layout (`<workdir>/checkpoints/<step>/`, orbax `CheckpointManager`):
  params: the model's `nnx.Param` state (`StandardSave`), the only item inference reads.
  train_state: {'opt_state'} for resuming an interrupted run.
  meta: JSON {'model': constructor arguments, 'config', 'data': iterator state,
        'result': {test_accuracy, ...} (only in the final step), 'num_steps'}.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from guidedflow import input_pipeline
from guidedflow.models.classifier import Classifier

FEATURE_NETWORK_NAME = 'fmnist_classifier'
# Wall time of the default configs/fmnist_classifier.py run on a 2-core CPU (measured 3m13s
# to 3m32s with other jobs on the machine), rounded up; quoted in the not-found error.
_TRAIN_MINUTES_2CORE = 4
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class ConfigError(ValueError):
  """A classifier config value is invalid; the message names the key and the fix."""


class TrainingError(RuntimeError):
  """Classifier training cannot go on (non-finite loss)."""


class FeatureNetworkNotFoundError(FileNotFoundError):
  """The workdir holds no (finished) classifier checkpoint; the message says how to train one."""


def _train_command(workdir: str) -> str:
  return (f'python -m guidedflow.main --config configs/fmnist_classifier.py --workdir {workdir} '
          f'(about {_TRAIN_MINUTES_2CORE} minutes on a 2-core CPU)')


# ----------------------------------------------------------------------------- config & model


def validate_config(config) -> None:
  """Checks the classifier config; raises ConfigError naming the key."""
  if config.get('task', 'generate') != 'classifier':
    raise ConfigError(f"config.task={config.get('task')!r}: train_classifier needs "
                      "config.task='classifier' (configs/fmnist_classifier.py).")
  for key in ('train.num_steps', 'train.batch_size', 'train.log_every_steps',
              'checkpoint.every_steps', 'eval.batch_size', 'model.feature_dim',
              'input.num_classes'):
    group, name = key.split('.')
    value = config[group][name]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.{key}={value!r} must be a positive integer.')
  for key in ('input.num_train_examples', 'eval.num_examples', 'optim.warmup_steps'):
    group, name = key.split('.')
    value = config[group][name]
    if not isinstance(value, int) or value < 0:
      raise ConfigError(f'config.{key}={value!r} must be an integer >= 0 (0: all / none).')
  if not config.model.channels or any(int(c) < 1 for c in config.model.channels):
    raise ConfigError(f'config.model.channels={config.model.channels!r} must be a non-empty '
                      'tuple of positive conv widths, e.g. (32, 64, 128).')
  if config.model.dtype not in _DTYPES:
    raise ConfigError(f'config.model.dtype={config.model.dtype!r} is not one of '
                      f'{tuple(_DTYPES)}.')
  if not config.optim.learning_rate > 0:
    raise ConfigError(f'config.optim.learning_rate={config.optim.learning_rate} must be > 0.')
  if jax.process_count() > 1:
    raise ConfigError('The feature-network classifier trains in a single process (it takes a '
                      'few minutes on a CPU); run it without jax.distributed.')


def _model_spec(config, image_shape) -> dict[str, Any]:
  """Constructor arguments of the classifier (JSON-able; stored in the checkpoint)."""
  height, width, channels = (int(d) for d in image_shape)
  if height != width:
    raise ConfigError(f'The data has {height}x{width} images; the classifier takes square '
                      'images.')
  downsample = 2 ** (len(config.model.channels) - 1)
  if height % downsample:
    raise ConfigError(f'config.model.channels={tuple(config.model.channels)} pools the '
                      f'{height}x{width} images by {downsample}, which does not divide {height}; '
                      'use fewer stages.')
  return {'num_classes': int(config.input.num_classes), 'in_channels': channels,
          'feature_dim': int(config.model.feature_dim),
          'channels': [int(c) for c in config.model.channels], 'input_size': height,
          'group_norm': bool(config.model.group_norm), 'dtype': config.model.dtype}


def _construct(spec: dict[str, Any], seed: int = 0) -> Classifier:
  kwargs = dict(spec)
  dtype = _DTYPES[kwargs.pop('dtype')]
  return Classifier(**kwargs, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def _abstract(tree):
  """ShapeDtypeStruct leaves on the default device: a restore target for orbax."""
  device_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device_sharding), tree)


def _subset(dataset, num_examples: int):
  """The first `num_examples` examples (0: all) as an in-memory dataset."""
  if not num_examples or num_examples >= dataset.num_examples:
    return dataset
  batch = dataset.get_batch(np.arange(num_examples))
  return input_pipeline.ArrayDataset(batch['image'], batch['label'],
                                     num_classes=dataset.num_classes, name=dataset.name,
                                     split=f'{dataset.split}[:{num_examples}]')


def _checkpoint_manager(workdir: str, *, create: bool) -> ocp.CheckpointManager:
  directory = os.path.join(workdir, 'checkpoints')
  if '://' not in directory:  # orbax wants absolute local paths; gs:// stays as it is
    directory = os.path.abspath(directory)
  handlers = {'params': ocp.StandardCheckpointHandler(),
              'train_state': ocp.StandardCheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


# ----------------------------------------------------------------------------- training


def _learning_rate_schedule(config):
  """Linear warm-up from lr / warmup_steps, then cosine decay to lr × final_lr_factor."""
  optim, total = config.optim, config.train.num_steps
  peak = optim.learning_rate
  warmup = min(optim.warmup_steps, total - 1)
  if warmup < 1:
    return optax.cosine_decay_schedule(peak, total, optim.final_lr_factor)
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / warmup, peak_value=peak, warmup_steps=warmup, decay_steps=total,
      end_value=peak * optim.final_lr_factor)


def _augment(images: jax.Array, key: jax.Array, *, random_flip: bool,
             max_shift: int) -> jax.Array:
  """Random horizontal flips (garments are left/right symmetric) and shifts (zero-padded)."""
  batch, height, width, _ = images.shape
  flip_key, shift_key = jax.random.split(key)
  if random_flip:
    flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
  if max_shift:
    # Pad with the background value (−1) and take a random crop of the original size.
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     constant_values=-1.0)
    offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(  # pylint: disable=g-long-lambda
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  return images


def _make_train_step(graphdef, tx, schedule, config):
  """The jitted update; the state {'step', 'params', 'opt_state'} is donated."""
  random_flip = bool(config.train.random_flip)
  max_shift = int(config.train.random_shift_pixels)

  def loss_fn(params, images, labels):
    logits = nnx.merge(graphdef, params)(images)  # (B, K)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return loss, accuracy

  def step_fn(state, batch, base_key):
    key = jax.random.fold_in(base_key, state['step'])
    images = _augment(batch['image'], key, random_flip=random_flip, max_shift=max_shift)
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], images, batch['label'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'accuracy': accuracy, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state['step'])}
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics

  return jax.jit(step_fn, donate_argnums=(0,))


def _make_predict(graphdef):
  """Jitted (params, images float [−1, 1]) → (features, logits)."""
  return jax.jit(lambda params, images: nnx.merge(graphdef, params).features_and_logits(images))


def _accuracy(predict, params, dataset, batch_size: int) -> float:
  """Top-1 accuracy over `dataset` (fixed-shape, padded batches: one compile)."""
  correct, total = 0.0, 0.0
  for batch in input_pipeline.eval_batches(dataset, batch_size, process_index=0,
                                           process_count=1):
    _, logits = predict(params, batch['image'])
    hits = np.asarray(jnp.argmax(logits, -1) == batch['label'], np.float32)
    mask = np.asarray(batch['mask'])
    correct += float(np.sum(hits * mask))
    total += float(np.sum(mask))
  return correct / max(total, 1.0)


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _train(config, workdir: str) -> tuple[Classifier, dict[str, Any]]:
  """Trains (or resumes, or skips when finished); returns the trained model and the result."""
  t_start = time.time()
  validate_config(config)
  workdir = os.fspath(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  train_set = _subset(input_pipeline.create_dataset(config.input, config.input.train_split),
                      config.input.num_train_examples)
  spec = _model_spec(config, train_set.image_shape)
  graphdef, params = nnx.split(_construct(spec, config.train.seed), nnx.Param)
  schedule = _learning_rate_schedule(config)
  tx = optax.adamw(schedule, b1=config.optim.b1, b2=config.optim.b2,
                   weight_decay=config.optim.weight_decay)
  if config.optim.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), tx)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  predict = _make_predict(graphdef)
  num_steps, batch_size = config.train.num_steps, config.train.batch_size

  manager = _checkpoint_manager(workdir, create=True)
  latest = manager.latest_step()
  data_state = None
  if latest is not None:
    meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if meta['model'] != spec:
      manager.close()
      raise ConfigError(
          f'{workdir}/checkpoints holds a classifier built with {meta["model"]}, but the config '
          f'asks for {spec}. Use another --workdir, or the config it was trained with.')
    if meta.get('result') is not None and latest >= num_steps:
      logging.info('Classifier in %s is already trained (step %d, test accuracy %.4f); '
                   'nothing to do. Use another --workdir to train again.', workdir, latest,
                   meta['result']['test_accuracy'])
      restored = manager.restore(latest, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(params))))['params']
      manager.close()
      return nnx.merge(graphdef, restored), dict(meta['result'], skipped=True)
    if latest >= num_steps:
      manager.close()
      raise ConfigError(
          f'{workdir}/checkpoints holds an unfinished classifier run at step {latest}, past '
          f'config.train.num_steps={num_steps}. Resume it with its own '
          f'--config.train.num_steps={meta.get("num_steps")}, or use another --workdir.')
    restored = manager.restore(latest, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params)),
        train_state=ocp.args.StandardRestore(_abstract({'opt_state': state['opt_state']}))))
    state = {'step': jnp.asarray(latest, jnp.int32), 'params': restored['params'],
             'opt_state': restored['train_state']['opt_state']}
    data_state = meta.get('data')
    logging.info('Resuming classifier training from step %d in %s.', latest, workdir)
  start_step = int(state['step'])
  logging.info('Classifier %s: %.3fM parameters; data %s %s (%d examples); %d steps of %d.',
               spec['channels'], sum(x.size for x in jax.tree.leaves(params)) / 1e6,
               config.input.dataset, train_set.image_shape, train_set.num_examples, num_steps,
               batch_size)

  iterator = input_pipeline.BatchIterator(train_set, global_batch_size=batch_size,
                                          seed=config.train.seed, start_step=start_step,
                                          process_index=0, process_count=1)
  if data_state is not None:
    iterator.set_state(data_state)
  train_step = _make_train_step(graphdef, tx, schedule, config)
  base_key = jax.random.PRNGKey(config.train.seed)

  def save(step, result=None):
    meta = {'model': spec, 'config': config.to_dict(), 'data': iterator.get_state(),
            'num_steps': num_steps, 'result': result}
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state['params']),
        train_state=ocp.args.StandardSave({'opt_state': state['opt_state']}),
        meta=ocp.args.JsonSave(meta)), force=True)

  step, pending = start_step, []
  t_train = t_log = time.time()
  step_log, compile_s, last_accuracy = step, 0.0, float('nan')
  while step < num_steps:
    batch = next(iterator)
    state, metrics = train_step(state, batch, base_key)
    step += 1
    if step == start_step + 1:
      jax.block_until_ready(state)
      compile_s = time.time() - t_train
      t_log, step_log = time.time(), step
      logging.info('First classifier step (compile + run) took %.1f s.', compile_s)
    pending.append(metrics)
    if step % config.train.log_every_steps == 0 or step == num_steps:
      summary = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
      pending = []
      if not math.isfinite(summary['loss']):
        manager.close()
        raise TrainingError(
            f'Non-finite classifier loss by step {step}; lower config.optim.learning_rate '
            '(or enable config.optim.grad_clip_norm) and train again in a fresh --workdir.')
      now = time.time()
      steps_per_s = (step - step_log) / max(now - t_log, 1e-9) if step > step_log else 0.0
      t_log, step_log = now, step
      eta = (num_steps - step) / steps_per_s if steps_per_s else float('nan')
      last_accuracy = summary['accuracy']
      logging.info('step %d/%d  loss %.4f  train acc %.3f  lr %.2e  %.2f steps/s  %.0f img/s  '
                   'ETA %s', step, num_steps, summary['loss'], summary['accuracy'],
                   summary['learning_rate'], steps_per_s, steps_per_s * batch_size,
                   _format_seconds(eta))
    if step < num_steps and step % config.checkpoint.every_steps == 0:
      save(step)
  jax.block_until_ready(state)
  train_s = time.time() - t_train - compile_s
  trained = step - start_step - 1  # The first step's time is in compile_s.

  t_eval = time.time()
  test_set = _subset(input_pipeline.create_dataset(config.input, config.input.eval_split),
                     config.eval.num_examples)
  test_accuracy = _accuracy(predict, state['params'], test_set, config.eval.batch_size)
  result = {
      'test_accuracy': round(test_accuracy, 5),
      # Last logging window, on augmented batches.
      'train_accuracy': round(last_accuracy, 5) if math.isfinite(last_accuracy) else None,
      'num_test_examples': test_set.num_examples,
      'steps': num_steps,
      'steps_this_run': step - start_step,
      'train_images_per_s': round(trained * batch_size / train_s, 1) if trained > 0 else None,
      'compile_s': round(compile_s, 2),
      'eval_s': round(time.time() - t_eval, 2),
  }
  result['seconds'] = round(time.time() - t_start, 2)
  save(step, result)
  manager.wait_until_finished()
  manager.close()
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'classifier_result.json').write_text(json.dumps(result, indent=2))
  logging.info('Classifier done: test accuracy %.4f on %d images; %s', test_accuracy,
               test_set.num_examples, json.dumps(result))
  return nnx.merge(graphdef, state['params']), result


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains the classifier in `workdir` (resuming, or skipping when already trained).

  Returns:
    JSON-able dict: test_accuracy, train_images_per_s, seconds, steps, ...
  """
  return _train(config, workdir)[1]


def evaluate(config, workdir: str) -> dict[str, Any]:
  """--mode=evaluate: test accuracy of the checkpoint in `workdir` on config.input.eval_split."""
  network = load_feature_network(workdir, batch_size=config.eval.batch_size)
  test_set = _subset(input_pipeline.create_dataset(config.input, config.input.eval_split),
                     config.eval.num_examples)
  data = test_set.get_batch(np.arange(test_set.num_examples))
  images, labels = data['image'], data['label']
  if images.dtype != np.uint8:  # Float datasets hold images in [−1, 1].
    images = np.clip(np.round((images.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
  t0 = time.time()
  logits = network(images)['logits']
  return {
      'test_accuracy': round(float(np.mean(np.argmax(logits, -1) == labels)), 5),
      'num_test_examples': int(test_set.num_examples),
      'split': test_set.split,
      'trained_test_accuracy': network.meta.get('test_accuracy'),
      'step': network.meta.get('step'),
      'seconds': round(time.time() - t0, 2),
  }


# ----------------------------------------------------------------------------- inference


class ClassifierFeatures:
  """The trained classifier as a feature network: uint8 images → features and logits.

  Attributes:
    name: 'fmnist_classifier'.
    meta: {'num_classes', 'feature_dim', 'channels', 'test_accuracy', 'step', 'workdir', ...}.
    image_shape: (H, W, C) the network takes, (28, 28, 1) for Fashion-MNIST.
    batch_size: images per compiled call; the last batch is padded, so any number of images
      uses one compiled program.
  """

  name = FEATURE_NETWORK_NAME

  def __init__(self, model: Classifier, *, meta: dict[str, Any], batch_size: int = 500):
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.meta = dict(meta)
    self.image_shape = (model.input_size, model.input_size, model.in_channels)
    self.batch_size = int(batch_size)
    self.num_traces = 0  # Compilations of the forward pass (tests check it stays 1).

    def forward(params, images_uint8):
      self.num_traces += 1
      images = images_uint8.astype(jnp.float32) * (1 / 127.5) - 1.0  # [0, 255] → [−1, 1]
      return nnx.merge(self.graphdef, params).features_and_logits(images)

    self._forward = jax.jit(forward)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features (N, feature_dim) and logits (N, num_classes), float32, of uint8 NHWC images."""
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      expected = ', '.join(str(d) for d in self.image_shape)
      raise ValueError(f'{self.name} expects uint8 images of shape (N, {expected}) (NHWC, '
                       f'values 0..255), got shape {images.shape}.')
    if images.dtype != np.uint8:
      raise ValueError(f'{self.name} expects uint8 images (0..255), got {images.dtype}; convert '
                       'model outputs in [-1, 1] with guidedflow.images.to_uint8.')
    features, logits = [], []
    for start in range(0, images.shape[0], self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.pad(chunk, ((0, self.batch_size - chunk.shape[0]), (0, 0), (0, 0), (0, 0)))
      f, l = self._forward(self.params, padded)
      features.append(np.asarray(f)[:chunk.shape[0]])
      logits.append(np.asarray(l)[:chunk.shape[0]])
    if not features:
      return {'features': np.zeros((0, self.meta['feature_dim']), np.float32),
              'logits': np.zeros((0, self.meta['num_classes']), np.float32)}
    return {'features': np.concatenate(features).astype(np.float32, copy=False),
            'logits': np.concatenate(logits).astype(np.float32, copy=False)}


def load_feature_network(workdir: str, *, batch_size: int = 500) -> ClassifierFeatures:
  """Loads the classifier trained by `train_and_evaluate` in `workdir`.

  Raises:
    FeatureNetworkNotFoundError: no finished classifier checkpoint in `workdir/checkpoints`;
      the message gives the command that trains one.
  """
  workdir = os.fspath(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  if not epath.Path(directory).is_dir():
    raise FeatureNetworkNotFoundError(
        f'no Fashion-MNIST classifier checkpoint in {workdir}; train one with: '
        f'{_train_command(workdir)}')
  manager = _checkpoint_manager(workdir, create=False)
  try:
    step = manager.latest_step()
    if step is None:
      raise FeatureNetworkNotFoundError(
          f'no Fashion-MNIST classifier checkpoint in {workdir}; train one with: '
          f'{_train_command(workdir)}')
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except (KeyError, FileNotFoundError, ValueError) as e:
      raise FeatureNetworkNotFoundError(
          f'no Fashion-MNIST classifier checkpoint in {workdir} (step {step} there is not a '
          f'classifier checkpoint: {type(e).__name__}); train one with: '
          f'{_train_command(workdir)}') from None
    if meta is None or 'model' not in meta:
      raise FeatureNetworkNotFoundError(
          f'no Fashion-MNIST classifier checkpoint in {workdir} (step {step} has no classifier '
          f'metadata); train one with: {_train_command(workdir)}')
    if meta.get('result') is None:
      raise FeatureNetworkNotFoundError(
          f'the Fashion-MNIST classifier in {workdir} did not finish training (step {step} of '
          f'{meta.get("num_steps")}); resume it with: {_train_command(workdir)}')
    model = nnx.eval_shape(lambda: _construct(meta['model']))
    graphdef, abstract_params = nnx.split(model, nnx.Param)
    params = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(abstract_params))))['params']
  finally:
    manager.close()
  spec = meta['model']
  info = {'num_classes': spec['num_classes'], 'feature_dim': spec['feature_dim'],
          'channels': tuple(spec['channels']), 'test_accuracy': meta['result']['test_accuracy'],
          'step': int(step), 'workdir': workdir,
          'dataset': meta.get('config', {}).get('input', {}).get('dataset')}
  return ClassifierFeatures(nnx.merge(graphdef, params), meta=info, batch_size=batch_size)
