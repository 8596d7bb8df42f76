"""Config checks, in one place, before anything is built: ConfigError names the key and fix.

Allowed values come from the library's own constants (`paths.SCHEDULES`, `losses.TIME_SAMPLERS`,
`sampling.METHODS`, ...), so a new choice there is accepted here without a copied table. What
the model needs of the image size is checked once, by the model's own constructor
(`models.factory`), not here.
"""

import math

import jax
import jaxlib

from guidedflow import config_defaults
from guidedflow import errors
from guidedflow import feature_networks
from guidedflow import latent_cache
from guidedflow import latents
from guidedflow import losses
from guidedflow import models
from guidedflow import paths
from guidedflow import sampling
from guidedflow import sharding
from guidedflow import time_budget
from guidedflow import train_state
from guidedflow.models import autoencoder
from guidedflow.models import classifier
from guidedflow.models import dit
from guidedflow.models import precision
from guidedflow.models import unet

_GENERATOR_CHOICES = {
    'model.name': tuple(models.MODELS),
    'model.unet_norm': unet.NORMS,
    'model.dtype': tuple(models.DTYPES),
    'model.param_dtype': tuple(models.DTYPES),
    'model.attention_impl': dit.ATTENTION_IMPLS,
    'path.schedule': paths.SCHEDULES,
    'loss.parameterization': paths.PARAMETERIZATIONS,
    'loss.time_sampler': losses.TIME_SAMPLERS,
    'loss.dsm_weighting': losses.DSM_WEIGHTINGS,
    'sampling.method': sampling.METHODS,
    'sampling.sigma_schedule': sampling.SIGMA_SCHEDULES,
    'eval.feature_network': ('none',) + feature_networks.NAMES,
    'input.space': latents.SPACES,
    'sampling.npz_keys': ('guidedflow', 'adm'),
    'sampling.guidance': sampling.GUIDANCE_MODES,
    'sampling.gather_weights': (True, False),
    'sampling.cpu_dots': precision.CPU_DOTS,
    'train.cpu_dots': precision.TRAIN_CPU_DOTS,
}
_COMMON_CHOICES = {'optim.schedule': train_state.SCHEDULES,
                   'mesh.distributed': sharding.DISTRIBUTED_MODES}
_GENERATOR_POSITIVE = (
    'sampling.num_steps', 'sampling.num_samples', 'sampling.batch_size',
    'sampling.grid_samples_per_class', 'eval.samples_per_class', 'eval.num_real_images',
    'eval.nearest_k', 'eval.grid_rows_per_class')
_COMMON_POSITIVE = ('train.num_steps', 'train.batch_size', 'train.log_every_steps',
                    'checkpoint.every_steps', 'checkpoint.max_to_keep', 'input.num_classes')
# Periodic work every N steps during training, 0 = none (a negative N would run it every |N|).
_COMMON_EVERY = ('train.sample_every_steps', 'eval.every_steps')
def _choices(config, table):
  for key, allowed in table.items():
    value = config_defaults.get(config, key)
    if value not in allowed:
      raise errors.ConfigError(f'config.{key}={value!r} is not one of {tuple(allowed)}.')


def _integers(config, keys, minimum=1):
  """config.<key> must be an int >= `minimum`; with minimum 0 (periodic work every N steps, 0 =
  none) a key the task's config lacks is not checked."""
  for key in keys:
    value = config_defaults.get(config, key)
    if value is None and minimum == 0:
      continue
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise errors.ConfigError(
          f'config.{key}={value!r} must be a positive integer.' if minimum else
          f'config.{key}={value!r} must be a step count >= 0 (0: none during training), e.g. '
          f'--config.{key}=1000.')


def validate_config(config):
  """Checks `config` for its task (`config.task`); raises ConfigError naming key and fix."""
  _choices(config, _COMMON_CHOICES)
  _check_time_budget(config)
  _integers(config, tuple(k for k in _COMMON_POSITIVE
                          if not (k == 'train.num_steps' and time_budget.is_active(config))))
  _integers(config, _COMMON_EVERY, minimum=0)
  _check_optim(config)
  _check_mesh(config)
  batch, processes = config.train.batch_size, jax.process_count()
  if batch % processes:
    raise errors.ConfigError(f'config.train.batch_size={batch} must be divisible by the number '
                             f'of processes ({processes}).')
  task = config.get('task', 'generate')
  checks = {'generate': _check_generator, 'classifier': _check_classifier,
            'autoencoder': _check_autoencoder, 'noisy_classifier': _check_noisy_classifier}
  if task not in checks:
    raise errors.ConfigError(f'config.task={task!r} is not one of {tuple(checks)}.')
  checks[task](config)


