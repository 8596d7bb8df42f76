"""Inference of the generator: its model from the config, EMA weights, guided sampling, grids.

`Sampler.from_workdir(config, workdir)` restores the newest checkpoint's EMA weights;
`Sampler.from_train_state(...)` wraps the weights of a running training. `--mode=sample`,
evaluation, the periodic sample grids, the notebook and the benchmarks all sample through it.
The sampler costs exactly its NFE: w = 1 runs the conditional batch alone, and with a guidance
interval the doubled CFG batch runs only inside it (`sampling_plan.cfg_plan`). A call's plan —
its sampler, steps, interval and whether w and w_c need their extra evaluations — is decided and
checked once (`sampling_plan.make_plan`), and each plan is one compiled program whose body is
`sampling.integrate`.

Guidance (`config.sampling.guidance`): 'cfg' (classifier-free, scale w), 'classifier' (the
generator's unconditional field ∅ plus w_c b_t ∇log p_t(y|x) of the noise-aware classifier in
`sampling.classifier_workdir`) or 'cfg+classifier' (both, w and w_c separate). A Sampler built
without a classifier (the periodic grids of a training) samples with CFG alone. How CFG combines
its two predictions is `config.sampling.guidance_method` and its knobs
(`guidance.GuidanceMethod.from_config`; docs/guidance_methods.md). Autoguidance's weaker model
(`load_weak_model`) is a second parameter set, an argument of the same compiled program; a
Sampler built without one (the periodic grids of a training) samples with CFG instead.
"""

import dataclasses
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow import guidance
from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow import latents
from guidedflow import paths
from guidedflow import resume_config
from guidedflow import sampling
from guidedflow import sampling_plan
from guidedflow import sharding
from guidedflow import train_state
from guidedflow import trained
from guidedflow import tree_compat
from guidedflow.models import factory
from guidedflow.models import precision
from guidedflow.models import text_conditioning


