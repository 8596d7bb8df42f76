"""The train state of any task: optimizer and schedule, creation in shards, the train step.

The state is a dict pytree, so orbax saves and restores it sharded:
  step: int32 scalar, the number of updates applied.
  params: nnx.State of the model's parameters.
  opt_state: optax state (AdamW moments shard like their parameters).
  ema_params: nnx.State, only when `config.optim.ema_decay > 0`.
  nonfinite_step: int32 scalar, −1 or the first step whose loss or gradient was not finite
    (updates stop there, so the state stays the last good one).
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from guidedflow import checkpointing
from guidedflow import errors
from guidedflow import schema
from guidedflow import sharding
from guidedflow import time_budget
from guidedflow.models import factory

SCHEDULES = ('constant', 'cosine')


def learning_rate_schedule(optim, num_steps):
  """Linear warm-up (the first step already uses lr / warmup_steps), then constant or cosine
  decay to lr × final_lr_factor at `num_steps`."""
  peak = optim.learning_rate
  warmup = min(optim.warmup_steps, num_steps)
  if optim.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), optim.final_lr_factor)
  else:
    after = optax.constant_schedule(peak)
  if warmup < 1:
    return after
  ramp = optax.linear_schedule(peak / warmup, peak, max(warmup - 1, 1))
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(optim, num_steps):
  """AdamW on the schedule, after global-norm clipping when `optim.grad_clip_norm > 0`."""
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts)


def ema_decay(step, decay, warmup):
  """The EMA decay used by update `step`: min(decay, (1 + step) / (10 + step)) with warm-up."""
  decay = jnp.asarray(decay, jnp.float32)
  if warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def uses_ema(config):
  return config.optim.ema_decay > 0


class StateBuilder:
  """Builds, shards and steps the train state of one model on one mesh.

  Args:
    construct: zero-argument function returning the nnx model (it makes its own Rngs).
    config: the run's config (`optim`, `train.num_steps`, `mesh.min_shard_size`).
    mesh: the device mesh.
  """

  def __init__(self, construct, config, mesh):
    self.config = config
    self.mesh = mesh
    self._construct = construct
    self.set_num_steps(time_budget.schedule_steps(config))
    self.use_ema = uses_ema(config)
    self.graphdef, _, _ = nnx.split(nnx.eval_shape(construct), nnx.Param, ...)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.replicated = sharding.replicated(mesh)
    min_shard = config.mesh.min_shard_size
    abstract = jax.eval_shape(self._init_fn)
    # Optimizer statistics are Variables carrying their parameter's logical axis names, so
    # they (and the EMA) shard exactly like the parameters.
    self._abstract = abstract
    self.shardings = sharding.state_shardings(abstract, mesh, min_shard_size=min_shard)
    self.rest = None

  def set_num_steps(self, num_steps):
    """Builds the optimizer and schedule for `num_steps` (a time-budgeted run calls it again
    once it has chosen its count: the optimizer state's structure is the same for any count,
    and the train step must be made again)."""
    self.tx = make_optimizer(self.config.optim, num_steps)
    self.lr_schedule = learning_rate_schedule(self.config.optim, num_steps)

  def _init_fn(self):
    """(train state, the model's non-parameter state) from scratch."""
    _, params, rest = nnx.split(self._construct(), nnx.Param, ...)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': self.tx.init(params), 'nonfinite_step': jnp.full((), -1, jnp.int32)}
    if self.use_ema:
      state['ema_params'] = jax.tree.map(jnp.copy, params)
    return state, rest

  def init_state(self):
    """The initial train state, created directly in its shards under `jax.jit` (no device
    ever holds the whole model)."""
    with jax.set_mesh(self.mesh):
      state, self.rest = jax.jit(self._init_fn, out_shardings=self.shardings)()
    return state

  def abstract_state(self):
    """ShapeDtypeStructs with this mesh's shardings: a restore target, nothing allocated, so a
    checkpoint goes straight into its shards whatever mesh wrote it."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self._abstract[0], self.shardings[0])

  def init_rest(self):
    """The model's non-parameter state, for a restored train state."""
    if self.rest is None:
      with jax.set_mesh(self.mesh):
        self.rest = jax.jit(lambda: self._init_fn()[1], out_shardings=self.shardings[1])()
    return self.rest

  @property
  def param_shardings(self):
    return self.shardings[0]['params']

  @property
  def platform(self):
    """The mesh's platform: 'cpu', 'gpu', 'tpu' (a TPU's when compiling ahead of time)."""
    return self.mesh.devices.flat[0].platform

  def merge(self, params):
    """The model with `params` (inside a traced function: cheap)."""
    return nnx.merge(self.graphdef, params, self.init_rest() if self.rest is None else self.rest)

  def param_count(self, state):
    return sum(x.size for x in jax.tree.leaves(state['params']))

  def make_train_step(self, loss, compiler_options=None):
    """The jitted, donated update for `loss(model, batch, key) -> (loss, metrics)`.

    RNG fold_in(base_key, step); gradient global norm; AdamW; EMA; once a loss or gradient is
    not finite every later update is dropped and `nonfinite_step` records where.
    `compiler_options`: XLA options for the step (`Task.train_compiler_options`); where XLA
    refuses them, the first call compiles the step with XLA's defaults and logs why.
    """
    self.init_rest()
    ema = self.config.optim.ema_decay, self.config.optim.ema_warmup

    def step_fn(state, batch, base_key):
      step = state['step']
      key = jax.random.fold_in(base_key, step)
      (value, metrics), grads = jax.value_and_grad(
          lambda p: loss(self.merge(p), batch, key), has_aux=True)(state['params'])
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
      new = dict(state, step=step + 1, params=params, opt_state=opt_state)
      if self.use_ema:
        decay = ema_decay(step, *ema)
        new['ema_params'] = jax.tree.map(
            lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
            state['ema_params'], params)
      finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
      ok = finite & (state['nonfinite_step'] < 0)
      new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
      new['nonfinite_step'] = jnp.where((state['nonfinite_step'] < 0) & ~finite, step,
                                        state['nonfinite_step'])
      metrics = dict(metrics, loss=value, grad_norm=grad_norm,
                     learning_rate=self.lr_schedule(step))
      return new, metrics

    state_shardings = self.shardings[0]
    jit = functools.partial(
        jax.jit, step_fn, donate_argnums=(0,),
        in_shardings=(state_shardings, self.batch_sharding, self.replicated),
        out_shardings=(state_shardings, self.replicated))
    untried = compiler_options is not None

    def train_step(state, batch, base_key):
      nonlocal untried
      with jax.set_mesh(self.mesh):
        if not untried:
          return train_step.jitted(state, batch, base_key)
        try:
          return train_step.jitted(state, batch, base_key)
        except jax.errors.JaxRuntimeError as e:
          if any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array)):
            raise  # it ran (the state was donated): not a refused option
          logging.warning('The train step did not compile with the XLA options %s (%s): '
                          "compiling it with XLA's defaults.", compiler_options,
                          str(e).strip().splitlines()[0])
          train_step.jitted = jit()
          return train_step.jitted(state, batch, base_key)
        finally:
          untried = False

    # Also for lowering (benchmarks/memory.py) and AOT compiles.
    train_step.jitted = jit(compiler_options=compiler_options)
    return train_step

  def make_eval_step(self, metrics_fn):
    """Jitted (params, batch, key) → dict of per-batch means over the real (mask = 1) rows."""
    self.init_rest()
    jitted = jax.jit(lambda p, b, k: metrics_fn(self.merge(p), b, k),
                     in_shardings=(self.param_shardings, self.batch_sharding, self.replicated),
                     out_shardings=self.replicated)

    def eval_step(params, batch, key):
      with jax.set_mesh(self.mesh):
        return jitted(params, batch, key)

    return eval_step


