"""The generator task's config checks (`GeneratorTask.validate`): its model, path, loss,
sampling, evaluation and latent sections; ConfigError names the key and its fix.

Allowed values come from the library's own constants (`paths.SCHEDULES`, `sampling.METHODS`,
...), so a new choice there is accepted here without a copied table. What the model needs of
the image size is checked once, by the model's own constructor (`models.factory`).
"""

import math

from absl import logging
import jaxlib

from guidedflow import errors
from guidedflow import feature_networks
from guidedflow import guidance
from guidedflow import latent_cache
from guidedflow import latents
from guidedflow import losses
from guidedflow import models
from guidedflow import paths
from guidedflow import sampling
from guidedflow import text_cache
from guidedflow import text_encoders
from guidedflow import validation
from guidedflow.models import dit
from guidedflow.models import precision
from guidedflow.models import text_transformer
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
    'sampling.guidance_method': guidance.GUIDANCE_METHODS,
    'sampling.gather_weights': (True, False),
    'sampling.cpu_dots': precision.CPU_DOTS,
    'train.cpu_dots': precision.TRAIN_CPU_DOTS,
    'text.encoder': text_encoders.ENCODERS,
    'text.cache_dtype': text_cache.DTYPES,
    'text.null': ('learned', 'empty'),
    'text.tokenizer_kind': tuple(text_transformer.TOKENIZER_KINDS),
}
# The documented range of w and w_c (docs/evaluation.md): beyond it samples saturate (w = 1e9
# gives all-black and all-white images); outside it is allowed, with a warning.
GUIDANCE_RANGE = (0.0, 10.0)
# CFG++'s λ (sampling.guidance_method='cfg_pp' reads the guidance scales as λ): its documented
# range (docs/guidance_methods.md); λ = 1 with 19 steps is CFG at w ≈ 5 in mid-trajectory.
CFG_PP_RANGE = (0.0, 1.0)
_GENERATOR_POSITIVE = (
    'sampling.num_steps', 'sampling.num_samples', 'sampling.batch_size',
    'sampling.grid_samples_per_class', 'eval.samples_per_class', 'eval.num_real_images',
    'eval.nearest_k', 'eval.grid_rows_per_class', 'text.batch_size')


def validate(config):
  """Checks the generator's own sections (the common ones: `validation.check_common`)."""
  validation.choices(config, _GENERATOR_CHOICES)
  validation.integers(config, _GENERATOR_POSITIVE)
  validation.integers(config, ('train.sample_every_steps',), minimum=0)
  validation.counts(config, ('eval.num_examples', 'eval.num_batches'))
  if not 0.0 <= config.loss.label_dropout <= 1.0:
    raise errors.ConfigError(
        f'config.loss.label_dropout={config.loss.label_dropout} must be in [0, 1] (it is the '
        'probability η of training on the null label; 1 trains an unconditional generator).')
  if not math.isfinite(config.sampling.guidance_scale):
    raise errors.ConfigError('config.sampling.guidance_scale must be a finite number.')
  _check_classifier_guidance(config)
  _check_guidance_method(config)
  _warn_outside_range(config)
  _check_text(config)
  for key in ('train.cpu_dots', 'sampling.cpu_dots'):
    if validation.value(config, key) == 'onednn' and precision.jaxlib_version_tuple() < precision.ONEDNN_SINCE:
      raise errors.ConfigError(
          f"config.{key}='onednn' needs jaxlib >= 0.12 (this is jaxlib {jaxlib.__version__}, "
          "whose oneDNN fusions abort some programs): use 'auto' or 'ynnpack', or jax 0.12 on "
          'Python >= 3.12.')
  validation.number(config, 'sampling.sigma', at_least=0)
  validation.number(config, 'sampling.max_output_gib', above=0, example='8')
  validation.number(config, 'loss.t_eps', at_least=0)
  if not config.loss.t_eps < 0.5:
    raise errors.ConfigError(f'config.loss.t_eps={config.loss.t_eps} must be < 0.5 (the '
                             'distance kept from the ends of [0, 1]), e.g. 1e-3.')
  if config.loss.time_sampler == 'logit_normal':
    validation.number(config, 'loss.logit_normal_std', above=0)
  _check_grid(config)
  interval = config.sampling.guidance_interval
  if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1):
    raise errors.ConfigError(f'config.sampling.guidance_interval={interval!r} must be None or '
                             '(t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1.')
  _check_model(config)
  _check_eval(config)
  _check_latents(config)


