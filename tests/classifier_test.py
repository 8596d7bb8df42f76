"""The Fashion-MNIST feature network: model, short training, checkpoint loader, CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import fmnist_classifier
from guidedflow import checkpointing
from guidedflow import errors
from guidedflow import feature_networks
from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow import sampler as sampler_lib
from guidedflow import train
from guidedflow.models.classifier import Classifier
from guidedflow.tasks import classifier as classifier_task
from guidedflow.models import factory
from tests import subprocess_env

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a short training
# run) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('classifier')

REPO = subprocess_env.REPO


def _tiny_config(**train):
  """A narrow classifier on the first 2000 training images; seconds on a CPU."""
  config = fmnist_classifier.get_config()
  config.model.channels = (8, 16, 16)
  config.model.feature_dim = 32
  config.input.num_train_examples = 2000
  config.eval.num_examples = 1000
  config.train.num_steps = 40
  config.train.batch_size = 64
  config.train.log_every_steps = 10
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 4
  config.checkpoint.every_steps = 20
  for key, value in train.items():
    config.train[key] = value
  return config


def _test_images(n):
  images, labels = input_pipeline.load_fashion_mnist(None, 'test')
  return images[:n], labels[:n]


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize('group_norm', [False, True])
def test_model_shapes_and_features_are_the_penultimate_layer(group_norm):
  model = Classifier(num_classes=10, feature_dim=24, channels=(8, 16), group_norm=group_norm,
                     rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 28, 28, 1), minval=-1, maxval=1)
  logits = model(x)
  features = model.features(x)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert features.shape == (3, 24) and features.dtype == jnp.float32
  # logits = Dense(features): the last layer applied by hand to the features.
  by_hand = features @ model.head.kernel[...] + model.head.bias[...]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(by_hand), rtol=1e-5, atol=1e-5)
  both = model.features_and_logits(x)
  np.testing.assert_array_equal(np.asarray(both[0]), np.asarray(features))
  np.testing.assert_array_equal(np.asarray(both[1]), np.asarray(logits))
  # Stateless: an example's outputs do not depend on the rest of the batch.
  np.testing.assert_allclose(np.asarray(model(x[:1])), np.asarray(logits[:1]), atol=1e-5)
  # Images differ → features differ (the network is not degenerate at initialisation).
  assert float(jnp.abs(features[0] - features[1]).max()) > 1e-3


def test_model_rejects_unpoolable_input_size():
  with pytest.raises(ValueError, match='not divisible'):
    Classifier(num_classes=10, channels=(8, 8, 8, 8), input_size=28, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- training + loader


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """40 steps straight (checkpoints at 20 and 40): (workdir, final state, result)."""
  workdir = str(tmp_path_factory.mktemp('classifier'))
  state, result = train.train_and_evaluate(_tiny_config(), workdir)
  return workdir, state, result


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_short_training_learns(trained):
  _, state, result = trained
  # 40 steps of 64 on 2000 images: far above chance (0.1); a broken gradient stays near it.
  assert result['task'] == 'classifier' and result['step'] == 40
  assert result['train_accuracy'] > 0.5, result
  assert result['test_accuracy'] > 0.5, result
  assert result['num_test_examples'] == 1000 and result['num_steps'] == 40
  assert result['train_images_per_s'] > 0
  assert 'ema_params' not in state  # ema_decay = 0: no EMA kept


def test_second_run_trains_no_further(trained):
  workdir, _, result = trained
  _, again = train.train_and_evaluate(_tiny_config(), workdir)
  assert again['steps_this_run'] == 0
  assert again['test_accuracy'] == result['test_accuracy']


def _poison_iterator(monkeypatch, at_batch, action):
  original = input_pipeline.BatchIterator.__next__

  def patched(self):
    batch = original(self)
    if self.get_state()['step'] == at_batch:
      batch = action(batch)
    return batch

  monkeypatch.setattr(input_pipeline.BatchIterator, '__next__', patched)


def test_resumes_bitwise_after_sigterm(trained, tmp_path, monkeypatch):
  """SIGTERM at step 13: a checkpoint there and a clean return; resuming to 40 gives the state of
  the uninterrupted run in every array (parameters and AdamW moments)."""
  _, straight, _ = trained
  workdir = str(tmp_path / 'split')

  def sigterm(batch):
    os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _poison_iterator(monkeypatch, 13, sigterm)
  stopped, result = train.train_and_evaluate(_tiny_config(), workdir)
  assert result['preempted'] and result['step'] == 13 and int(stopped['step']) == 13
  monkeypatch.undo()
  resumed, result = train.train_and_evaluate(_tiny_config(), workdir)
  assert result['steps_this_run'] == 27 and int(resumed['step']) == 40
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
  _poison_iterator(monkeypatch, 25, lambda b: dict(b, image=b['image'] * jnp.nan))
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(errors.TrainingError, match='step 25') as info:
    train.train_and_evaluate(_tiny_config(), str(tmp_path))
  assert 'last good checkpoint (step 20)' in str(info.value)
  assert signal.getsignal(signal.SIGTERM) is handler  # torn down on the error, too
  with checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), handle_sigterm=False) as ckpt:
    assert ckpt.all_steps() == [20]


def test_mismatched_checkpoint_is_refused_naming_the_parameter(trained):
  config = _tiny_config()
  config.model.feature_dim = 48
  # The changed key is named first (it changes what the weights mean) ...
  with pytest.raises(errors.ConfigError, match='config.model.feature_dim=32, this config has 48'):
    train.train_and_evaluate(config, trained[0])
  # ... and allowing the change cannot make other shapes fit: the parameter is named.
  config.train.allow_config_change = True
  with pytest.raises(checkpointing.CheckpointMismatchError, match='feature_layer'):
    train.train_and_evaluate(config, trained[0])


def test_checkpoint_round_trip(trained):
  workdir, state, result = trained
  network = feature_networks.load_classifier(workdir, batch_size=64)
  assert network.name == 'fmnist_classifier'
  assert network.image_shape == (28, 28, 1)
  assert network.meta['num_classes'] == 10 and network.meta['feature_dim'] == 32
  assert network.meta['test_accuracy'] == result['test_accuracy']
  assert network.meta['step'] == 40
  # Parameters restored bitwise.
  saved, loaded = _leaves(state['params']), _leaves(network._state)  # pylint: disable=protected-access
  assert len(saved) == len(loaded)
  for a, b in zip(saved, loaded):
    np.testing.assert_array_equal(a, b)
  images, labels = _test_images(100)  # 64 + a padded batch of 36
  out = network(images)
  assert out['features'].shape == (100, 32) and out['features'].dtype == np.float32
  assert out['logits'].shape == (100, 10) and out['logits'].dtype == np.float32
  model = factory.feature_classifier(_tiny_config(), (28, 28, 1))()
  nnx.update(model, state['params'])
  features, logits = model.features_and_logits(images_lib.to_model(jnp.asarray(images)))
  np.testing.assert_allclose(out['logits'], np.asarray(logits), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['features'], np.asarray(features), rtol=1e-5, atol=1e-5)
  assert np.mean(out['logits'].argmax(-1) == labels) > 0.5


def test_feature_network_compiles_once_for_any_count(trained):
  network = feature_networks.load_classifier(trained[0], batch_size=16)
  images, _ = _test_images(40)
  one = network(images[:1])
  many = network(images)  # 16 + 16 + padded 8
  assert network.num_traces == 1
  assert one['logits'].shape == (1, 10) and many['logits'].shape == (40, 10)
  # Padding never changes an image's outputs.
  np.testing.assert_allclose(one['features'], many['features'][:1], rtol=1e-5, atol=1e-6)


def test_wrong_images_raise_value_error(trained):
  network = feature_networks.load_classifier(trained[0], batch_size=16)
  with pytest.raises(ValueError, match=r'\(N, 28, 28, 1\)'):
    network(np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match=r'\(N, 28, 28, 1\)'):
    network(np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    network(np.zeros((2, 28, 28, 1), np.float32))


def test_missing_or_unfinished_classifier_says_how_to_train(tmp_path, trained):
  workdir = str(tmp_path / 'no_classifier')
  with pytest.raises(feature_networks.FeatureNetworkNotFoundError) as info:
    feature_networks.load_classifier(workdir)
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert f'no Fashion-MNIST classifier checkpoint in {workdir}' in message
  assert (f'python -m guidedflow.main --config configs/fmnist_classifier.py --workdir {workdir}'
          in message)
  assert 'minutes on a 2-core CPU' in message
  # Checkpoints without the result of a finished run: resume it.
  unfinished = str(tmp_path / 'unfinished')
  shutil.copytree(trained[0], unfinished)
  os.remove(os.path.join(unfinished, 'result.json'))
  with pytest.raises(feature_networks.FeatureNetworkNotFoundError, match='did not finish'):
    feature_networks.load_classifier(unfinished)
  # A workdir of the classifier's former own loop (classifier_result.json, no result.json).
  os.rename(os.path.join(unfinished, 'config.json'), os.path.join(unfinished,
                                                                 'classifier_result.json'))
  with pytest.raises(feature_networks.FeatureNetworkNotFoundError, match='older guidedflow'):
    feature_networks.load_classifier(unfinished)


def test_generator_config_on_a_classifier_workdir_names_the_task(trained):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match="config.task='classifier'"):
    sampler_lib.Sampler.from_workdir(tiny.get_config(), trained[0])


def test_config_errors_name_the_key(tmp_path):
  config = _tiny_config(num_steps=0)
  with pytest.raises(errors.ConfigError, match='train.num_steps=0'):
    train.train_and_evaluate(config, str(tmp_path))


def test_augmentation_flips_some_images_and_shifts_content():
  """Each image comes back as itself or its mirror (both occur in a batch of 64), and as itself
  moved by (dy, dx) within ±2 pixels with the background −1 filled in (some moved)."""
  images = jax.random.uniform(jax.random.PRNGKey(3), (64, 28, 28, 1), minval=-0.9, maxval=1)
  flipped = np.asarray(classifier_task.augment(images, jax.random.PRNGKey(0), random_flip=True,
                                               max_shift=0))
  originals = np.asarray(images)
  mirrored = [bool(np.array_equal(a, b[:, ::-1])) for a, b in zip(flipped, originals)]
  same = [bool(np.array_equal(a, b)) for a, b in zip(flipped, originals)]
  assert all(m or s for m, s in zip(mirrored, same)) and 10 < sum(mirrored) < 54
  shifted = np.asarray(classifier_task.augment(images, jax.random.PRNGKey(1), random_flip=False,
                                               max_shift=2))
  moved = 0
  for out, image in zip(shifted, originals):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    offsets = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(out, padded[dy:dy + 28, dx:dx + 28])]
    assert len(offsets) == 1
    moved += offsets[0] != (2, 2)
  assert moved > 40  # 24 of 25 offsets move the image


# ----------------------------------------------------------------------------- command line


def _main(workdir, *args, mode='train'):
  cmd = [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/fmnist_classifier.py',
         f'--workdir={workdir}', f'--mode={mode}', '--config.model.channels=(8,8)',
         '--config.model.feature_dim=16', '--config.input.num_train_examples=256',
         '--config.eval.num_examples=200', '--config.eval.batch_size=100', *args]
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True, timeout=300)


def test_command_line_train_evaluate_and_sample(tmp_path):
  workdir = str(tmp_path / 'cli')
  run = _main(workdir, '--config.train.num_steps=2', '--config.train.batch_size=16')
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result['num_steps'] == 2 and 0.0 <= result['test_accuracy'] <= 1.0
  assert result['num_test_examples'] == 200

  run = _main(workdir, mode='evaluate')
  assert run.returncode == 0, run.stderr[-3000:]
  evaluated = json.loads(run.stdout)
  assert evaluated['num_test_examples'] == 200
  # The feature-network path (uint8 images) scores exactly as the training's held-out batches.
  assert evaluated['test_accuracy'] == result['test_accuracy']

  run = _main(workdir, mode='sample')
  assert run.returncode == 1
  assert 'error: --mode=sample does not apply' in run.stderr
  assert 'Traceback' not in run.stderr
