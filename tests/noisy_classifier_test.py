"""The noise-aware classifier p_t(y|x): model, label-free U-Net blocks, time report, loop run."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import fmnist_noisy_classifier
from guidedflow import errors
from guidedflow import models
from guidedflow import train
from guidedflow import trained as trained_lib
from guidedflow.models import unet
from guidedflow.models.layers import param_count
from guidedflow.models.noisy_classifier import NoisyClassifier
from guidedflow.tasks import noisy_classifier as task_lib
from guidedflow.tasks import registry
from guidedflow.models import factory

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a short training
# run) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('noisy_classifier')

TIME_BINS = 5


def _tiny_config():
  """A narrow noisy classifier on the first 2000 Fashion-MNIST training images; seconds."""
  config = fmnist_noisy_classifier.get_config()
  config.model.channels = (8, 16)
  config.model.t_embed_dim = 8
  config.input.num_train_examples = 2000
  config.eval.num_examples = 500
  config.eval.batch_size = 250
  config.eval.time_bins = TIME_BINS
  config.eval.every_steps = 40
  config.train.num_steps = 80
  config.train.batch_size = 64
  config.train.log_every_steps = 20
  config.optim.learning_rate = 2e-2  # high for a short run: it learns in 80 steps
  config.optim.warmup_steps = 5
  config.checkpoint.every_steps = 40
  return config


def _tiny_model(norm='none', seed=0):
  # 16 channels: GroupNorm's 8 groups hold 2 channels each. With 1 channel per group it would
  # subtract the per-channel time bias of the adapters entirely.
  return NoisyClassifier(input_size=8, in_channels=1, num_classes=3, channels=(16, 16),
                         t_embed_dim=8, norm=norm, rngs=nnx.Rngs(seed))


def _perturb(model, scale=0.1, seed=7):
  """Noise on every parameter, so the zero-initialised head (logits 0) stops hiding the rest."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]))
  return model


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize('norm', ['none', 'group'])
def test_logits_depend_on_t_and_x_and_start_uniform(norm):
  model = _tiny_model(norm)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
  t = jnp.full((4,), 0.2)
  logits = model(x, t)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits), 0.0)  # zero head: p_t(y|x) uniform at init
  _perturb(model)
  low, high = model(x, t), model(x, jnp.full((4,), 0.9))
  assert float(jnp.abs(low - high).max()) > 1e-3  # the time adapters reach the logits
  assert float(jnp.abs(low[0] - low[1]).max()) > 1e-3  # and so do the images
  # Stateless: an example's logits do not depend on the rest of the batch.
  np.testing.assert_allclose(np.asarray(model(x[:1], t[:1])), np.asarray(low[:1]), atol=1e-5)


def test_blocks_have_no_label_adapter_and_every_parameter_learns():
  model = _perturb(_tiny_model())
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  assert not [p for p in paths if 'y_adapter' in p or 'label' in p]
  assert sum('t_adapter' in p for p in paths) == 2 * 4  # one adapter (4 arrays) per block
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  t = jnp.linspace(0.1, 0.9, 4)
  grads = nnx.grad(lambda m: jnp.mean(m(x, t) ** 2))(model)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.any(g != 0)) for g in leaves) and all(
      bool(jnp.all(jnp.isfinite(g))) for g in leaves)


def test_indivisible_size_raises_with_hint():
  with pytest.raises(ValueError, match=r'10×10 is not divisible by 4.*at most 2 channel levels'):
    NoisyClassifier(input_size=10, in_channels=1, num_classes=3, channels=(4, 8, 16),
                    rngs=nnx.Rngs(0))
  config = fmnist_noisy_classifier.get_config()
  config.model.channels = (4, 8, 16, 32)  # 28 is not divisible by 8
  with pytest.raises(errors.ConfigError, match='config.model: .*not divisible by 8'):
    factory.noisy_image_classifier(config, (28, 28, 1))