# ----------------------------------------------------------------------------- mesh & checkpoints


def builder(config, image_shape, mesh=None, constructor=None):
  """The `StateBuilder` of `config`'s network for `image_shape`, on `mesh` (default:
  `config.mesh`); `constructor(image_shape)`: the task's `model_constructor` (default
  `factory.constructor`)."""
  constructor = constructor or (lambda shape: factory.constructor(config, shape))
  return StateBuilder(constructor(image_shape), config,
                      mesh if mesh is not None else make_mesh(config))


def make_mesh(config, devices=None):
  """The device mesh of `config.mesh` over `devices` (default: all; e.g. a TPU topology's for
  ahead-of-time compiles); ConfigError when it does not fit the devices or the batch does not
  split over its batch shards."""
  shape = tuple(config.mesh.shape)
  try:
    mesh = sharding.make_mesh(shape, devices, dcn_shape=tuple(config.mesh.dcn_shape))
  except ValueError as e:
    where = (f'this job has {jax.device_count()} devices in {jax.process_count()} processes'
             if devices is None else f'the target has {len(devices)} devices')
    raise errors.ConfigError(f'{e} ({where}).') from e
  shards = sharding.batch_axes_size(mesh)
  batch = config.train.batch_size
  if batch % shards:
    raise errors.ConfigError(
        f'config.train.batch_size={batch} must be divisible by the {shards} batch shards of the '
        f'mesh {dict(mesh.shape)} (data × fsdp); use a multiple of {shards}.')
  return mesh


