"""Classifier guidance and autoguidance through the program: Sampler, load_classifier,
load_weak_model, --mode=evaluate, config.

A tiny generator (tiny.py, 2 steps) and a tiny noise-aware classifier (40 steps) are trained
through the one training loop once per module; `classifier_guidance_test.py` and
`cfg_pp_autoguidance_test.py` check the math of the guided sampler against closed forms.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_unconditional
from configs import fmnist_noisy_classifier
from configs import tiny
from guidedflow import errors
from guidedflow import evaluate
from guidedflow import feature_networks
from guidedflow import input_pipeline
from guidedflow import sampler as sampler_lib
from guidedflow import train
from guidedflow import train_state
from guidedflow import trained
from guidedflow.tasks import registry
from tests.evaluate_test import PixelFeatures

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a generator and
# two classifiers trained here) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('classifier_guidance_sampler')

NULL = 10  # the null label of the 10 Fashion-MNIST classes


def _classifier_config():
  config = fmnist_noisy_classifier.get_config()
  config.model.channels = (8, 16)
  config.model.t_embed_dim = 8
  config.input.num_train_examples = 2000
  config.eval.num_examples = 100
  config.eval.batch_size = 100
  config.eval.time_bins = 2
  config.train.num_steps = 100
  config.train.batch_size = 64
  config.train.log_every_steps = 20
  config.optim.learning_rate = 2e-2
  config.optim.warmup_steps = 5
  config.checkpoint.every_steps = 100
  return config


def _generator_config(guidance='cfg', workdir=None, **sampling):
  config = tiny.get_config()
  config.train.num_steps = 2
  config.sampling.method = 'euler'
  config.sampling.num_steps = 3
  config.sampling.guidance = guidance
  config.sampling.classifier_workdir = workdir
  for key, value in sampling.items():
    setattr(config.sampling, key, value)
  return config


@pytest.fixture(scope='module')
def generator_run(tmp_path_factory):
  """The tiny generator's workdir (one checkpoint, step 2), trained through the loop."""
  generator = str(tmp_path_factory.mktemp('generator'))
  train.train_and_evaluate(_generator_config(), generator)
  return generator


@pytest.fixture(scope='module')
def runs(generator_run, tmp_path_factory):
  """(generator workdir, noisy-classifier workdir), both trained through the loop."""
  classifier = str(tmp_path_factory.mktemp('noisy_classifier'))
  train.train_and_evaluate(_classifier_config(), classifier)
  return generator_run, classifier


@pytest.fixture(scope='module')
def guided(runs):
  """A Sampler with guidance='classifier' on the tiny generator."""
  generator, classifier = runs
  return sampler_lib.Sampler.from_workdir(_generator_config('classifier', classifier), generator)


def _record_generator_labels(sampler, monkeypatch):
  """Patches the sampler's model to record the labels of every evaluation it runs."""
  seen = []
  original = sampler.builder.merge

  def recording_merge(params):
    model = original(params)

    def model_fn(x, t, y):
      jax.debug.callback(lambda labels: seen.append(np.asarray(labels)), y)
      return model(x, t, y)

    return model_fn

  monkeypatch.setattr(sampler.builder, 'merge', recording_merge)
  monkeypatch.setattr(sampler, '_compiled', {})
  return seen


def test_classifier_mode_samples_the_unconditional_field_plus_the_gradient(guided, runs,
                                                                          monkeypatch):
  labels = np.arange(8, dtype=np.int32) % 10
  key = jax.random.key(3)
  seen = _record_generator_labels(guided, monkeypatch)
  samples, nfe = guided.sample(key, labels, 4.0, classifier_scale=5.0)
  jax.effects_barrier()
  # The generator sees ∅ only, as a single batch (w is ignored): Euler 3 steps = 3 evaluations,
  # and the classifier runs (forward + backward) once per evaluation.
  assert nfe == 3 and guided.classifier_nfe == 3
  assert len(seen) == 3 and all(s.shape == (8,) and (s == NULL).all() for s in seen)
  # w_c = 0 never runs the classifier: exactly the unguided unconditional sampler.
  plain, plain_nfe = guided.sample(key, labels, 4.0, classifier_scale=0.0)
  assert plain_nfe == 3 and guided.classifier_nfe == 0
  cfg = sampler_lib.Sampler.from_workdir(_generator_config(), runs[0])
  reference, _ = cfg.sample(key, np.full_like(labels, NULL), 1.0)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(reference))
  assert float(jnp.abs(samples - plain).max()) > 1e-3