class Sampler:
  """Samples from a generator's weights with the configured sampler.

  A latent generator (`latent_space` given) decodes inside the same compiled program: what
  `sample` returns is pixels either way.

  Attributes:
    params: the weights sampled from (the EMA weights of a train state).
    step: the training step of those weights.
    weak_params: autoguidance's weaker model (same architecture), or None.
    image_shape: what the generator generates (latents of a latent generator).
    output_shape: what `sample` returns (pixels).
    num_classes, config, latent_space.
  """

  def __init__(self, config, builder, params, *, image_shape, step=None, latent_space=None,
               classifier=None, weak_params=None):
    self.config = config
    self.classifier = classifier  # a `GuidanceClassifier` for classifier guidance, or None
    if classifier is not None:  # replicated on the generator's mesh, where the program runs
      classifier.params = jax.device_put(classifier.params, builder.replicated)
    self.guidance = config.sampling.guidance if classifier else 'cfg'
    self.classifier_nfe = 0  # classifier forward (= backward) passes per sample, last call
    self.builder = builder
    self.params = params
    self.step = step
    self.weak_params = weak_params
    if config.sampling.guidance_method == 'autoguidance' and weak_params is None:
      logging.info('Autoguidance needs its weaker model (Sampler.from_workdir loads it): this '
                   'Sampler guides with CFG.')
    self.image_shape = tuple(image_shape)
    self.latent_space = latent_space
    self.output_shape = self.image_shape
    if latent_space is not None:
      height, width, _ = self.image_shape
      f = latent_space.downsample_factor
      self.output_shape = (height * f, width * f, latent_space.in_channels)
    self.num_classes = config.input.num_classes
    self.null_label = config.input.num_classes
    # A generator trained with label_dropout = 1 has seen only ∅: it samples unconditionally.
    self.unconditional = config.loss.label_dropout >= 1.0
    self.path = paths.get_path(config.path.schedule)
    platform = builder.platform  # a TPU mesh's when compiling ahead of time
    # f32 dots in Eigen's GEMMs or oneDNN's fusions where they outrun YNNPACK (`sampling.cpu_dots`).
    self.compiler_options = precision.inference_compiler_options(
        config.sampling.cpu_dots, factory.compute_dtype(config, platform)[0],
        platform,
        convolutional=config.model.name == 'unet')
    self._compiled = {}

  @classmethod
  def from_train_state(cls, config, builder, state, image_shape, latent_space=None,
                       classifier=None, weak_params=None):
    return cls(config, builder, sampled_weights(state), image_shape=image_shape,
               step=int(state['step']), latent_space=latent_space, classifier=classifier,
               weak_params=weak_params)

  @classmethod
  def from_workdir(cls, config, workdir, latent_space=None, constructor=None):
    """The newest checkpoint's EMA weights (CheckpointNotFoundError without one); a latent
    generator's autoencoder is `latent_space` or, when None, the config's; the noise-aware
    classifier of `sampling.classifier_workdir` when `sampling.guidance` uses one; autoguidance's
    weaker model (`load_weak_model`); `constructor`: the task's `model_constructor` (`load`)."""
    if latent_space is None:
      latent_space = latents.load(config)
    builder, state, image_shape = load(config, workdir, latent_space, constructor)
    classifier = load_classifier(config, image_shape, latent_space)
    return cls.from_train_state(config, builder, state, image_shape, latent_space, classifier,
                                load_weak_model(config, builder, workdir, int(state['step'])))

  @property
  def guidance_method(self):
    """The `guidance.GuidanceMethod` of `config.sampling` (read at every call, so a changed
    config is the next call's plan); 'cfg' in autoguidance's place without `weak_params`."""
    method = guidance.GuidanceMethod.from_config(self.config.sampling)
    if method.uses_weak_model and self.weak_params is None:
      return dataclasses.replace(method, name='cfg')
    return method

  def update(self, state):
    """Samples from `state`'s weights from now on (same compiled programs)."""
    self.params, self.step = sampled_weights(state), int(state['step'])

  def _program(self, plan):
    """The compiled sampler of `plan` (one per plan; weights, keys, labels and scales traced)."""
    if plan not in self._compiled:
      gathered = (sharding.without_axis(self.builder.param_shardings, 'fsdp')
                  if self.config.sampling.gather_weights else None)

      def run(params, decoder_params, classifier_params, key, labels, classifier_labels,
              guidance_scale, classifier_scale, sigma, null_labels, weak_params):
        if gathered is not None:  # once per call, not once per model evaluation (FSDP)
          params = jax.lax.with_sharding_constraint(params, gathered)
          if weak_params is not None:
            weak_params = jax.lax.with_sharding_constraint(weak_params, gathered)
        model = self.builder.merge(params)
        weak_fn = None
        if weak_params is not None:  # a text condition encoded by the weak model's own encoder
          weak = self.builder.merge(weak_params)
          weak_labels = text_conditioning.encode_condition(weak, labels)
          weak_fn = lambda x, t, _: weak(x, t, weak_labels)  # pylint: disable=unnecessary-lambda-assignment
        # A text model's condition is encoded once here, not at every model evaluation.
        labels = text_conditioning.encode_condition(model, labels)
        if null_labels is not None:
          null_labels = text_conditioning.encode_condition(model, null_labels)
        classifier_fn = None
        if plan.use_classifier:
          classifier = nnx.merge(self.classifier.graphdef, classifier_params)
          classifier_fn = lambda x, t: classifier(x, t)  # pylint: disable=unnecessary-lambda
        samples, _ = sampling.integrate(
            plan, lambda x, t, y: model(x, t, y), classifier_fn, key, labels, classifier_labels,
            guidance_scale, classifier_scale, sigma, null_labels, weak_fn)
        if self.latent_space is not None:
          samples = self.latent_space.decode(decoder_params, samples)
        return samples

      # The batch is split over (data, fsdp) like a training batch; the noise is drawn with
      # the partitionable threefry, so the samples do not depend on the mesh.
      b = self.builder
      weak_shardings = b.param_shardings if self._runs_weak(plan) else b.replicated
      self._compiled[plan] = jax.jit(
          run, in_shardings=(b.param_shardings, b.replicated, b.replicated, b.replicated,
                             b.batch_sharding, b.batch_sharding, b.replicated, b.replicated,
                             b.replicated, b.batch_sharding, weak_shardings),
          out_shardings=b.batch_sharding, compiler_options=self.compiler_options)
    return self._compiled[plan]

  def _runs_weak(self, plan):
    """Whether `plan`'s program runs the weak model (autoguidance where w is not 1)."""
    return plan.guidance_method.uses_weak_model and plan.use_cfg

  def _guidance_inputs(self, labels, guidance_scale, classifier_scale):
    """(generator labels, classifier labels, w, w_c, use_cfg, use_classifier) of a call."""
    classifier_scale = (self.config.sampling.classifier_scale
                        if classifier_scale is None else classifier_scale)
    classifier_labels = labels
    if self.guidance == 'cfg':
      classifier_scale = 0.0
    elif self.guidance == 'classifier':  # the generator's unconditional field
      guidance_scale = 1.0
      labels = np.full_like(labels, self.null_label)
    if self.unconditional:  # only ∅ was trained; CFG's w is meaningless (∅ with itself)
      labels = np.full_like(labels, self.null_label)
      if not self.guidance_method.uses_weak_model:  # (autoguidance guides ∅ by the weak ∅)
        guidance_scale = 1.0
    use_classifier = self.classifier is not None and float(classifier_scale) != 0.0
    return (labels, classifier_labels, float(guidance_scale), float(classifier_scale),
            sampling.uses_cfg(guidance_scale, self.guidance_method), use_classifier)

  def sample(self, key, labels, guidance_scale, *, classifier_scale=None, num_steps=None,
             method=None, sigma_schedule=None, sigma=None, null_labels=None):
    """Samples (float, [−1, 1]) for int `labels`, and the generator's NFE per sample (the model
    evaluations run, a doubled batch counting 2); `self.classifier_nfe` holds the classifier's
    forward (= backward) passes per sample of the call.

    `guidance_scale` (w) and `classifier_scale` (w_c; None: `sampling.classifier_scale`) are
    Python numbers: w = 1 compiles and runs the conditional batch alone, w_c = 0 never runs the
    classifier, every other value shares one compiled program. Which of them apply is
    `self.guidance` ('cfg': w; 'classifier': w_c on the unconditional field; 'cfg+classifier':
    both).
    """
    if null_labels is not None:  # a text condition and the condition in ∅'s place
      return self._sample_structured(key, labels, null_labels, guidance_scale, num_steps, method,
                                     sigma_schedule, sigma)
    labels = np.asarray(labels, np.int32)
    (labels, classifier_labels, guidance_scale, classifier_scale, use_cfg,
     use_classifier) = self._guidance_inputs(labels, guidance_scale, classifier_scale)
    sigma = self.config.sampling.sigma if sigma is None else sigma
    plan = self._plan(use_cfg, use_classifier, num_steps, method, sigma_schedule)
    sampling_plan.check_values(
        null_label=self.null_label, guidance_scale=guidance_scale, labels=labels,
        classifier_scale=classifier_scale,
        classifier_labels=classifier_labels if use_classifier else None, sigma=sigma)
    samples = self._run(plan, key, labels, classifier_labels, guidance_scale, classifier_scale,
                        sigma, None, use_classifier)
    self.classifier_nfe = plan.classifier_nfe
    return samples, plan.nfe

  def _sample_structured(self, key, condition, null_condition, guidance_scale, num_steps, method,
                         sigma_schedule, sigma):
    """`sample` of a text model: `condition` and `null_condition` are pytrees of (B, ...)
    arrays (`text_prompts.Prompts`); CFG puts `null_condition` in ∅'s place."""
    if self.classifier is not None:
      raise errors.ConfigError(
          f"config.sampling.guidance='{self.config.sampling.guidance}': classifier guidance "
          'needs class labels; a text model is guided by CFG alone (sampling.guidance=cfg).')
    sigma = self.config.sampling.sigma if sigma is None else sigma
    plan = self._plan(sampling.uses_cfg(guidance_scale, self.guidance_method), False, num_steps,
                      method, sigma_schedule)
    sampling_plan.check_values(null_label=self.null_label, guidance_scale=guidance_scale,
                               sigma=sigma)
    samples = self._run(plan, key, condition, None, float(guidance_scale), 0.0, sigma,
                        null_condition, False)
    self.classifier_nfe = 0
    return samples, plan.nfe

  def _run(self, plan, key, labels, classifier_labels, guidance_scale, classifier_scale, sigma,
           null_labels, use_classifier):
    """Runs `plan`'s program on a batch padded to the mesh's batch shards."""
    program = self._program(plan)
    num = len(jax.tree_util.tree_leaves(labels)[0])
    pad = -num % sharding.batch_axes_size(self.builder.mesh)

    def put(tree):
      return jax.tree.map(lambda a: jax.device_put(
          np.pad(np.asarray(a), [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1)),
          self.builder.batch_sharding), tree)

    with jax.set_mesh(self.builder.mesh):
      decoder_params = self.latent_space.params if self.latent_space is not None else None
      classifier_params = self.classifier.params if use_classifier else None
      samples = program(
          self.params, decoder_params, classifier_params, key, put(labels),
          put(labels if classifier_labels is None else classifier_labels),
          jnp.float32(guidance_scale), jnp.float32(classifier_scale), jnp.float32(sigma),
          None if null_labels is None else put(null_labels),
          self.weak_params if self._runs_weak(plan) else None)
      return samples[:num] if pad else samples

  def _plan(self, use_cfg, use_classifier, num_steps=None, method=None, sigma_schedule=None):
    """The `sampling_plan.Plan` of a call: the config's sampler unless overridden (checked)."""
    config = self.config.sampling
    return sampling_plan.make_plan(
        shape=self.image_shape, path=self.path, parameterization=self.config.loss.parameterization,
        null_label=self.null_label, method=method or config.method,
        num_steps=num_steps or config.num_steps, use_cfg=use_cfg, use_classifier=use_classifier,
        sigma_schedule=sigma_schedule or config.sigma_schedule,
        guidance_interval=config.guidance_interval,
        guidance_method=self.guidance_method)

  def lower_cfg(self, batch_size, condition=None):
    """The CFG program of the `sampling.*` settings (w ≠ 1; decoding included for a latent
    generator) lowered for `batch_size` labels on abstract arguments, for ahead-of-time
    compiles (`guidedflow.aot`): `self.params` and the decoder's may be ShapeDtypeStructs.
    A text model's `condition` is {name: (shape, dtype)} of its batch (∅ of the same shapes)."""
    b = self.builder
    abstract = lambda shape, dtype, where: jax.ShapeDtypeStruct(shape, dtype, sharding=where)  # pylint: disable=unnecessary-lambda-assignment
    if condition is None:
      labels = classifier_labels = abstract((batch_size,), jnp.int32, b.batch_sharding)
      null = None
    else:
      labels = null = {k: abstract(shape, dtype, b.batch_sharding)
                       for k, (shape, dtype) in condition.items()}
      classifier_labels = None
    scalar = abstract((), jnp.float32, b.replicated)
    plan = self._plan(use_cfg=True, use_classifier=False)
    program = self._program(plan)
    with jax.set_mesh(b.mesh):
      return program.lower(self.params, self._abstract_decoder(), None,
                           abstract((2,), jnp.uint32, b.replicated), labels, classifier_labels,
                           scalar, scalar, scalar, null,
                           self.weak_params if self._runs_weak(plan) else None)

  def _abstract_decoder(self):
    if self.latent_space is None:
      return None
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=self.builder.replicated),
                        self.latent_space.params)

  def sample_images(self, key, labels, guidance_scale, *, batch_size=None, **options):
    """uint8 samples for any number of labels, in padded batches of one compiled shape.

    Batch i uses key fold_in(key, i), so equal seeds give equal noise for every w.

    Returns:
      (uint8 images (N, H, W, C), NFE per sample, seconds of the first call (with compile)).
    """
    labels = np.asarray(labels, np.int32)
    batch = min(batch_size or self.config.sampling.batch_size, len(labels))
    outputs, nfe, first_call_s = [], 0, 0.0
    for i, start in enumerate(range(0, len(labels), batch)):
      chunk = labels[start:start + batch]
      t0 = time.time()
      samples, nfe = self.sample(jax.random.fold_in(key, i),
                                 np.pad(chunk, (0, batch - len(chunk))), guidance_scale,
                                 **options)
      outputs.append(images_lib.to_uint8(sharding.to_host(samples))[:len(chunk)])
      if i == 0:
        first_call_s = time.time() - t0
      logging.log_every_n_seconds(logging.INFO, 'Sampled %d/%d images.', 30,
                                  start + len(chunk), len(labels))
    return np.concatenate(outputs), nfe, first_call_s

  def guidance_grid(self, key, scales, *, classifier_scales=None):
    """uint8 grid: one row per class, one block of columns per guidance scale (same noise);
    with `classifier_scales`, one block per classifier scale w_c (at `scales[0]`)."""
    per_class = self.config.sampling.grid_samples_per_class
    classes = self.config.sampling.grid_classes
    classes = np.arange(self.num_classes) if classes is None else np.asarray(classes)
    labels = np.repeat(classes, per_class).astype(np.int32)
    settings = ([(float(scales[0]), float(w_c)) for w_c in classifier_scales]
                if classifier_scales else [(float(w), None) for w in scales])
    blocks = [images_lib.to_uint8(sharding.to_host(
        self.sample(key, labels, w, classifier_scale=w_c)[0])) for w, w_c in settings]
    return images_lib.make_guidance_grid(blocks, num_classes=len(classes),
                                         samples_per_class=per_class)


