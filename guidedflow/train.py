"""Training program: train_and_evaluate(config, workdir), plus the sample and evaluate modes.

Wires the math (paths, losses, sampling), the model, the data pipeline, the mesh and the
checkpoints together. One jitted step with donated state; the train state is a plain pytree
(step, params, optimizer state, EMA params) so that orbax saves and restores it sharded.
"""

import functools
import json
import math
import os
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from guidedflow import checkpointing
from guidedflow import evaluate as evaluate_lib
from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow import losses
from guidedflow import models
from guidedflow import paths
from guidedflow import sampling
from guidedflow import sharding
from guidedflow.models import precision

_ALLOWED = {
    'model.name': ('dit', 'unet'),
    'model.unet_norm': ('group', 'none'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'path.schedule': ('linear', 'cosine', 'vp'),
    'loss.parameterization': ('velocity', 'score', 'noise'),
    'loss.time_sampler': ('uniform', 'logit_normal'),
    'loss.dsm_weighting': ('none', 'noise'),
    'optim.schedule': ('constant', 'cosine'),
    'sampling.method': ('euler', 'heun', 'euler_maruyama'),
    'sampling.sigma_schedule': ('constant', 'decreasing', 'path'),
    'eval.feature_network': ('none', 'fmnist_classifier', 'inception_v3'),
    'mesh.distributed': ('auto', 'on', 'off'),
}


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the allowed values."""


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class CheckpointNotFoundError(FileNotFoundError):
  """--mode=sample/evaluate on a workdir without a checkpoint."""


# Keys added after configs were first written: their value when a config lacks them.
_LATER_KEYS = {'model.unet_norm': 'group'}


def _get(config, dotted):
  node = config
  try:
    for part in dotted.split('.'):
      node = node[part]
  except KeyError:
    if dotted in _LATER_KEYS:
      return _LATER_KEYS[dotted]
    raise
  return node


def validate_config(config):
  """Checks the config before anything is built; raises ConfigError naming key and fix."""
  for key, allowed in _ALLOWED.items():
    value = _get(config, key)
    if value not in allowed:
      raise ConfigError(f'config.{key}={value!r} is not one of {allowed}.')
  positive = ('train.num_steps', 'train.batch_size', 'train.log_every_steps',
              'sampling.num_steps', 'sampling.num_samples', 'sampling.batch_size',
              'checkpoint.every_steps', 'checkpoint.max_to_keep', 'input.num_classes',
              'sampling.grid_samples_per_class')
  for key in positive:
    value = _get(config, key)
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.{key}={value!r} must be a positive integer.')
  if not 0.0 <= config.loss.label_dropout < 1.0:
    raise ConfigError(f'config.loss.label_dropout={config.loss.label_dropout} must be in [0, 1) '
                      '(it is the probability η of training on the null label).')
  if config.optim.learning_rate <= 0:
    raise ConfigError(f'config.optim.learning_rate={config.optim.learning_rate} must be > 0.')
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ConfigError(f'config.optim.ema_decay={config.optim.ema_decay} must be in [0, 1).')
  for key in ('sampling.guidance_scale',):
    if not math.isfinite(_get(config, key)):
      raise ConfigError(f'config.{key} must be a finite number.')
  if not config.sampling.grid_guidance_scales:
    raise ConfigError('config.sampling.grid_guidance_scales must name at least one scale.')
  interval = config.sampling.guidance_interval
  if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
    raise ConfigError(f'config.sampling.guidance_interval={interval!r} must be None or '
                      '(t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1.')
  for key in ('eval.samples_per_class', 'eval.num_real_images', 'eval.nearest_k',
              'eval.grid_rows_per_class'):
    value = _get(config, key)
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.{key}={value!r} must be a positive integer.')
  for w in config.eval.guidance_scales or ():
    if not isinstance(w, (int, float)) or not math.isfinite(w):
      raise ConfigError(f'config.eval.guidance_scales={config.eval.guidance_scales!r} must be '
                        'numbers, e.g. --config.eval.guidance_scales=1,1.5,2,3,4')
  for n in config.eval.num_steps or ():
    if not isinstance(n, int) or n < 1:
      raise ConfigError(f'config.eval.num_steps={config.eval.num_steps!r} must be positive '
                        'integers, e.g. --config.eval.num_steps=5,10,20,50')
  for method in config.eval.methods or ():
    if method not in _ALLOWED['sampling.method']:
      raise ConfigError(f'config.eval.methods={config.eval.methods!r}: {method!r} is not one of '
                        f"{_ALLOWED['sampling.method']}.")
  batch, processes = config.train.batch_size, jax.process_count()
  if batch % processes:
    raise ConfigError(f'config.train.batch_size={batch} must be divisible by the number of '
                      f'processes ({processes}).')
  for key in ('mesh.shape', 'mesh.dcn_shape'):
    shape = tuple(_get(config, key))
    if len(shape) != 3 or any(not isinstance(s, int) or s == 0 or s < -1 for s in shape):
      raise ConfigError(f'config.{key}={shape!r} must be three sizes (data, fsdp, tensor), each '
                        'positive or -1 (all remaining devices), e.g. --config.mesh.shape=-1,8,1')
  remat = config.model.get('remat', 'none')
  if remat not in (True, False) and remat not in models.dit.REMAT_POLICIES:
    raise ConfigError(f'config.model.remat={remat!r} is not one of {models.dit.REMAT_POLICIES} '
                      '(True / False are accepted as full / none).')
  attention = config.model.get('attention_impl', 'einsum')
  if attention not in models.dit.ATTENTION_IMPLS:
    raise ConfigError(f'config.model.attention_impl={attention!r} is not one of '
                      f'{models.dit.ATTENTION_IMPLS}.')
  if attention == 'cudnn' and config.model.dtype != 'bfloat16':
    raise ConfigError("config.model.attention_impl='cudnn' needs --config.model.dtype=bfloat16 "
                      '(and a GPU).')
  if not isinstance(config.mesh.min_shard_size, int) or config.mesh.min_shard_size < 0:
    raise ConfigError(f'config.mesh.min_shard_size={config.mesh.min_shard_size!r} must be an '
                      'integer >= 0.')


def make_mesh(config):
  """The device mesh of `config.mesh`; ConfigError when it does not fit the devices, with the
  batch size checked against the number of batch shards."""
  try:
    mesh = sharding.make_mesh(tuple(config.mesh.shape), dcn_shape=tuple(config.mesh.dcn_shape))
  except ValueError as e:
    raise ConfigError(f'{e} (this job has {jax.device_count()} devices in '
                      f'{jax.process_count()} processes).') from e
  shards = sharding.batch_axes_size(mesh)
  batch = config.train.batch_size
  if batch % shards:
    raise ConfigError(
        f'config.train.batch_size={batch} must be divisible by the {shards} batch shards of the '
        f'mesh {dict(mesh.shape)} (data × fsdp); use a multiple of {shards}.')
  return mesh


# ----------------------------------------------------------------------------- model & state


def _dtype(name):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def model_constructor(config, image_shape):
  """Returns a zero-argument function that builds the configured model for `image_shape`."""
  height, width, channels = image_shape
  if height != width:
    raise ConfigError(f'The data has {height}x{width} images; the models take square images.')
  kwargs = {}
  if config.model.name == 'dit':
    kwargs['variant'] = config.model.variant
    # Configs without these keys (older ones) get the previous behaviour's values.
    kwargs['remat'] = models.dit.remat_policy_name(config.model.get('remat', 'none'))
    kwargs['scan_blocks'] = bool(config.model.get('scan_blocks', True))
    kwargs['attention_impl'] = config.model.get('attention_impl', 'einsum')
  else:
    kwargs['channels'] = tuple(config.model.unet_channels)
    kwargs['num_residual_layers'] = config.model.unet_num_residual_layers
    kwargs['norm'] = _get(config, 'model.unet_norm')

  dtype, reason = precision.resolve_compute_dtype(
      config.model.dtype, jax.default_backend(), convolutional=config.model.name == 'unet')
  if reason:
    logging.warning('config.model.dtype=%s: %s.', config.model.dtype, reason)

  def construct():
    return models.create_model(
        config.model.name, input_size=height, in_channels=channels,
        num_classes=config.input.num_classes, dtype=_dtype(dtype),
        param_dtype=_dtype(config.model.param_dtype),
        rngs=nnx.Rngs(config.train.seed), **kwargs)

  return construct


def learning_rate_schedule(config):
  """Linear warm-up (the first step already uses lr / warmup_steps), then constant or cosine."""
  optim, total = config.optim, config.train.num_steps
  peak = optim.learning_rate
  warmup = min(optim.warmup_steps, total)
  if optim.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, max(total - warmup, 1), optim.final_lr_factor)
  else:
    after = optax.constant_schedule(peak)
  if warmup < 1:
    return after
  ramp = optax.linear_schedule(peak / warmup, peak, max(warmup - 1, 1))
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(config):
  optim = config.optim
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(config), b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts)


class Trainer:
  """Holds what the compiled functions close over: graph, optimizer, mesh, path and config.

  The train state is a dict pytree:
    step: int32 scalar, the number of updates applied.
    params, ema_params: nnx.State of the model's parameters.
    opt_state: optax state.
    nonfinite_step: int32 scalar, −1 or the first step whose loss or gradient was not finite
      (updates stop there, so the state stays the last good one).
  """

  def __init__(self, config, image_shape, mesh):
    self.config = config
    self.image_shape = tuple(image_shape)
    self.mesh = mesh
    self.num_classes = config.input.num_classes
    self.null_label = config.input.num_classes
    self.path = paths.get_path(config.path.schedule)
    self.tx = make_optimizer(config)
    self.lr_schedule = learning_rate_schedule(config)
    self._construct = model_constructor(config, image_shape)
    abstract_model = nnx.eval_shape(self._construct)
    self.graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.replicated = sharding.replicated(mesh)
    self._train_step = None
    self._sample = None

  # -- state

  def _init_fn(self):
    """Builds the train state (and the model's non-parameter state) from scratch."""
    model = self._construct()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {
        'step': jnp.zeros((), jnp.int32),
        'params': params,
        'opt_state': self.tx.init(params),
        'ema_params': jax.tree.map(jnp.copy, params),
        'nonfinite_step': jnp.full((), -1, jnp.int32),
    }
    return state, rest

  def _shardings(self):
    """(abstract state and rest, their NamedShardings): from shapes only, nothing allocated."""
    if not hasattr(self, '_abstract'):
      abstract = jax.eval_shape(self._init_fn)
      # Optimizer statistics are Variables carrying their parameter's logical axis names, so
      # they (and the EMA) shard exactly like the parameters.
      self._abstract = abstract, sharding.state_shardings(
          abstract, self.mesh, min_shard_size=self.config.mesh.min_shard_size)
    return self._abstract

  def init_state(self):
    """The initial train state, created directly in its shards under `jax.jit`.

    Parameters, optimizer statistics and EMA are sharded by the logical-axis rules
    (`sharding.state_shardings`); no device ever holds the whole model.
    """
    _, shardings = self._shardings()
    with jax.set_mesh(self.mesh):
      state, self.rest = jax.jit(self._init_fn, out_shardings=shardings)()
    return state

  def abstract_state(self):
    """ShapeDtypeStructs with this mesh's shardings for the train state (a restore target).

    From shapes only (`jax.eval_shape`): nothing is allocated, so a checkpoint is restored
    straight into its shards, on any mesh or device count.
    """
    (abstract, _), (shardings, _) = self._shardings()
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)

  def init_rest(self):
    """The model's non-parameter state (empty for our models), for a restored train state."""
    if not hasattr(self, 'rest'):
      _, (_, rest_shardings) = self._shardings()
      with jax.set_mesh(self.mesh):
        self.rest = jax.jit(lambda: self._init_fn()[1], out_shardings=rest_shardings)()
    return self.rest

  def model_fn(self, params):
    model = nnx.merge(self.graphdef, params, self.rest)
    return lambda x, t, y: model(x, t, y)

  def param_count(self, state):
    return sum(x.size for x in jax.tree.leaves(state['params']))

  # -- training

  def loss(self, params, batch, key):
    config = self.config.loss
    return losses.loss_fn(
        self.model_fn(params), batch, key, path=self.path,
        parameterization=config.parameterization, null_label=self.null_label,
        label_dropout=config.label_dropout, time_sampler=config.time_sampler,
        time_sampler_kwargs=(dict(mean=config.logit_normal_mean, std=config.logit_normal_std)
                             if config.time_sampler == 'logit_normal' else None),
        dsm_weighting=config.dsm_weighting, t_eps=config.t_eps)

  def _step(self, state, batch, base_key):
    step = state['step']
    key = jax.random.fold_in(base_key, step)
    (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state['params'], batch, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    decay = jnp.asarray(self.config.optim.ema_decay, jnp.float32)
    if self.config.optim.ema_warmup:
      stepf = step.astype(jnp.float32)
      decay = jnp.minimum(decay, (1.0 + stepf) / (10.0 + stepf))
    ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                       state['ema_params'], params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ok = finite & (state['nonfinite_step'] < 0)
    new_state = {
        'step': step + 1,
        'params': params,
        'opt_state': opt_state,
        'ema_params': ema,
        'nonfinite_step': state['nonfinite_step'],
    }
    # Once a step is non-finite, every later update is dropped: the state stays the last good one.
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    new_state['nonfinite_step'] = jnp.where(
        (state['nonfinite_step'] < 0) & ~finite, step, state['nonfinite_step'])
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=self.lr_schedule(step))
    return new_state, metrics

  def train_step(self, state, batch, base_key):
    if self._train_step is None:
      state_shardings = jax.tree.map(lambda x: x.sharding, state)
      self._train_step = jax.jit(
          self._step, donate_argnums=(0,),
          in_shardings=(state_shardings, self.batch_sharding, self.replicated),
          out_shardings=(state_shardings, self.replicated))
    with jax.set_mesh(self.mesh):
      return self._train_step(state, batch, base_key)

  # -- sampling

  def sample(self, params, key, labels, guidance_scale, *, num_steps=None, method=None,
             sigma_schedule=None, sigma=None):
    """Samples images (float, [−1, 1]) for int `labels` with the configured sampler.

    `guidance_scale` is a number: w = 1 runs only the conditional batch (its own compile), any
    other w the doubled CFG batch (one compile shared by every w != 1).

    Returns:
      (samples, NFE per sample: the model evaluations run, doubled batches counting 2).
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
    # Decided from the Python value: a traced w = 1 would run the doubled batch for nothing.
    use_cfg = sampling.uses_cfg(guidance_scale)
    if self._sample is None:
      self._sample = {}
    cache_key = tuple(sorted(options.items())) + (('use_cfg', use_cfg),)
    if cache_key not in self._sample:
      def run(params, key, labels, guidance_scale, sigma):
        samples, info = sampling.sample(
            self.model_fn(params), key, labels, shape=self.image_shape, path=self.path,
            parameterization=self.config.loss.parameterization, null_label=self.null_label,
            guidance_scale=guidance_scale if use_cfg else 1.0, sigma=sigma, **options)
        return samples, info['nfe']
      # The batch is split over (data, fsdp) like a training batch; the noise is drawn with
      # the partitionable threefry, so the samples do not depend on the mesh.
      _, (shardings, _) = self._shardings()
      self._sample[cache_key] = jax.jit(
          run, in_shardings=(shardings['params'], self.replicated, self.batch_sharding,
                             self.replicated, self.replicated),
          out_shardings=(self.batch_sharding, self.replicated))
    labels = np.asarray(labels, np.int32)
    num = len(labels)
    shards = sharding.batch_axes_size(self.mesh)
    padded = np.pad(labels, (0, -num % shards))  # the batch must split evenly over the mesh
    with jax.set_mesh(self.mesh):
      labels = jax.device_put(padded, self.batch_sharding)
      samples, nfe = self._sample[cache_key](params, key, labels,
                                             jnp.float32(guidance_scale), jnp.float32(sigma))
      if len(padded) != num:
        samples = samples[:num]
    return samples, int(nfe)

  def sample_images(self, params, key, labels, guidance_scale, *, batch_size, **options):
    """uint8 samples for any number of labels, in padded batches of one compiled shape.

    Batch i uses key fold_in(key, i), so equal seeds give equal noise for every w.

    Returns:
      (uint8 images (N, H, W, C), NFE per sample, seconds of the first call (with compile)).
    """
    labels = np.asarray(labels, np.int32)
    batch = min(batch_size, len(labels))
    outputs, nfe, first_call_s = [], 0, 0.0
    for i, start in enumerate(range(0, len(labels), batch)):
      chunk = labels[start:start + batch]
      padded = np.pad(chunk, (0, batch - len(chunk)))  # one compiled shape for every call
      t0 = time.time()
      samples, nfe = self.sample(params, jax.random.fold_in(key, i), padded, guidance_scale,
                                 **options)
      outputs.append(images_lib.to_uint8(sharding.to_host(samples))[:len(chunk)])
      if i == 0:
        first_call_s = time.time() - t0
      logging.log_every_n_seconds(logging.INFO, 'Sampled %d/%d images.', 30,
                                  start + len(chunk), len(labels))
    return np.concatenate(outputs), nfe, first_call_s

  def guidance_grid(self, params, key, scales):
    """uint8 grid: one row per class, one block of columns per guidance scale (same noise)."""
    per_class = self.config.sampling.grid_samples_per_class
    classes = self.config.sampling.grid_classes
    classes = np.arange(self.num_classes) if classes is None else np.asarray(classes)
    labels = np.repeat(classes, per_class).astype(np.int32)
    blocks = []
    for w in scales:
      samples, _ = self.sample(params, key, labels, float(w))
      blocks.append(images_lib.to_uint8(sharding.to_host(samples)))
    return images_lib.make_guidance_grid(blocks, num_classes=len(classes),
                                         samples_per_class=per_class)

  # -- held-out loss

  def eval_loss(self, params, dataset, num_batches):
    """Held-out training objective (same t, ε, dropout draws for every call), padding masked."""
    config = self.config
    if not hasattr(self, '_eval_loss'):
      _, (shardings, _) = self._shardings()
      self._eval_loss = jax.jit(lambda p, b, k: self.loss(p, b, k)[0],
                                in_shardings=(shardings['params'], self.batch_sharding,
                                              self.replicated),
                                out_shardings=self.replicated)
    total, count = 0.0, 0.0
    key = jax.random.PRNGKey(config.train.seed + 1)
    for i, batch in enumerate(input_pipeline.eval_batches(
        dataset, config.train.batch_size, num_batches=num_batches or None,
        sharding=self.batch_sharding)):
      # Each batch's loss is the mean over its real examples; weight it by their number.
      weight = float(np.sum(sharding.to_host(batch['mask'])))
      with jax.set_mesh(self.mesh):
        total += weight * float(self._eval_loss(params, batch, jax.random.fold_in(key, i)))
      count += weight
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------- setup


def _setup(config, workdir, *, split):
  validate_config(config)
  dataset = input_pipeline.create_dataset(config.input, split)
  input_pipeline.check_image_shape(dataset.image_shape, **_model_size_constraint(config))
  mesh = make_mesh(config)
  trainer = Trainer(config, dataset.image_shape, mesh)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=config.checkpoint.max_to_keep,
      save_interval_steps=config.checkpoint.every_steps)
  return dataset, trainer, ckpt


def _model_size_constraint(config):
  """What the configured model needs of the image size (checked against the data)."""
  if config.model.name == 'dit':
    name, _, patch = config.model.variant.partition('/')
    if name not in models.VARIANTS:
      raise ConfigError(f'config.model.variant={config.model.variant!r}: unknown DiT size '
                        f'{name!r}; allowed: {sorted(models.VARIANTS)} (e.g. "S/2", "T/4").')
    if patch and not patch.isdigit():
      raise ConfigError(f'config.model.variant={config.model.variant!r}: the patch size after '
                        '"/" must be an integer.')
    return {'patch_size': int(patch) if patch else models.VARIANTS[name].get('patch_size')}
  return {'downsample_factor': 2 ** (len(config.model.unet_channels) - 1)}


def _restore_latest(trainer, ckpt, workdir):
  """(state, data-iterator state) of the newest checkpoint, restored straight into this
  mesh's shardings (whatever mesh wrote it); a fresh state and None without one."""
  step = ckpt.latest_step()
  if step is None:
    return trainer.init_state(), None
  state, data_state = ckpt.restore(trainer.abstract_state(), step=step)
  trainer.init_rest()
  logging.info('Restored checkpoint at step %d from %s.', step, workdir)
  return state, data_state


class _Writer:
  """TensorBoard scalars and images (tensorboardX; no TensorFlow), on process 0 only."""

  def __init__(self, logdir):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir)

  def scalars(self, step, values):
    if self._writer:
      for name, value in values.items():
        self._writer.add_scalar(name, value, step)

  def image(self, step, name, image):
    if self._writer:
      self._writer.add_image(name, image, step, dataformats='HWC')

  def close(self):
    if self._writer:
      self._writer.close()


