"""Guided conditional flow matching (CFM) and denoising score matching (DSM) losses."""

import jax
import jax.numpy as jnp

from guidedflow import paths as paths_lib

TIME_SAMPLERS = ('uniform', 'logit_normal')
DSM_WEIGHTINGS = ('none', 'noise')


def _is_concrete(value):
  return not isinstance(value, jax.core.Tracer)


def drop_labels(key, labels, label_dropout, null_label):
  """Replaces each label by `null_label` independently with probability `label_dropout`.

  Args:
    key: PRNG key.
    labels: (B,) int labels in [0, null_label).
    label_dropout: η in [0, 1]; η = 0 never drops, η = 1 always drops.
    null_label: the index of ∅ (= number of classes).

  Returns:
    (labels with drops, boolean mask of dropped entries), both (B,).
  """
  labels = jnp.asarray(labels)
  dropped = jax.random.uniform(key, labels.shape) < label_dropout
  return jnp.where(dropped, jnp.asarray(null_label, labels.dtype), labels), dropped


def sample_time(key, shape, time_sampler='uniform', time_sampler_kwargs=None):
  """Draws training times in [0, 1].

  Args:
    key: PRNG key.
    shape: output shape, usually (B,).
    time_sampler: 'uniform' (U[0, 1), the lecture's) or 'logit_normal' (SD3:
      t = sigmoid(mean + std n), n ~ N(0, 1)). SD3 puts noise at t = 1; we put it at t = 0, so a
      positive `mean` here favours the data end, where SD3's favours the noise end.
    time_sampler_kwargs: for 'logit_normal', optional `mean` (default 0) and `std` (default 1).

  Returns:
    float32 times of `shape`.
  """
  paths_lib.check_choice('time_sampler', time_sampler, TIME_SAMPLERS)
  kwargs = dict(time_sampler_kwargs or {})
  if time_sampler == 'uniform':
    if kwargs:
      raise ValueError(f'time_sampler_kwargs must be empty for time_sampler=uniform, got {kwargs}.')
    return jax.random.uniform(key, shape, jnp.float32)
  unknown = set(kwargs) - {'mean', 'std'}
  if unknown:
    raise ValueError(f'time_sampler_kwargs for logit_normal accepts (mean, std), got {sorted(unknown)}.')
  mean, std = kwargs.get('mean', 0.0), kwargs.get('std', 1.0)
  if _is_concrete(std) and not float(std) > 0:
    raise ValueError(f'time_sampler_kwargs std must be > 0, got {std}.')
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))


def _validate(label_dropout, t_eps):
  if _is_concrete(label_dropout) and not 0.0 <= float(label_dropout) <= 1.0:
    raise ValueError(f'label_dropout must be in [0, 1], got {label_dropout}.')
  if not 0.0 <= float(t_eps) < 0.5:
    raise ValueError(f't_eps must be in [0, 0.5), got {t_eps}.')