def open_checkpointer(config, workdir, *, handle_sigterm=True):
  return checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=config.checkpoint.max_to_keep,
      save_interval_steps=config.checkpoint.every_steps, handle_sigterm=handle_sigterm)


def restore_or_init(builder, ckpt, *, move_damaged=True, check_config=None):
  """(state, data-iterator state) of the newest checkpoint that restores, straight into the
  builder's shardings (whatever mesh wrote it); a fresh state and None without one.

  Damaged steps are skipped with the reason logged, and moved aside with `move_damaged`
  (training); `check_config(config, saved config, step, checkpoint directory)` may refuse a
  step's saved config (e.g. `resume_config.check`).

  Raises:
    ConfigError: the checkpoint is of another task (or `check_config` refused it).
    CheckpointMismatchError: the checkpoint holds another model; names the parameter.
    CheckpointNotFoundError: every checkpoint is damaged.
  """
  task = schema.task_of(builder.config)

  def check(step, saved):
    saved_task = schema.task_of(saved or {})
    if saved_task != task:
      raise errors.ConfigError(
          f'{ckpt.directory} holds a checkpoint of config.task={saved_task!r}, but this config '
          f'is for config.task={task!r}: use the config it was trained with, or another '
          '--workdir.')
    if check_config is not None:
      check_config(builder.config, saved, step, ckpt.directory)

  found = ckpt.restore_newest(builder.abstract_state(), move_damaged=move_damaged,
                              check_config=check)
  if found is None:
    return builder.init_state(), None
  step, state, data_state = found
  builder.init_rest()
  logging.info('Restored checkpoint at step %d from %s.', step, ckpt.directory)
  return state, data_state


def load_latest(builder, config, workdir, check_config=None):
  """The newest train state in `workdir` that restores, for inference (sampling, evaluation);
  damaged steps are skipped (reported, not moved: inference never changes a run's files).
  `check_config` as for `restore_or_init` (a config that reads the weights as another model is
  named before the restore trips over a parameter's shape).

  Raises:
    CheckpointNotFoundError: the workdir holds no checkpoint.
  """
  with open_checkpointer(config, workdir, handle_sigterm=False) as ckpt:
    if ckpt.latest_step() is None:
      raise errors.CheckpointNotFoundError(
          f'No checkpoint in {workdir}/checkpoints. Train first: python -m guidedflow.main '
          f'--config <config> --workdir {workdir}')
    return restore_or_init(builder, ckpt, move_damaged=False, check_config=check_config)[0]