# ----------------------------------------------------------------------------- train


def train_and_evaluate(config, workdir):
  """Trains (resuming from `workdir` if it holds a checkpoint), samples and evaluates.

  Returns:
    The final train state.
  """
  t_start = time.time()
  # Workdir files go through etils.epath: a local path or gs://BUCKET/... (Cloud TPU).
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  dataset, trainer, ckpt = _setup(config, workdir, split=config.input.train_split)
  state, data_state = _restore_latest(trainer, ckpt, workdir)
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
  start_step = int(state['step'])
  logging.info('Model %s: %.3fM parameters; data %s %s (%d examples); mesh %s.',
               config.model.name, trainer.param_count(state) / 1e6, config.input.dataset,
               dataset.image_shape, dataset.num_examples, dict(trainer.mesh.shape))
  iterator = input_pipeline.BatchIterator(
      dataset, global_batch_size=config.train.batch_size, seed=config.train.seed,
      sharding=trainer.batch_sharding, start_step=start_step)
  if data_state is not None:
    iterator.set_state(data_state)
  writer = _Writer(os.path.join(workdir, 'tensorboard'))
  periodic_eval = _PeriodicEval(config, workdir, trainer)
  base_key = jax.random.PRNGKey(config.train.seed)
  sample_key = jax.random.PRNGKey(config.sampling.seed)
  num_steps = config.train.num_steps
  log_every = config.train.log_every_steps
  pending, t_log, step_log = [], time.time(), start_step
  timings = {'setup_s': time.time() - t_start, 'compile_s': 0.0, 'sample_s': 0.0}
  t_train = time.time()
  step = start_step

  def save(step, force=False):
    check_finite(state, step)
    ckpt.save(step, state, data_state=iterator.get_state(), config=config.to_dict(), force=force)

  def check_finite(state, step):
    bad = int(state['nonfinite_step'])
    if bad >= 0:
      last = ckpt.latest_step()
      raise TrainingError(
          f'Non-finite loss or gradient at step {bad + 1} (update {bad}); training stopped. '
          f'The last good checkpoint (step {last}) is kept in {workdir}/checkpoints. Lower '
          'config.optim.learning_rate, enable config.optim.grad_clip_norm, or check the data.')

  while step < num_steps:
    batch = next(iterator)
    if step == start_step:
      t_compile = time.time()
    state, metrics = trainer.train_step(state, batch, base_key)
    step += 1
    if step == start_step + 1:
      jax.block_until_ready(state)
      timings['compile_s'] = time.time() - t_compile
      t_log = time.time()
      step_log = step
      logging.info('First step (compile + run) took %.1f s.', timings['compile_s'])
    pending.append(metrics)
    if step % log_every == 0 or step == num_steps:
      check_finite(state, step)
      summary = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
      pending = []
      now = time.time()
      steps_per_s = (step - step_log) / max(now - t_log, 1e-9) if step > step_log else 0.0
      t_log, step_log = now, step
      eta = (num_steps - step) / steps_per_s if steps_per_s else float('nan')
      logging.info(
          'step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.2f steps/s  %.0f img/s  ETA %s',
          step, num_steps, summary['loss'], summary['grad_norm'], summary['learning_rate'],
          steps_per_s, steps_per_s * config.train.batch_size, _format_seconds(eta))
      writer.scalars(step, {f'train/{k}': v for k, v in summary.items()})
      writer.scalars(step, {'train/steps_per_s': steps_per_s,
                            'train/images_per_s': steps_per_s * config.train.batch_size})
    sample_every = config.train.sample_every_steps
    if sample_every and step % sample_every == 0 and step < num_steps:
      t0 = time.time()
      _write_grid(trainer, state, sample_key, workdir, writer, step)
      timings['sample_s'] += time.time() - t0
    if config.eval.every_steps and step % config.eval.every_steps == 0:
      t0 = time.time()
      scalars = {'eval/loss_ema': _heldout_loss(trainer, state, config)}
      scalars.update(periodic_eval(state))
      writer.scalars(step, scalars)
      logging.info('eval at step %d: %s (%.1f s)', step,
                   ', '.join(f'{k[5:]} {v:.4g}' for k, v in scalars.items()), time.time() - t0)
      timings['sample_s'] += time.time() - t0
    if ckpt.should_stop(step):
      logging.warning('Preemption signal received: saving step %d and exiting.', step)
      save(step, force=True)
      ckpt.wait_until_finished()
      ckpt.close()
      writer.close()
      return state
    if step < num_steps and step % config.checkpoint.every_steps == 0:
      save(step, force=True)

  timings['train_s'] = time.time() - t_train - timings['sample_s'] - timings['compile_s']
  if step > start_step:
    save(step, force=True)
  t0 = time.time()
  _write_grid(trainer, state, sample_key, workdir, writer, step)
  timings['sample_s'] += time.time() - t0
  t0 = time.time()
  heldout = _heldout_loss(trainer, state, config)
  timings['eval_s'] = time.time() - t0
  writer.scalars(step, {'eval/loss_ema': heldout})
  ckpt.wait_until_finished()
  ckpt.close()
  writer.close()
  trained = step - start_step
  timings['total_s'] = time.time() - t_start
  logging.info('Done: %d steps this run (%.0f img/s); held-out loss (EMA) %.4f; timings %s.',
               trained, trained * config.train.batch_size / max(timings['train_s'], 1e-9),
               heldout, {k: round(v, 1) for k, v in timings.items()})
  return state