def test_guidance_raises_the_classifier_log_probability_of_the_label(guided):
  """The gradient's sign: guided samples are more likely to be y under p_t(y|x).

  Guidance runs on t ≥ 1/3 only (`guidance_interval`): near t = 0 a learned classifier's
  gradient does not vanish as the true one does (∝ α_t), and b_t = (1 − t)/t is 999 at t_eps.
  """
  model, _, _ = trained.load_noisy_classifier(guided.classifier.workdir)
  guided.config.sampling.guidance_interval = (0.3, 1.0)
  guided._compiled = {}  # pylint: disable=protected-access
  labels = np.tile(np.arange(10, dtype=np.int32), 4)
  key = jax.random.key(0)

  def mean_log_prob(w_c):
    samples, _ = guided.sample(key, labels, 1.0, classifier_scale=w_c)
    # At t slightly below 1, where the guided field last queried the classifier.
    logits = model(samples, jnp.full((len(labels),), 2 / 3))
    return float(jnp.mean(jax.nn.log_softmax(logits)[np.arange(len(labels)), labels]))

  try:
    unguided, weak, strong = mean_log_prob(0.0), mean_log_prob(0.25), mean_log_prob(1.0)
  finally:
    guided.config.sampling.guidance_interval = None
    guided._compiled = {}  # pylint: disable=protected-access
  assert unguided < weak < strong, (unguided, weak, strong)


def test_cfg_plus_classifier_runs_both_terms(runs, monkeypatch):
  generator, classifier = runs
  sampler = sampler_lib.Sampler.from_workdir(
      _generator_config('cfg+classifier', classifier), generator)
  seen = _record_generator_labels(sampler, monkeypatch)
  labels = np.array([1, 2, 3, 4], np.int32)
  _, nfe = sampler.sample(jax.random.key(1), labels, 2.0, classifier_scale=1.0)
  jax.effects_barrier()
  # CFG doubles the batch (each label beside ∅), the classifier runs once per step.
  assert nfe == 6 and sampler.classifier_nfe == 3
  assert all(list(s) == [1, NULL, 2, NULL, 3, NULL, 4, NULL] for s in seen)


def test_missing_or_mismatched_classifier_is_one_clear_error(runs, tmp_path):
  generator, classifier = runs
  missing = str(tmp_path / 'no_classifier')
  with pytest.raises(errors.CheckpointNotFoundError) as info:
    sampler_lib.Sampler.from_workdir(_generator_config('classifier', missing), generator)
  assert f'configs/fmnist_noisy_classifier.py --workdir {missing}' in str(info.value)
  assert not os.path.exists(missing)  # nothing is created where the run was expected
  config = _generator_config('classifier', classifier)
  with pytest.raises(errors.ConfigError, match='trained on 28x28x1 images of 10 classes on the '
                     'linear path, but the generator makes 32x32x1'):
    sampler_lib.load_classifier(config, (32, 32, 1))
  config.path.schedule = 'cosine'
  with pytest.raises(errors.ConfigError, match='on the cosine path'):
    sampler_lib.load_classifier(config, (28, 28, 1))
  with pytest.raises(errors.ConfigError, match='latent generator'):
    sampler_lib.load_classifier(_generator_config('classifier', classifier), (7, 7, 8),
                                latent_space=object())
  assert sampler_lib.load_classifier(_generator_config('cfg', classifier), (28, 28, 1)) is None


def test_evaluate_sweeps_the_classifier_scale(guided, runs, tmp_path, monkeypatch):
  config = _generator_config('classifier', runs[1])
  config.eval.feature_network = 'fmnist_classifier'  # replaced by PixelFeatures
  config.eval.num_real_images = 100
  config.eval.samples_per_class = 2
  config.eval.grid_rows_per_class = 1
  config.eval.classifier_scales = (0.0, 4.0)
  eval_set = input_pipeline.create_dataset(config.input, 'test')
  network = PixelFeatures()
  real, labels = evaluate._real_images(eval_set, 100)  # pylint: disable=protected-access
  network.fit(real, labels)
  monkeypatch.setattr(feature_networks, 'load', lambda config, name=None: network)
  train_set = input_pipeline.create_dataset(config.input, 'train')
  result = evaluate.run(config, str(tmp_path), guided, network, eval_set, train_set)
  sweep = result['guidance_sweep']
  assert [(r['guidance'], r['classifier_scale'], r['nfe'], r['classifier_nfe'])
          for r in sweep] == [('classifier', 0.0, 3, 0), ('classifier', 4.0, 3, 3)]
  assert all('guidance_scale' not in r for r in sweep)  # w does not apply
  assert sweep[0]['fd'] != sweep[1]['fd']
  out = tmp_path / 'eval'
  table = (out / 'guidance_sweep.md').read_text().splitlines()
  assert table[0].startswith('| w_c | guidance |') and 'classifier NFE' in table[0]
  assert table[-1].startswith('| real train images |')
  assert json.loads((out / 'guidance_sweep.json').read_text()) == sweep
  assert (out / 'guidance_sweep.png').exists() and (out / 'guidance_grid.png').exists()


