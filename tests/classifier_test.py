"""The Fashion-MNIST feature network: model, short training, checkpoint loader, CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import fmnist_classifier
from guidedflow import input_pipeline
from guidedflow import train_classifier
from guidedflow.models.classifier import Classifier
from tests import subprocess_env

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


def _to_model(images_uint8):
  return jnp.asarray(images_uint8.astype(np.float32) / 127.5 - 1.0)


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
  workdir = str(tmp_path_factory.mktemp('classifier'))
  model, result = train_classifier._train(_tiny_config(), workdir)
  return workdir, model, result


def test_short_training_learns(trained):
  _, _, result = trained
  # 40 steps of 64 on 2000 images: far above chance (0.1); a broken gradient stays near it.
  assert result['train_accuracy'] > 0.5, result
  assert result['test_accuracy'] > 0.5, result
  assert result['num_test_examples'] == 1000 and result['steps'] == 40
  assert result['train_images_per_s'] > 0


def test_second_run_skips_training(trained):
  workdir, _, result = trained
  _, again = train_classifier._train(_tiny_config(), workdir)
  assert again['skipped'] is True
  assert again['test_accuracy'] == result['test_accuracy']


def test_interrupted_run_resumes_to_the_same_model(trained, tmp_path):
  workdir, model, result = trained
  copy = str(tmp_path / 'resumed')
  shutil.copytree(workdir, copy)
  # An interruption after the step-20 checkpoint: drop the final one (step 40).
  shutil.rmtree(os.path.join(copy, 'checkpoints', '40'))
  resumed_model, resumed = train_classifier._train(_tiny_config(), copy)
  assert resumed['steps_this_run'] == 20 and 'skipped' not in resumed
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(resumed_model, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed['test_accuracy'] == result['test_accuracy']


def test_checkpoint_round_trip(trained):
  workdir, model, result = trained
  network = train_classifier.load_feature_network(workdir, batch_size=64)
  assert network.name == 'fmnist_classifier'
  assert network.image_shape == (28, 28, 1)
  assert network.meta['num_classes'] == 10 and network.meta['feature_dim'] == 32
  assert network.meta['test_accuracy'] == result['test_accuracy']
  # Parameters restored bitwise.
  saved = jax.tree.leaves(nnx.state(model, nnx.Param))
  loaded = jax.tree.leaves(network.params)
  assert len(saved) == len(loaded)
  for a, b in zip(saved, loaded):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  images, labels = _test_images(100)  # 64 + a padded batch of 36
  out = network(images)
  assert out['features'].shape == (100, 32) and out['features'].dtype == np.float32
  assert out['logits'].shape == (100, 10) and out['logits'].dtype == np.float32
  features, logits = model.features_and_logits(_to_model(images))
  np.testing.assert_allclose(out['logits'], np.asarray(logits), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['features'], np.asarray(features), rtol=1e-5, atol=1e-5)
  # Its accuracy on these images agrees with the trained model's.
  assert np.mean(out['logits'].argmax(-1) == labels) > 0.5


def test_feature_network_compiles_once_for_any_count(trained):
  workdir, _, _ = trained
  network = train_classifier.load_feature_network(workdir, batch_size=16)
  images, _ = _test_images(40)
  one = network(images[:1])
  many = network(images)  # 16 + 16 + padded 8
  none = network(images[:0])
  assert network.num_traces == 1
  assert one['logits'].shape == (1, 10) and many['logits'].shape == (40, 10)
  assert none['features'].shape == (0, 32) and none['logits'].shape == (0, 10)
  # Padding never changes an image's outputs.
  np.testing.assert_allclose(one['features'], many['features'][:1], rtol=1e-5, atol=1e-6)


def test_wrong_images_raise_value_error(trained):
  network = train_classifier.load_feature_network(trained[0], batch_size=16)
  with pytest.raises(ValueError, match=r'\(N, 28, 28, 1\)'):
    network(np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match=r'\(N, 28, 28, 1\)'):
    network(np.zeros((2, 28, 28), np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    network(np.zeros((2, 28, 28, 1), np.float32))


def test_missing_checkpoint_error_says_how_to_train(tmp_path):
  workdir = str(tmp_path / 'no_classifier')
  with pytest.raises(train_classifier.FeatureNetworkNotFoundError) as info:
    train_classifier.load_feature_network(workdir)
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert f'no Fashion-MNIST classifier checkpoint in {workdir}' in message
  assert (f'python -m guidedflow.main --config configs/fmnist_classifier.py --workdir {workdir}'
          in message)
  assert 'minutes on a 2-core CPU' in message
  # An empty checkpoints directory is no checkpoint either.
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(train_classifier.FeatureNetworkNotFoundError, match='train one with'):
    train_classifier.load_feature_network(workdir)


def test_config_errors_name_the_key(tmp_path):
  config = _tiny_config(num_steps=0)
  with pytest.raises(train_classifier.ConfigError, match='train.num_steps=0'):
    train_classifier.train_and_evaluate(config, str(tmp_path))


def test_changed_model_config_refuses_the_workdir(trained):
  config = _tiny_config()
  config.model.feature_dim = 48
  with pytest.raises(train_classifier.ConfigError, match='Use another --workdir'):
    train_classifier.train_and_evaluate(config, trained[0])


def test_augmentation_flips_and_shifts_keep_shape():
  images = jnp.linspace(-1, 1, 2 * 28 * 28).reshape(2, 28, 28, 1)
  flipped = train_classifier._augment(images, jax.random.PRNGKey(0), random_flip=True,
                                      max_shift=0)
  for a, b in zip(np.asarray(flipped), np.asarray(images)):  # each image: itself or its mirror
    assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
  shifted = train_classifier._augment(images, jax.random.PRNGKey(0), random_flip=False,
                                      max_shift=2)
  assert shifted.shape == images.shape
  assert float(shifted.min()) >= -1.0 and float(shifted.max()) <= 1.0


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
  assert result['steps'] == 2 and 0.0 <= result['test_accuracy'] <= 1.0
  assert result['num_test_examples'] == 200

  run = _main(workdir, mode='evaluate')
  assert run.returncode == 0, run.stderr[-3000:]
  evaluated = json.loads(run.stdout)
  assert evaluated['num_test_examples'] == 200
  # The checkpoint's network scores the same images as at the end of training (uint8 input
  # there, float batches here: allow one near-tie flipping).
  assert abs(evaluated['test_accuracy'] - result['test_accuracy']) <= 1 / 200 + 1e-6

  run = _main(workdir, mode='sample')
  assert run.returncode == 1
  assert 'error: --mode=sample does not apply' in run.stderr
  assert 'Traceback' not in run.stderr