class _PeriodicEval:
  """Sample metrics during training (small N); skipped, with one warning, without a network."""

  def __init__(self, config, workdir, trainer):
    self.config, self.workdir, self.trainer = config, workdir, trainer
    self.enabled = (config.eval.feature_network != 'none' and
                    config.eval.periodic_samples_per_class > 0)
    self.evaluator = None

  def __call__(self, state):
    if not self.enabled:
      return {}
    if self.evaluator is None:
      try:
        eval_set = input_pipeline.create_dataset(self.config.input, self.config.input.eval_split)
        self.evaluator = evaluate_lib.Evaluator(self.config, self.workdir, self.trainer, eval_set)
      except FileNotFoundError as e:  # no classifier / Inception weights: keep training
        logging.warning('Periodic sample metrics disabled: %s', e)
        self.enabled = False
        return {}
    row, _, _ = self.evaluator.evaluate(
        state['ema_params'], samples_per_class=self.config.eval.periodic_samples_per_class,
        guidance_scale=self.config.sampling.guidance_scale)
    keys = ('fd', 'precision', 'recall', 'accuracy', 'black_fraction', 'pixel_std')
    return {f'eval/{k}': float(row[k]) for k in keys if row.get(k) is not None}


def _heldout_loss(trainer, state, config):
  eval_set = input_pipeline.create_dataset(config.input, config.input.eval_split)
  return trainer.eval_loss(state['ema_params'], eval_set, config.eval.num_batches)