def _check_grid(config):
  """The keys of the sample grids, which a run reads only at its first grid or its end: checked
  before the first step, so a typo costs no training."""
  scales = config.sampling.grid_guidance_scales
  if not scales or any(isinstance(w, bool) or not isinstance(w, (int, float))
                       or not math.isfinite(w) for w in scales):
    raise errors.ConfigError(f'config.sampling.grid_guidance_scales={scales!r} must be one or '
                             'more finite numbers, e.g. --config.sampling.grid_guidance_scales=1,2,4')
  classes, num_classes = config.sampling.grid_classes, config.input.num_classes
  if classes is not None and (
      not classes or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes
                         for c in classes)):
    raise errors.ConfigError(
        f'config.sampling.grid_classes={classes!r} must be None (every class) or class ids in '
        f'[0, {num_classes - 1}], e.g. --config.sampling.grid_classes=0,3,8')


def _check_text(config):
  text = config.text
  if text.max_length is not None and (not isinstance(text.max_length, int)
                                      or text.max_length < 3):
    raise errors.ConfigError(f'config.text.max_length={text.max_length!r} must be None (the '
                             "encoder's own) or an integer >= 3 (tokens, the special ones "
                             'included).')
  prompts = [k for k in ('prompts', 'prompts_file', 'negative_prompt')
             if config.sampling[k] is not None]
  if text.encoder == 'none' and prompts:
    raise errors.ConfigError(f'config.sampling.{prompts[0]} is for a text model: this generator '
                             'is conditioned on class labels (config.text.encoder=none); sample '
                             'it by class, or set --config.text.encoder for a text model.')
  if text.encoder != 'none' and config.sampling.guidance != 'cfg':
    raise errors.ConfigError(f"config.sampling.guidance='{config.sampling.guidance}' needs class "
                             'labels: a text model is guided by CFG alone (sampling.guidance=cfg).')
  if text.encoder in text_encoders.FROZEN and not text.weights:
    raise errors.ConfigError(f"config.text.encoder='{text.encoder}' needs its weights: "
                             "--config.text.weights=DIR (the encoder's Hugging Face folder, "
                             'e.g. text_encoder/ of a Stable Diffusion repository).')


def _warn_outside_range(config):
  """Warns (once per run: checks run when a run's config is prepared) of every w and w_c
  outside `GUIDANCE_RANGE`, and of every λ outside `CFG_PP_RANGE` where
  `sampling.guidance_method` is 'cfg_pp'; values of the wrong type are left to their checks."""
  cfg_pp = config.sampling.guidance_method == 'cfg_pp'
  for key in ('sampling.guidance_scale', 'sampling.grid_guidance_scales',
              'eval.guidance_scales', 'sampling.classifier_scale', 'eval.classifier_scales'):
    is_lambda = cfg_pp and 'classifier' not in key
    low, high = CFG_PP_RANGE if is_lambda else GUIDANCE_RANGE
    values = validation.value(config, key)
    values = values if isinstance(values, (tuple, list)) else (values,)
    outside = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)
               and not low <= v <= high]
    if not outside:
      continue
    shown = ','.join(f'{v:g}' for v in outside)
    if is_lambda:
      logging.warning("config.%s=%s is CFG++'s λ (sampling.guidance_method=cfg_pp), outside its "
                      'documented range [%g, %g]: samples saturate beyond it; for CFG\'s w set '
                      '--config.sampling.guidance_method=cfg (docs/guidance_methods.md).', key,
                      shown, low, high)
    else:
      logging.warning('config.%s=%s is outside the documented range [%g, %g] of guidance '
                      'scales: samples saturate beyond it (w = 1 samples the conditional '
                      'model, 0 the unconditional one; docs/evaluation.md).', key, shown, low,
                      high)


def _check_classifier_guidance(config):
  guidance = config.sampling.guidance
  scale = config.sampling.classifier_scale
  if not isinstance(scale, (int, float)) or not math.isfinite(scale):
    raise errors.ConfigError(f'config.sampling.classifier_scale={scale!r} must be a finite '
                             'number (w_c of classifier guidance).')
  for w_c in config.eval.classifier_scales or ():
    if not isinstance(w_c, (int, float)) or not math.isfinite(w_c):
      raise errors.ConfigError(f'config.eval.classifier_scales='
                               f'{config.eval.classifier_scales!r} must be numbers, e.g. '
                               '--config.eval.classifier_scales=0,1,2,4')
  if guidance != 'cfg' and not config.sampling.classifier_workdir:
    raise errors.ConfigError(
        f"config.sampling.guidance={guidance!r} needs the noise-aware classifier's run: "
        '--config.sampling.classifier_workdir=DIR (trained with python -m guidedflow.main '
        '--config configs/fmnist_noisy_classifier.py --workdir DIR).')
  if guidance == 'cfg+classifier' and config.loss.label_dropout >= 1.0:
    raise errors.ConfigError(
        "config.sampling.guidance='cfg+classifier' needs a conditional generator, but "
        'config.loss.label_dropout=1 trained an unconditional one (it has no CFG): use '
        "--config.sampling.guidance=classifier.")