def _check_time_budget(config):
  """`train.time_budget_minutes`: a number >= 0; with a budget choosing the step count, a
  warm-up long enough to measure the step rate in (time_budget.py)."""
  _check_number(config, 'train.time_budget_minutes', at_least=0, example='25')
  if config.train.num_steps is None and not time_budget.minutes(config):
    raise errors.ConfigError('config.train.num_steps is not set: give it (e.g. '
                             '--config.train.num_steps=6000) or a time budget (e.g. '
                             '--config.train.time_budget_minutes=25).')
  if not time_budget.is_active(config):
    return
  warmup = config_defaults.get(config, 'optim.warmup_steps')
  constant = config_defaults.get(config, 'optim.schedule') == 'constant' and warmup == 0
  if not constant and warmup < time_budget.MIN_WARMUP:
    raise errors.ConfigError(
        f'config.train.time_budget_minutes needs config.optim.warmup_steps >= '
        f'{time_budget.MIN_WARMUP} (got {warmup}): the step rate is measured in the warm-up, '
        'whose learning rate does not depend on the step count; raise the warm-up or set '
        '--config.train.num_steps.')


def _check_number(config, key, *, above=None, at_least=None, example=''):
  """config.<key> must be a finite number > `above` (or >= `at_least`): a bare comparison
  refuses nan but lets inf through, which then fails only once training runs."""
  value = config_defaults.get(config, key)
  bound = f'> {above}' if above is not None else f'>= {at_least}'
  if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
      or (above is not None and not value > above)
      or (at_least is not None and not value >= at_least)):
    raise errors.ConfigError(f'config.{key}={value!r} must be a finite number {bound}'
                             + (f', e.g. --config.{key}={example}.' if example else '.'))


def _check_optim(config):
  optim = config.optim
  _check_number(config, 'optim.learning_rate', above=0, example='3e-4')
  for key in ('optim.weight_decay', 'optim.grad_clip_norm', 'optim.b1', 'optim.b2'):
    _check_number(config, key, at_least=0)
  for key in ('optim.b1', 'optim.b2'):
    if not config_defaults.get(config, key) < 1:
      raise errors.ConfigError(f'config.{key}={config_defaults.get(config, key)!r} must be in [0, 1), e.g. '
                               f'--config.{key}={0.9 if key.endswith("b1") else 0.999}.')
  if config_defaults.get(config, 'optim.schedule') == 'cosine':
    _check_number(config, 'optim.final_lr_factor', at_least=0)
  if not 0.0 <= optim.get('ema_decay', 0.0) < 1.0:
    raise errors.ConfigError(f'config.optim.ema_decay={optim.ema_decay} must be in [0, 1) '
                             '(0: no EMA).')
  if not isinstance(optim.warmup_steps, int) or optim.warmup_steps < 0:
    raise errors.ConfigError(f'config.optim.warmup_steps={optim.warmup_steps!r} must be an '
                             'integer >= 0.')


def _check_mesh(config):
  mesh = config.get('mesh') or {}
  for key in ('shape', 'dcn_shape'):
    shape = tuple(mesh.get(key, (1, 1, 1)))
    if len(shape) != 3 or any(not isinstance(s, int) or s == 0 or s < -1 for s in shape):
      raise errors.ConfigError(
          f'config.mesh.{key}={shape!r} must be three sizes (data, fsdp, tensor), each positive '
          'or -1 (all remaining devices), e.g. --config.mesh.shape=-1,8,1')
  min_shard = mesh.get('min_shard_size', 0)
  if not isinstance(min_shard, int) or min_shard < 0:
    raise errors.ConfigError(f'config.mesh.min_shard_size={min_shard!r} must be an integer >= 0.')