def _mean(squared_error, batch):
  """Mean over elements; with `batch['mask']` (1 = real, 0 = padding) padded samples get 0 weight."""
  if 'mask' not in batch:
    return jnp.mean(squared_error)
  mask = jnp.asarray(batch['mask'], jnp.float32)
  per_sample = jnp.mean(squared_error.reshape(squared_error.shape[0], -1), axis=1)
  return jnp.sum(per_sample * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _draw(batch, key, *, path, null_label, label_dropout, time_sampler, time_sampler_kwargs,
          t_eps):
  """Shared draws: (z, y ← ∅ w.p. η, t, eps, x_t); t is clipped to [0, 1 − t_eps]."""
  z = jnp.asarray(batch['image'])
  if not jnp.issubdtype(z.dtype, jnp.floating):
    raise ValueError(f"batch['image'] must be a float array, got dtype {z.dtype}.")
  key_drop, key_time, key_noise = jax.random.split(key, 3)
  if 'text' in batch:  # a text condition (models/text_conditioning.py): caption dropout sets
    # its 'null' flags, and the model puts the null condition there
    condition = batch['text']
    dropped = jax.random.uniform(key_drop, (z.shape[0],)) < label_dropout
    labels = dict(condition, null=jnp.maximum(jnp.asarray(condition['null'], jnp.int32),
                                              dropped.astype(jnp.int32)))
  else:
    labels, dropped = drop_labels(key_drop, batch['label'], label_dropout, null_label)
  t = sample_time(key_time, (z.shape[0],), time_sampler, time_sampler_kwargs)
  # t = 1 (beta = 0) is where DSM targets (−eps/beta) and the vp velocity target (beta_dot) blow
  # up; the t = 0 end is finite for every target, so only the data end is clipped.
  t = jnp.clip(t, 0.0, 1.0 - t_eps).astype(z.dtype)
  eps = jax.random.normal(key_noise, z.shape, z.dtype)
  x = path.sample_xt(z, eps, t)
  metrics = {'t_mean': jnp.mean(t), 'label_dropped_fraction': jnp.mean(dropped.astype(jnp.float32))}
  return z, labels, t, eps, x, metrics


def cfm_loss(model_fn, batch, key, *, path, null_label, label_dropout=0.1,
             time_sampler='uniform', time_sampler_kwargs=None, t_eps=1e-3):
  """Guided CFM: mean ‖u_θ(x_t, t, y) − u_t(x_t|z)‖² with y ← ∅ with probability η.

  The loss is the mean over all elements (batch and pixels), so its scale does not depend on the
  image size. The target uses the safe form alpha_dot z + beta_dot eps.

  Args:
    model_fn: (x, t, y) -> velocity, shape of x; t has shape (B,).
    batch: {'image': float (B, ...), 'label': int (B,)} — or, for a text model, 'text': its
      condition (a dict with 'null' flags, `models/text_conditioning.py`) in place of 'label' —
      optionally 'mask' (B,) float, 1 = real example, 0 = padding (padded examples do not count
      in the mean).
    key: PRNG key.
    path: GaussianPath or schedule name.
    null_label: index of ∅.
    label_dropout: η, probability of replacing a label by ∅.
    time_sampler: 'uniform' | 'logit_normal'.
    time_sampler_kwargs: see `sample_time`.
    t_eps: times are clipped to [0, 1 − t_eps].

  Returns:
    (loss scalar, metrics dict with 'loss', 't_mean', 'label_dropped_fraction').
  """
  path = paths_lib.get_path(path)
  _validate(label_dropout, t_eps)
  z, labels, t, eps, x, metrics = _draw(
      batch, key, path=path, null_label=null_label, label_dropout=label_dropout,
      time_sampler=time_sampler, time_sampler_kwargs=time_sampler_kwargs, t_eps=t_eps)
  target = path.conditional_velocity_from_noise(z, eps, t)
  prediction = model_fn(x, t, labels)
  loss = _mean(jnp.square(prediction - target), batch)
  return loss, dict(metrics, loss=loss)


def dsm_loss(model_fn, batch, key, *, path, null_label, parameterization='noise',
             label_dropout=0.1, time_sampler='uniform', time_sampler_kwargs=None,
             dsm_weighting='noise', t_eps=1e-3):
  """Guided DSM: regress ∇log p_t(x|z) = −eps/beta with y ← ∅ with probability η.

  `dsm_weighting='none'` is the raw ‖s_θ − s‖² (weight 1; it scales like 1/beta² near t = 1);
  `'noise'` multiplies it by beta², i.e. ‖eps_θ − eps‖² with eps_θ = −beta s_θ. Both are means
  over all elements.

  Args:
    model_fn: (x, t, y) -> score or noise prediction (per `parameterization`), shape of x.
    batch: {'image': float (B, ...), 'label': int (B,)}, optionally 'mask' as in `cfm_loss`.
    key: PRNG key.
    path: GaussianPath or schedule name.
    null_label: index of ∅.
    parameterization: 'score' or 'noise' (what model_fn predicts).
    label_dropout: η.
    time_sampler: 'uniform' | 'logit_normal'.
    time_sampler_kwargs: see `sample_time`.
    dsm_weighting: 'none' | 'noise'.
    t_eps: times are clipped to [0, 1 − t_eps] (beta ≥ t_eps-ish, so 1/beta stays finite).

  Returns:
    (loss scalar, metrics dict with 'loss', 't_mean', 'label_dropped_fraction').
  """
  path = paths_lib.get_path(path)
  paths_lib.check_choice('parameterization', parameterization, ('score', 'noise'))
  paths_lib.check_choice('dsm_weighting', dsm_weighting, DSM_WEIGHTINGS)
  _validate(label_dropout, t_eps)
  _, labels, t, eps, x, metrics = _draw(
      batch, key, path=path, null_label=null_label, label_dropout=label_dropout,
      time_sampler=time_sampler, time_sampler_kwargs=time_sampler_kwargs, t_eps=t_eps)
  prediction = model_fn(x, t, labels)
  if dsm_weighting == 'noise':
    noise = (prediction if parameterization == 'noise'
             else path.noise_from_score(prediction, t))
    residual = noise - eps
  else:
    score = (prediction if parameterization == 'score'
             else path.score_from_noise(prediction, t))
    residual = score - path.conditional_score_from_noise(eps, t)
  loss = _mean(jnp.square(residual), batch)
  return loss, dict(metrics, loss=loss)


def loss_fn(model_fn, batch, key, *, path, parameterization, null_label, label_dropout=0.1,
            time_sampler='uniform', time_sampler_kwargs=None, dsm_weighting='noise',
            t_eps=1e-3):
  """Training loss for a model predicting `parameterization`: velocity → CFM, score/noise → DSM.

  See `cfm_loss` and `dsm_loss`; `dsm_weighting` is ignored for velocity.
  Returns (loss, metrics).
  """
  paths_lib.check_choice('parameterization', parameterization, paths_lib.PARAMETERIZATIONS)
  paths_lib.check_choice('dsm_weighting', dsm_weighting, DSM_WEIGHTINGS)
  common = dict(path=path, null_label=null_label, label_dropout=label_dropout,
                time_sampler=time_sampler, time_sampler_kwargs=time_sampler_kwargs, t_eps=t_eps)
  if parameterization == 'velocity':
    return cfm_loss(model_fn, batch, key, **common)
  return dsm_loss(model_fn, batch, key, parameterization=parameterization,
                  dsm_weighting=dsm_weighting, **common)