def _write_grid(trainer, state, key, workdir, writer, step):
  grid = trainer.guidance_grid(state['ema_params'], key,
                               trainer.config.sampling.grid_guidance_scales)
  if jax.process_index() == 0:
    images_lib.save_png(os.path.join(workdir, 'samples', f'grid_step{step:07d}.png'), grid,
                        upscale=2)
    images_lib.save_png(os.path.join(workdir, 'samples', 'grid_latest.png'), grid, upscale=2)
  writer.image(step, 'samples/guidance_grid', grid)
  logging.info('Wrote sample grid at step %d (rows: classes; column blocks: w = %s).', step,
               ', '.join(str(w) for w in trainer.config.sampling.grid_guidance_scales))


def _format_seconds(seconds):
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------- sample / evaluate


def load_for_inference(config, workdir, split):
  """(dataset of `split`, Trainer, newest train state) of a workdir; for sampling/evaluation.

  Raises:
    CheckpointNotFoundError: the workdir holds no checkpoint.
  """
  dataset, trainer, ckpt = _setup(config, workdir, split=split)
  if ckpt.latest_step() is None:
    raise CheckpointNotFoundError(
        f'No checkpoint in {workdir}/checkpoints. Train first: python -m guidedflow.main '
        f'--config <config> --workdir {workdir}')
  state, _ = _restore_latest(trainer, ckpt, workdir)
  ckpt.close()
  return dataset, trainer, state