def _check_classifier(config):
  _integers(config, ('eval.batch_size', 'model.feature_dim'))
  for key in ('input.num_train_examples', 'eval.num_examples'):
    value = config_defaults.get(config, key)
    if not isinstance(value, int) or value < 0:
      raise errors.ConfigError(f'config.{key}={value!r} must be an integer >= 0 (0: all).')
  if not config.model.channels or any(int(c) < 1 for c in config.model.channels):
    raise errors.ConfigError(f'config.model.channels={config.model.channels!r} must be a '
                             'non-empty tuple of positive conv widths, e.g. (32, 64, 128).')
  _choices(config, {'model.dtype': tuple(models.DTYPES), 'model.arch': classifier.ARCHS})


def _check_noisy_classifier(config):
  _integers(config, ('eval.batch_size', 'eval.time_bins', 'model.num_residual_layers',
                     'model.t_embed_dim'))
  _choices(config, {'model.dtype': tuple(models.DTYPES), 'model.norm': unet.NORMS,
                    'path.schedule': paths.SCHEDULES, 'loss.time_sampler': losses.TIME_SAMPLERS})
  for key in ('input.num_train_examples', 'eval.num_examples', 'train.random_shift_pixels'):
    value = config_defaults.get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise errors.ConfigError(f'config.{key}={value!r} must be an integer >= 0.')
  if not config.model.channels or any(int(c) < 1 for c in config.model.channels):
    raise errors.ConfigError(f'config.model.channels={config.model.channels!r} must be a '
                             'non-empty tuple of positive widths, e.g. (32, 64, 128).')
  if config.loss.time_sampler == 'logit_normal':
    _check_number(config, 'loss.logit_normal_std', above=0)


def _check_autoencoder(config):
  _integers(config, ('eval.batch_size', 'model.layers_per_block', 'model.latent_channels',
                     'model.norm_groups', 'eval.num_latent_examples',
                     'eval.num_quality_examples'))
  _choices(config, {'model.dtype': tuple(models.DTYPES),
                    'loss.reconstruction': autoencoder.RECONSTRUCTION_LOSSES,
                    'eval.feature_network': ('none',) + feature_networks.NAMES})
  if not config.model.channels or any(int(c) < 1 for c in config.model.channels):
    raise errors.ConfigError(f'config.model.channels={config.model.channels!r} must be a '
                             'non-empty tuple of positive widths, e.g. (32, 64, 64).')
  for key in ('loss.kl_weight', 'loss.feature_weight'):
    _check_number(config, key, at_least=0)


def _check_generator(config):
  _choices(config, _GENERATOR_CHOICES)
  _integers(config, _GENERATOR_POSITIVE)
  if not 0.0 <= config.loss.label_dropout <= 1.0:
    raise errors.ConfigError(
        f'config.loss.label_dropout={config.loss.label_dropout} must be in [0, 1] (it is the '
        'probability η of training on the null label; 1 trains an unconditional generator).')
  if not math.isfinite(config.sampling.guidance_scale):
    raise errors.ConfigError('config.sampling.guidance_scale must be a finite number.')
  _check_classifier_guidance(config)
  for key in ('train.cpu_dots', 'sampling.cpu_dots'):
    if config_defaults.get(config, key) == 'onednn' and precision.jaxlib_version_tuple() < precision.ONEDNN_SINCE:
      raise errors.ConfigError(
          f"config.{key}='onednn' needs jaxlib >= 0.12 (this is jaxlib {jaxlib.__version__}, "
          "whose oneDNN fusions abort some programs): use 'auto' or 'ynnpack', or jax 0.12 on "
          'Python >= 3.12.')
  _check_number(config, 'sampling.sigma', at_least=0)
  _check_number(config, 'loss.t_eps', at_least=0)
  if not config.loss.t_eps < 0.5:
    raise errors.ConfigError(f'config.loss.t_eps={config.loss.t_eps} must be < 0.5 (the '
                             'distance kept from the ends of [0, 1]), e.g. 1e-3.')
  if config.loss.time_sampler == 'logit_normal':
    _check_number(config, 'loss.logit_normal_std', above=0)
  if not config.sampling.grid_guidance_scales:
    raise errors.ConfigError('config.sampling.grid_guidance_scales must name at least one scale.')
  interval = config.sampling.guidance_interval
  if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
    raise errors.ConfigError(f'config.sampling.guidance_interval={interval!r} must be None or '
                             '(t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1.')
  _check_model(config)
  _check_eval(config)
  _check_latents(config)