def test_guidance_settings_of_each_mode():
  config = _generator_config()
  config.eval.guidance_scales = (1.0, 2.0)
  config.eval.classifier_scales = (0.0, 3.0)
  settings, key, _ = evaluate.guidance_settings(config, 'cfg')
  assert settings == [(1.0, None), (2.0, None)] and key == 'guidance_scale'
  settings, key, _ = evaluate.guidance_settings(config, 'classifier')
  assert settings == [(1.0, 0.0), (1.0, 3.0)] and key == 'classifier_scale'
  settings, _, _ = evaluate.guidance_settings(config, 'cfg+classifier')
  assert settings == [(1.0, 0.0), (1.0, 3.0), (2.0, 0.0), (2.0, 3.0)]


@pytest.mark.parametrize('overrides, match', [
    (dict(guidance='classifier', classifier_workdir=None), 'needs the noise-aware classifier'),
    (dict(guidance='cfg+classifier', label_dropout=1.0), 'needs a conditional generator'),
    (dict(guidance='classifier_free'), "sampling.guidance='classifier_free' is not one of"),
    (dict(classifier_scale=float('nan')), 'classifier_scale=nan must be a finite number'),
    (dict(classifier_scales=(1.0, 'x')), 'eval.classifier_scales'),
])
def test_bad_guidance_configs_are_refused(overrides, match):
  config = fashion_mnist_unconditional.get_config()
  config.sampling.guidance = 'cfg+classifier'
  config.loss.label_dropout = 0.1
  for key, value in overrides.items():
    group = {'label_dropout': 'loss', 'classifier_scales': 'eval'}.get(key, 'sampling')
    setattr(config[group], key, value)
  with pytest.raises(errors.ConfigError, match=match):
    registry.validate(config)


def test_unconditional_config_validates_and_is_unconditional():
  config = fashion_mnist_unconditional.get_config()
  registry.validate(config)
  assert config.loss.label_dropout == 1.0 and config.sampling.guidance == 'classifier'


def test_autoguidance_runs_two_parameter_sets_in_one_program(generator_run):
  """The weak model of `sampling.autoguidance_step` through Sampler.from_workdir: here the run's
  only checkpoint, the generator itself, so every w samples the conditional model; then two
  different parameter sets in the same compiled programs, where w = 0 is the weak model alone."""
  config = _generator_config(guidance_method='autoguidance', autoguidance_step=2)
  sampler = sampler_lib.Sampler.from_workdir(config, generator_run)
  labels, key = np.array([0, 3, 7, 9], np.int32), jax.random.key(5)
  conditional, conditional_nfe = sampler.sample(key, labels, 1.0)
  itself, nfe = sampler.sample(key, labels, 3.0)
  assert (conditional_nfe, nfe) == (3, 6)  # Euler, 3 steps: the weak model once per step
  np.testing.assert_allclose(itself, conditional, rtol=1e-6, atol=1e-6)
  strong = sampler.params
  weak = jax.tree.map(lambda p: 1.1 * p + 0.01, strong)
  sampler.weak_params = weak
  weak_alone, _ = sampler.sample(key, labels, 0.0)
  guided, _ = sampler.sample(key, labels, 3.0)
  sampler.params, sampler.weak_params = weak, strong
  weak_conditional, _ = sampler.sample(key, labels, 1.0)
  assert len(sampler._compiled) == 2  # pylint: disable=protected-access
  np.testing.assert_allclose(weak_alone, weak_conditional, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(weak_conditional - conditional).max()) > 1e-2
  assert float(jnp.abs(guided - conditional).max()) > 1e-2
  assert float(jnp.abs(guided - weak_alone).max()) > 1e-2


def test_missing_or_mismatched_weak_model_is_one_clear_error(generator_run, tmp_path):
  missing = _generator_config(guidance_method='autoguidance', autoguidance_step=1)
  with pytest.raises(errors.CheckpointNotFoundError, match=r'No checkpoint for the weak model of '
                     r'autoguidance \(.*, step 1\); the steps there: \[2\]\. Set '
                     r'--config.sampling.autoguidance_step') as info:
    sampler_lib.Sampler.from_workdir(missing, generator_run)
  assert '\n' not in str(info.value)
  # Another architecture (patch 4, not 7): step 2 saved with its config, step 4 without one.
  other = tiny.get_config()
  other.model.variant = 'test/4'
  with train_state.open_checkpointer(other, str(tmp_path), handle_sigterm=False) as ckpt:
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),  # its shapes; no init compile
                         train_state.builder(other, (28, 28, 1)).abstract_state())
    ckpt.save(2, state, data_state={}, config=other, force=True)
    ckpt.save(4, state, data_state={}, force=True)
    ckpt.wait_until_finished()
  builder = train_state.builder(_generator_config(), (28, 28, 1))  # the generator's layout
  for step, message in ((2, r"was trained with config.model.variant='test/4', the generator "
                            r"with 'test/7': the weak model must be the same model"),
                        (4, r'step 4\) has other shapes than the generator \(.*parameter')):
    config = _generator_config(guidance_method='autoguidance', autoguidance_step=step,
                               autoguidance_workdir=str(tmp_path))
    with pytest.raises(errors.ConfigError, match=message) as info:
      sampler_lib.load_weak_model(config, builder, generator_run)
    assert '\n' not in str(info.value)