def sampled_weights(state):
  """The weights a sampler samples from: the EMA's when the state has them."""
  return state['ema_params'] if 'ema_params' in state else state['params']


def load(config, workdir, latent_space=None, constructor=None):
  """(StateBuilder, newest train state, generated shape) of a generator workdir. The shape is
  the one the run saved (run.json), so no data is opened; for a run of a version before it,
  the train split's image shape (the latents' of `latent_space` when given). `constructor`:
  the task's `model_constructor` (a text model's tokenizer sizes its encoder), default
  `factory.constructor`.

  Raises:
    CheckpointNotFoundError: the workdir holds no checkpoint.
  """
  image_shape = trained.saved_input_shape(workdir)
  if image_shape is None:  # saved before run.json: the train split says
    image_shape = input_pipeline.create_dataset(config.input, config.input.train_split).image_shape
    if latent_space is not None:
      image_shape = latent_space.latent_shape(image_shape)
  builder = train_state.builder(config, image_shape, constructor=constructor)
  state = train_state.load_latest(builder, config, workdir, check_config=resume_config.check)
  return builder, state, tuple(image_shape)


def load_weak_model(config, builder, workdir, step=None):
  """Autoguidance's weaker model: the EMA weights of checkpoint `sampling.autoguidance_step` of
  `sampling.autoguidance_workdir` (None: `workdir`, the generator's own run; step None: that
  run's newest), restored into the generator's layout. None unless `sampling.guidance_method`
  is 'autoguidance'. `step` is the generator's own step (a weak model that is the generator
  itself is logged: it samples the conditional model at every w).

  Raises:
    CheckpointNotFoundError: no checkpoint of that step there (the message lists the steps).
    ConfigError: the weak run was trained as another model (its saved config differs in a key
      that changes what the weights mean, e.g. `model.variant`), or its weights have other
      shapes.
  """
  sampling_config = config.sampling
  if sampling_config.guidance_method != 'autoguidance':
    return None
  weak_workdir = sampling_config.autoguidance_workdir or workdir
  with train_state.open_checkpointer(config, weak_workdir, handle_sigterm=False) as ckpt:
    steps = sorted(ckpt.all_steps())
    weak_step = steps[-1] if sampling_config.autoguidance_step is None and steps else (
        sampling_config.autoguidance_step)
    where = f'the weak model of autoguidance ({ckpt.directory}, step {weak_step})'
    if weak_step not in steps:
      raise errors.CheckpointNotFoundError(
          f'No checkpoint for {where}; the steps there: {steps or "none"}. Set '
          '--config.sampling.autoguidance_step to one of them (keep earlier steps of a run with '
          '--config.checkpoint.max_to_keep), or --config.sampling.autoguidance_workdir to '
          'another run of the same model.')
    saved = ckpt.restore_config(weak_step)
    changed = resume_config.meaning_changes(saved, config) if saved is not None else {}
    if changed:
      key, (was, wanted) = next(iter(changed.items()))
      raise errors.ConfigError(
          f'{where[0].upper()}{where[1:]} was trained with config.{key}={was!r}, the generator '
          f'with {wanted!r}: the weak model must be the same model on the same path, e.g. an '
          'earlier checkpoint of this run (--config.sampling.autoguidance_step=STEP).')
    try:
      state, _ = ckpt.restore(builder.abstract_state(), weak_step)
    except tree_compat.CheckpointMismatchError as e:
      raise errors.ConfigError(
          f'{where[0].upper()}{where[1:]} has other shapes than the generator '
          f'({errors.one_line(e).split(". ")[0]}): it must be the same model, e.g. an earlier '
          'checkpoint of this run (--config.sampling.autoguidance_step=STEP).') from None
  if weak_workdir == workdir and weak_step == step:
    logging.warning('Autoguidance with the generator itself as the weak model (%s): the '
                    'samples are the conditional model\'s at every w.', where)
  logging.info('Autoguidance with %s.', where)
  return sampled_weights(state)