def _check_classifier_guidance(config):
  guidance = config_defaults.get(config, 'sampling.guidance')
  scale = config_defaults.get(config, 'sampling.classifier_scale')
  if not isinstance(scale, (int, float)) or not math.isfinite(scale):
    raise errors.ConfigError(f'config.sampling.classifier_scale={scale!r} must be a finite '
                             'number (w_c of classifier guidance).')
  for w_c in config_defaults.get(config, 'eval.classifier_scales') or ():
    if not isinstance(w_c, (int, float)) or not math.isfinite(w_c):
      raise errors.ConfigError(f'config.eval.classifier_scales='
                               f'{config_defaults.get(config, "eval.classifier_scales")!r} must be numbers, e.g. '
                               '--config.eval.classifier_scales=0,1,2,4')
  if guidance != 'cfg' and not config_defaults.get(config, 'sampling.classifier_workdir'):
    raise errors.ConfigError(
        f"config.sampling.guidance={guidance!r} needs the noise-aware classifier's run: "
        '--config.sampling.classifier_workdir=DIR (trained with python -m guidedflow.main '
        '--config configs/fmnist_noisy_classifier.py --workdir DIR).')
  if guidance == 'cfg+classifier' and config.loss.label_dropout >= 1.0:
    raise errors.ConfigError(
        "config.sampling.guidance='cfg+classifier' needs a conditional generator, but "
        'config.loss.label_dropout=1 trained an unconditional one (it has no CFG): use '
        "--config.sampling.guidance=classifier.")


def _check_latents(config):
  if config_defaults.get(config, 'input.space') != 'latents':
    return
  workdir, weights = config_defaults.get(config, 'autoencoder.workdir'), config_defaults.get(config, 'autoencoder.weights')
  if bool(workdir) == bool(weights):
    raise errors.ConfigError(
        "config.input.space='latents' needs exactly one autoencoder: "
        '--config.autoencoder.workdir=DIR (a finished run of configs/fmnist_autoencoder.py) or '
        '--config.autoencoder.weights=FILE (a Stable Diffusion VAE file).')
  _choices(config, {'autoencoder.cache_dtype': latent_cache.DTYPES})
  _integers(config, ('autoencoder.batch_size',))
  if config_defaults.get(config, 'autoencoder.workers') < 0:
    raise errors.ConfigError('config.autoencoder.workers must be >= 0 (0: decode in this '
                             'process).')


def _check_model(config):
  model = config.model
  remat = config_defaults.get(config, 'model.remat')
  if remat not in (True, False) and remat not in dit.REMAT_POLICIES:
    raise errors.ConfigError(f'config.model.remat={remat!r} is not one of {dit.REMAT_POLICIES} '
                             '(True / False are accepted as full / none).')
  try:
    dit.check_unroll_blocks(config_defaults.get(config, 'model.unroll_blocks'))
  except ValueError as e:
    raise errors.ConfigError(f'config.model.{e}') from None
  if config_defaults.get(config, 'model.attention_impl') == 'cudnn' and model.dtype != 'bfloat16':
    raise errors.ConfigError("config.model.attention_impl='cudnn' needs "
                             '--config.model.dtype=bfloat16 (and a GPU).')


def _check_eval(config):
  evaluation = config.eval
  for w in evaluation.guidance_scales or ():
    if not isinstance(w, (int, float)) or not math.isfinite(w):
      raise errors.ConfigError(f'config.eval.guidance_scales={evaluation.guidance_scales!r} '
                               'must be numbers, e.g. --config.eval.guidance_scales=1,1.5,2,3,4')
  for n in evaluation.num_steps or ():
    if not isinstance(n, int) or n < 1:
      raise errors.ConfigError(f'config.eval.num_steps={evaluation.num_steps!r} must be '
                               'positive integers, e.g. --config.eval.num_steps=5,10,20,50')
  for method in evaluation.methods or ():
    if method not in sampling.METHODS:
      raise errors.ConfigError(f'config.eval.methods={evaluation.methods!r}: {method!r} is not '
                               f'one of {sampling.METHODS}.')
  extra = feature_networks.extra_names(config) if 'eval' in config else ()
  for name in extra:
    if name not in feature_networks.NAMES:
      raise errors.ConfigError(
          f'config.eval.extra_feature_networks={tuple(extra)!r}: {name!r} is not one of '
          f'{feature_networks.NAMES}, e.g. --config.eval.extra_feature_networks='
          'fmnist_gap_classifier,fmnist_encoder')