def sample_and_save(config, workdir):
  """--mode=sample: writes <workdir>/samples/samples.npz and grid.png from the EMA weights.

  Returns:
    Dict with the sampler settings, the number of samples, NFE and seconds taken.
  """
  _, trainer, state = load_for_inference(config, workdir, config.input.train_split)
  sconfig = config.sampling
  num = sconfig.num_samples
  labels = (np.arange(num) % trainer.num_classes).astype(np.int32)  # balanced classes
  t0 = time.time()
  images, nfe, _ = trainer.sample_images(state['ema_params'], jax.random.PRNGKey(sconfig.seed),
                                         labels, sconfig.guidance_scale,
                                         batch_size=sconfig.batch_size)
  seconds = time.time() - t0
  out_dir = os.path.join(workdir, 'samples')
  if jax.process_index() == 0:
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    with (epath.Path(out_dir) / 'samples.npz').open('wb') as f:
      np.savez(f, images=images, labels=labels)
    order = np.argsort(labels, kind='stable')  # grid: one row per class
    per_class = min(num // trainer.num_classes, 10)
    if per_class:
      rows = np.stack([images[order][labels[order] == c][:per_class]
                       for c in range(trainer.num_classes)])
      grid = images_lib.make_grid(rows.reshape((-1,) + rows.shape[2:]),
                                  rows=trainer.num_classes, cols=per_class)
      images_lib.save_png(os.path.join(out_dir, 'grid.png'), grid, upscale=2)
  result = {
      'num_samples': num, 'nfe': nfe, 'seconds': round(seconds, 2),
      'method': sconfig.method, 'num_steps': sconfig.num_steps,
      'guidance_scale': sconfig.guidance_scale, 'sigma_schedule': sconfig.sigma_schedule,
      'sigma': sconfig.sigma, 'seed': sconfig.seed, 'step': int(state['step']),
      'output': os.path.join(out_dir, 'samples.npz'),
  }
  logging.info('Samples: %s', json.dumps(result))
  return result


def evaluate(config, workdir):
  """--mode=evaluate: held-out loss, and sample-quality metrics and sweeps (evaluate.py).

  With `config.eval.feature_network='none'` only the held-out loss of the raw and EMA weights.
  """
  dataset, trainer, state = load_for_inference(config, workdir, config.input.eval_split)
  num_batches = config.eval.num_batches
  result = {
      'step': int(state['step']),
      'split': config.input.eval_split,
      'num_batches': num_batches,
      'loss_ema': trainer.eval_loss(state['ema_params'], dataset, num_batches),
      'loss': trainer.eval_loss(state['params'], dataset, num_batches),
      'parameterization': config.loss.parameterization,
  }
  if config.eval.feature_network != 'none':
    train_set = input_pipeline.create_dataset(config.input, config.input.train_split)
    result.update(evaluate_lib.run(config, workdir, trainer, state, dataset, train_set))
  return result