class GuidanceClassifier:
  """A finished noise-aware classifier run p_t(y|x), split for the compiled sampler.

  Attributes: graphdef, params (its weights), workdir, result (its result.json), config.
  """

  def __init__(self, model, result, config, workdir):
    self.graphdef, self.params = nnx.split(model)
    self.result, self.config, self.workdir = result, config, workdir


def load_classifier(config, image_shape, latent_space=None):
  """The noise-aware classifier of `sampling.classifier_workdir` when `sampling.guidance` uses
  one (None for 'cfg'), checked against the generator it guides.

  Raises:
    CheckpointNotFoundError: no finished classifier run there (the message gives the command
      that trains one).
    ConfigError: the classifier was trained for other images, classes or another path.
  """
  guidance = config.sampling.guidance
  if guidance == 'cfg':
    return None
  if latent_space is not None:
    raise errors.ConfigError(
        f"sampling.guidance={guidance!r} on a latent generator needs a noise-aware classifier "
        "of latents, which guidedflow does not train yet: use sampling.guidance='cfg'.")
  workdir = config.sampling.classifier_workdir
  model, result, classifier_config = trained.load_noisy_classifier(workdir)
  trained_for = (tuple(result['image_shape']), int(classifier_config.input.num_classes),
                 classifier_config.path.schedule)
  wanted = (tuple(image_shape), int(config.input.num_classes), config.path.schedule)
  if trained_for != wanted:
    describe = lambda s: f'{"x".join(map(str, s[0]))} images of {s[1]} classes on the {s[2]} path'
    raise errors.ConfigError(
        f'the noise-aware classifier in {workdir} was trained on {describe(trained_for)}, but the '
        f'generator makes {describe(wanted)}: train one for it with: python -m guidedflow.main '
        '--config configs/fmnist_noisy_classifier.py --workdir DIR (setting its input and '
        'path.schedule to the generator\'s), then pass --config.sampling.classifier_workdir=DIR.')
  logging.info('Classifier guidance (%s) with the noise-aware classifier of %s (step %s).',
               guidance, workdir, result.get('step'))
  return GuidanceClassifier(model, result, classifier_config, workdir)