def test_analytic_flops_close_to_xla_count():
  model = _perturb(NoisyClassifier(input_size=16, in_channels=1, num_classes=10,
                                   channels=(8, 16), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  x, t = jnp.zeros((2, 16, 16, 1)), jnp.full((2,), 0.5)
  cost = jax.jit(lambda s: nnx.merge(graphdef, s)(x, t)).lower(state).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 0.85 < model.flops_per_example() * 2 / cost['flops'] < 1.15


# ----------------------------------------------------------------------------- U-Net blocks


def test_label_free_residual_layer_has_no_y_adapter():
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
  block = unet.ResidualLayer(4, 6, 0, rngs=nnx.Rngs(0), **kw)
  assert block.y_adapter is None
  x, t_emb = jnp.ones((2, 3, 3, 4)), jnp.ones((2, 6))
  assert block(x, t_emb).shape == (2, 3, 3, 4)
  for module in (unet.Encoder(4, 8, 2, 6, 0, rngs=nnx.Rngs(0), **kw),
                 unet.Midcoder(4, 2, 6, 0, rngs=nnx.Rngs(0), **kw)):
    assert all(b.y_adapter is None for b in module.res_blocks)
    assert module(x, t_emb).shape[0] == 2


def test_generator_parameters_are_those_of_existing_checkpoints():
  """With y_embed_dim > 0 the blocks are built in the order of checkpoints written before the
  label adapter became optional: same tree and same initial values for the same seed."""
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
  block = unet.ResidualLayer(4, 6, 5, norm='group', rngs=nnx.Rngs(3), **kw)

  class Original(nnx.Module):  # the block's constructor before y_embed_dim=0 existed

    def __init__(self, rngs):
      self.norm1 = unet.maybe_norm('group', 4, rngs=rngs, **kw)
      self.conv1 = unet.conv3x3(4, 4, rngs=rngs, **kw)
      self.t_adapter = unet.Adapter(6, 4, rngs=rngs, **kw)
      self.y_adapter = unet.Adapter(5, 4, rngs=rngs, **kw)
      self.norm2 = unet.maybe_norm('group', 4, rngs=rngs, **kw)
      self.conv2 = unet.conv3x3(4, 4, rngs=rngs, **kw)

  original = jax.tree_util.tree_leaves_with_path(nnx.state(Original(nnx.Rngs(3)), nnx.Param))
  ours = jax.tree_util.tree_leaves_with_path(nnx.state(block, nnx.Param))
  assert [p for p, _ in ours] == [p for p, _ in original]
  for (_, a), (_, b) in zip(ours, original):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The whole U-Net: a label adapter in every residual block, and the parameter count of the
  # generator before the change (computed then).
  model = nnx.eval_shape(lambda: models.create_model(
      'unet', input_size=8, in_channels=1, num_classes=3, rngs=nnx.Rngs(0), channels=(4, 8),
      num_residual_layers=1, t_embed_dim=4, y_embed_dim=6, norm='none'))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
  assert len(paths) == 46 and sum('y_adapter' in p for p in paths) == 3 * 4
  assert param_count(model) == 2829  # counted with the U-Net before y_embed_dim=0 existed


# ----------------------------------------------------------------------------- time report


def test_crossing_time_on_closed_form_inputs():
  centres = [0.1, 0.3, 0.5, 0.7]
  # Between 0.3 (0.4) and 0.5 (0.8): 0.5 is reached a quarter of the way, at t = 0.35.
  assert task_lib.crossing_time(centres, [0.2, 0.4, 0.8, 0.9], 0.5) == pytest.approx(0.35)
  assert task_lib.crossing_time(centres, [0.2, 0.4, 0.8, 0.95], 0.9) == pytest.approx(
      0.5 + 0.2 * (0.1 / 0.15))
  assert task_lib.crossing_time(centres, [0.2, 0.4, 0.8, 0.85], 0.9) is None  # never reached
  assert task_lib.crossing_time(centres, [0.6, 0.7, 0.8, 0.9], 0.5) == pytest.approx(0.1)
  assert task_lib.crossing_time(centres, [0.2, 0.5, 0.8, 0.9], 0.5) == pytest.approx(0.3)
  # Not monotone: the first crossing counts.
  assert task_lib.crossing_time(centres, [0.2, 0.6, 0.4, 0.9], 0.5) == pytest.approx(0.25)
  assert task_lib.bin_centres(4) == [0.125, 0.375, 0.625, 0.875]


def test_time_report_from_bin_metrics():
  metrics = {'loss': 1.25, 'accuracy': 0.5, 'accuracy_bin00': 0.1, 'accuracy_bin01': 0.7}
  report = task_lib.time_report(metrics, 2)
  assert report['accuracy_per_time_bin'] == [{'t': 0.25, 'accuracy': 0.1},
                                             {'t': 0.75, 'accuracy': 0.7}]
  assert report['t_accuracy_50'] == pytest.approx(0.25 + 0.5 * 0.4 / 0.6, abs=1e-4)
  assert report['t_accuracy_90'] is None
  assert report['test_loss'] == 1.25 and report['test_accuracy'] == 0.5


def test_eval_metrics_per_bin_ignore_padding():
  config = _tiny_config()
  config.input.num_classes = 3
  task = registry.get_task(config)
  assert isinstance(task, task_lib.NoisyClassifierTask)
  model = _perturb(_tiny_model())
  images = jax.random.uniform(jax.random.key(4), (6, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  key = jax.random.key(5)
  full = task.eval_metrics(model, {'image': images, 'label': labels, 'mask': jnp.ones(6)}, key)
  assert sorted(full) == ['accuracy'] + [f'accuracy_bin{k:02d}' for k in range(TIME_BINS)] + [
      'loss']
  bins = [float(full[f'accuracy_bin{k:02d}']) for k in range(TIME_BINS)]
  assert float(full['accuracy']) == pytest.approx(np.mean(bins))
  assert all(b * 6 == pytest.approx(round(b * 6)) for b in bins)  # hits of 6 examples
  # Padded rows (mask 0) with other labels change nothing.
  mask = jnp.array([1.0, 1, 1, 1, 1, 0])
  other = jnp.where(mask > 0, labels, (labels + 1) % 3)
  padded = task.eval_metrics(model, {'image': images, 'label': other, 'mask': mask}, key)
  real = {k: float(v) for k, v in task.eval_metrics(
      model, {'image': images, 'label': labels, 'mask': mask}, key).items()}
  assert {k: float(v) for k, v in padded.items()} == pytest.approx(real)
  loss, metrics = task.loss(model, {'image': images, 'label': labels, 'mask': jnp.ones(6)},
                            key)
  assert math.isfinite(float(loss)) and 0.0 <= float(metrics['accuracy']) <= 1.0


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """80 steps on Fashion-MNIST (checkpoints and eval at 40): (workdir, state, result)."""
  workdir = str(tmp_path_factory.mktemp('noisy_classifier'))
  state, result = train.train_and_evaluate(_tiny_config(), workdir)
  return workdir, state, result


def test_short_training_reports_accuracy_by_time(trained):
  workdir, _, result = trained
  with open(os.path.join(workdir, 'result.json')) as f:
    assert json.load(f) == result
  assert result['task'] == 'noisy_classifier' and result['step'] == 80
  bins = result['accuracy_per_time_bin']
  assert [b['t'] for b in bins] == [0.1, 0.3, 0.5, 0.7, 0.9]
  accuracies = [b['accuracy'] for b in bins]
  # Near the data end it classifies (chance is 0.1; 0.47 after these 80 steps); at t = 0.1 the
  # image is 10% signal (0.16).
  assert accuracies[-1] > 0.35 and accuracies[-1] > accuracies[0] + 0.2, accuracies
  assert result['test_accuracy'] == pytest.approx(np.mean(accuracies), abs=1e-4)
  assert result['test_loss'] < math.log(10) and result['train_loss'] < math.log(10)
  assert result['t_accuracy_50'] == pytest.approx(
      task_lib.crossing_time([b['t'] for b in bins], accuracies, 0.5), abs=1e-4)
  assert result['num_test_examples'] == 500


def test_evaluate_reproduces_the_final_report(trained):
  workdir, _, result = trained
  evaluated = registry.get_task(_tiny_config(), workdir).evaluate(workdir)
  assert evaluated['step'] == 80
  for mine, theirs in zip(evaluated['accuracy_per_time_bin'], result['accuracy_per_time_bin']):
    assert mine['accuracy'] == pytest.approx(theirs['accuracy'], abs=2e-3)  # same noise


def test_load_returns_the_trained_model(trained):
  workdir, state, result = trained
  model, loaded_result, config = trained_lib.load_noisy_classifier(workdir)
  assert isinstance(model, NoisyClassifier) and loaded_result['step'] == result['step']
  assert config.task == 'noisy_classifier'
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_of_a_missing_run_names_the_train_command(tmp_path):
  workdir = str(tmp_path / 'none')
  with pytest.raises(errors.CheckpointNotFoundError) as info:
    trained_lib.load_noisy_classifier(workdir)
  assert ('python -m guidedflow.main --config configs/fmnist_noisy_classifier.py --workdir '
          f'{workdir}') in str(info.value)


@pytest.mark.parametrize('key, value, match', [
    ('path.schedule', 'sigmoid', r"config.path.schedule='sigmoid' is not one of"),
    ('loss.time_sampler', 'beta', r"config.loss.time_sampler='beta' is not one of"),
    ('model.norm', 'batch', r"config.model.norm='batch' is not one of"),
    ('eval.time_bins', 0, r'config.eval.time_bins=0 must be a positive integer'),
    ('model.channels', (), r'config.model.channels=\(\) must be'),
])
def test_bad_config_values_raise_config_error(key, value, match):
  config = fmnist_noisy_classifier.get_config()
  group, name = key.split('.')
  config[group][name] = value
  with pytest.raises(errors.ConfigError, match=match):
    registry.validate(config)


def test_default_config_validates():
  registry.validate(fmnist_noisy_classifier.get_config())