def _check_guidance_method(config):
  """The knobs of `sampling.guidance_method` (`guidance.GuidanceMethod`'s own checks)."""
  try:
    method = guidance.GuidanceMethod.from_config(config.sampling)
  except ValueError as e:
    raise errors.ConfigError('config.sampling.' + str(e).replace(
        ', e.g. ', ', e.g. --config.sampling.')) from None
  if method.name != 'cfg' and config.sampling.guidance == 'classifier':
    raise errors.ConfigError(
        f"config.sampling.guidance_method='{method.name}' changes how CFG combines u(x|y) and "
        "u(x|∅), but sampling.guidance='classifier' runs no CFG: use guidance_method=cfg, or "
        'sampling.guidance=cfg or cfg+classifier.')
  _check_step_methods(config, method)
  steps = [('sampling.num_steps', config.sampling.num_steps)] + [
      ('eval.num_steps', n) for n in config.eval.num_steps or () if isinstance(n, int)]
  for key, num_steps in steps:
    if method.zero_init_steps >= num_steps:
      raise errors.ConfigError(
          f'config.sampling.zero_star_init_steps={method.zero_init_steps} must be less than '
          f'{key}={num_steps} (zero-init steps leave the noise as it is), e.g. '
          '--config.sampling.zero_star_init_steps=1')


def _check_step_methods(config, method):
  """CFG++'s samplers and autoguidance's weak model."""
  if method.guides_a_step:
    for key, names in (('sampling.method', (config.sampling.method,)),
                       ('eval.methods', config.eval.methods or ())):
      for name in names:
        if name not in sampling.CFG_PP_METHODS:
          raise errors.ConfigError(
              f"config.sampling.guidance_method='cfg_pp' runs with the samplers "
              f'{sampling.CFG_PP_METHODS} (its step re-noises with u(x|∅)), but config.{key} has '
              f"{name!r}: e.g. --config.{key}=dpmpp_2m, or guide with CFG "
              "(--config.sampling.guidance_method=cfg; configs/fashion_mnist.py:cfg).")
  step = config.sampling.autoguidance_step
  if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
    raise errors.ConfigError(f'config.sampling.autoguidance_step={step!r} must be None or a '
                             'checkpoint step >= 0, e.g. --config.sampling.autoguidance_step=2000')
  if (method.uses_weak_model and step is None
      and not config.sampling.autoguidance_workdir):
    raise errors.ConfigError(
        "config.sampling.guidance_method='autoguidance' needs its weaker model: "
        '--config.sampling.autoguidance_step=STEP (an earlier checkpoint of this run) or '
        '--config.sampling.autoguidance_workdir=DIR (a shorter run of the same model).')


def _check_latents(config):
  if config.input.space != 'latents':
    return
  workdir, weights = config.autoencoder.workdir, config.autoencoder.weights
  if bool(workdir) == bool(weights):
    raise errors.ConfigError(
        "config.input.space='latents' needs exactly one autoencoder: "
        '--config.autoencoder.workdir=DIR (a finished run of configs/fmnist_autoencoder.py) or '
        '--config.autoencoder.weights=FILE (a Stable Diffusion VAE file).')
  validation.choices(config, {'autoencoder.cache_dtype': latent_cache.DTYPES})
  validation.integers(config, ('autoencoder.batch_size',))
  if config.autoencoder.workers < 0:
    raise errors.ConfigError('config.autoencoder.workers must be >= 0 (0: decode in this '
                             'process).')


def _check_model(config):
  model = config.model
  remat = config.model.remat
  if remat not in (True, False) and remat not in dit.REMAT_POLICIES:
    raise errors.ConfigError(f'config.model.remat={remat!r} is not one of {dit.REMAT_POLICIES} '
                             '(True / False are accepted as full / none).')
  try:
    dit.check_unroll_blocks(config.model.unroll_blocks)
  except ValueError as e:
    raise errors.ConfigError(f'config.model.{e}') from None
  if config.model.attention_impl == 'cudnn' and model.dtype != 'bfloat16':
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
