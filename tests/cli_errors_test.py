"""Mistakes a user makes on the command line end in one `error:` line and exit status 1.

Each case runs `python -m guidedflow.main` in a subprocess and checks its exit status, that
stderr has exactly one line starting `error:` that names the cause, and no traceback. Config
and data mistakes fail before anything compiles; the sampling case trains configs/tiny.py once.
"""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from guidedflow import input_pipeline
from guidedflow.tasks import registry
from tests import subprocess_env

# One worker runs this module and tests/reliability_test.py (`--dist loadgroup` in .ci/run): the
# tiny run both start from (conftest.py's tiny_run_dir, a subprocess) is then trained once.
pytestmark = pytest.mark.xdist_group('tiny_run')

REPO = subprocess_env.REPO
_FASHION_MNIST = input_pipeline.FASHION_MNIST_DIR


def _main(*args, workdir):
  return subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--workdir', str(workdir), *args], cwd=REPO,
      env=subprocess_env.env(), capture_output=True, text=True, timeout=300)


_one_error = subprocess_env.one_error_line


# ---------------------------------------------------------------------------------------------
# Config mistakes (issue 17, part 5): they fail while the flags are parsed.


@pytest.mark.parametrize('override, fragments', [
    ('--config.train.nonsense=1',
     ("--config.train.nonsense=1: config.train has no key 'nonsense'", 'its keys: ',
      'num_steps')),
    ('--config.train.num_step=1', ("did you mean 'num_steps'?",)),
    ('--config.trian.num_steps=1', ("config has no key 'trian'", "did you mean 'train'?")),
], ids=['unknown', 'misspelled', 'misspelled_group'])
def test_unknown_config_key(tmp_path, override, fragments):
  proc = _main('--config', 'configs/tiny.py', override, workdir=tmp_path / 'run')
  _one_error(proc, *fragments)
  assert proc.returncode == 1
  assert not (tmp_path / 'run').exists()


def test_missing_config_file(tmp_path):
  proc = _main('--config', 'configs/tini.py', workdir=tmp_path / 'run')
  _one_error(proc, 'configs/tini.py does not exist', 'did you mean configs/tiny.py?',
             'run from the repository root')


def test_config_file_with_syntax_error(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text('from configs import tiny\n\n\ndef get_config(:\n  return tiny.get_config()\n')
  proc = _main('--config', str(path), workdir=tmp_path / 'run')
  _one_error(proc, f'SyntaxError at {path}:4', 'fix the config file')


def test_config_file_whose_get_config_raises(tmp_path):
  path = tmp_path / 'raises.py'
  path.write_text('from configs import tiny\n\n\ndef get_config(variant):\n'
                  '  if variant != "small":\n'
                  '    raise ValueError(f"unknown variant {variant!r}")\n'
                  '  return tiny.get_config()\n')
  proc = _main('--config', f'{path}:huge', workdir=tmp_path / 'run')
  _one_error(proc, "get_config('huge') raised ValueError", f'{path}:6',
             "unknown variant 'huge'", 'or its argument')


@pytest.mark.parametrize('value', ['inf', 'nan'])
def test_non_finite_learning_rate(tmp_path, value):
  proc = _main('--config', 'configs/tiny.py', f'--config.optim.learning_rate={value}',
               workdir=tmp_path / 'run')
  _one_error(proc, f'config.optim.learning_rate={value} must be a finite number > 0')
  assert 'First step' not in proc.stderr  # refused before compiling


@pytest.mark.parametrize('key, value, fragment', [
    ('optim.weight_decay', float('inf'), 'finite number >= 0'),
    ('optim.grad_clip_norm', float('nan'), 'finite number >= 0'),
    ('optim.b1', 1.0, 'must be in [0, 1)'),
    ('optim.b2', -0.5, 'finite number >= 0'),
    ('sampling.sigma', -1.0, 'finite number >= 0'),
    ('loss.t_eps', 0.5, 'must be < 0.5'),
])
def test_other_float_keys_are_checked_before_anything_runs(key, value, fragment):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from guidedflow import errors  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  group, name = key.split('.')
  config[group][name] = value
  with pytest.raises(errors.ConfigError, match=re.escape(f'config.{key}=')) as raised:
    registry.validate(config)
  assert fragment in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Labels outside [0, num_classes) (part 5): the fix the labels suggest.


def _write_idx(directory, prefix, labels):
  images = np.zeros((len(labels), 28, 28), np.uint8)
  for kind, magic, array in (('images-idx3', 2051, images), ('labels-idx1', 2049,
                                                              np.asarray(labels, np.uint8))):
    header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
    with open(os.path.join(directory, f'{prefix}-{kind}-ubyte.gz'), 'wb') as f:
      f.write(gzip.compress(header + array.tobytes()))


@pytest.mark.parametrize('labels, num_classes, fragments', [
    (np.where(np.arange(16) < 3, 255, np.arange(16) % 10), 10,
     ('3 of 16 examples have labels outside [0, 9]: 255 (3 examples)', 'Drop or remap')),
    (np.arange(16) % 10 + 1, 10, ('labels 1..10: they look 1-based', 'Subtract 1')),
    (np.arange(16) % 12, 10, ('labels 0..11', '--config.input.num_classes=12')),
], ids=['unlabeled_255', 'one_based', 'dense_0_to_11'])
def test_labels_out_of_range(tmp_path, labels, num_classes, fragments):
  _write_idx(tmp_path, 'train', labels)
  _write_idx(tmp_path, 't10k', np.arange(16) % 10)
  proc = _main('--config', 'configs/tiny.py', f'--config.input.data_dir={tmp_path}',
               f'--config.input.num_classes={num_classes}', workdir=tmp_path / 'run')
  line = _one_error(proc, *fragments)
  assert 'num_classes=256' not in line


def test_negative_labels_are_counted():
  with pytest.raises(input_pipeline.DataError, match=r'2 of 4 examples .*: -1 \(2 examples\)'):
    input_pipeline.ArrayDataset(np.zeros((4, 2, 2), np.uint8), [0, -1, 3, -1], num_classes=10)


# ---------------------------------------------------------------------------------------------
# Late discoveries (part 6): a split the run reads only at the end is checked at start-up.


def test_missing_eval_split_fails_before_training(tmp_path):
  data = tmp_path / 'train_only'
  data.mkdir()
  for name in os.listdir(_FASHION_MNIST):
    if name.startswith('train-'):
      os.symlink(os.path.join(_FASHION_MNIST, name), data / name)
  workdir = tmp_path / 'run'
  proc = _main('--config', 'configs/tiny.py', f'--config.input.data_dir={data}',
               workdir=workdir)
  _one_error(proc, "the eval split 'test'", 't10k-images-idx3-ubyte.gz', 'is missing from')
  assert 'First step' not in proc.stderr
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')


# ---------------------------------------------------------------------------------------------
# --mode=sample with num_samples not a multiple of the classes (part 8).


@pytest.fixture(scope='module')
def trained_workdir(tiny_run_dir, tmp_path_factory):
  """A copy of the finished tiny run (tests/conftest.py), which these tests sample into."""
  workdir = tmp_path_factory.mktemp('tiny') / 'run'
  shutil.copytree(tiny_run_dir, workdir)
  return workdir


def _sample(workdir, num_samples):
  proc = _main('--config', 'configs/tiny.py', '--mode=sample',
               f'--config.sampling.num_samples={num_samples}', workdir=workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = workdir / 'samples'
  labels = np.load(samples / 'samples.npz')['labels']
  grid = np.asarray(Image.open(samples / 'grid.png'))
  assert os.path.getmtime(samples / 'grid.png') >= os.path.getmtime(samples / 'samples.npz')
  return proc, labels, grid


def test_sample_fewer_than_the_classes_logs_them_and_refreshes_the_grid(trained_workdir):
  _, labels, grid = _sample(trained_workdir, 20)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 2))
  cell = 2 * (28 + 1)  # upscale 2, one pixel apart
  assert grid.shape[:2] == (10 * cell + 2, 2 * cell + 2)
  proc, labels, grid = _sample(trained_workdir, 7)
  np.testing.assert_array_equal(labels, np.arange(7))  # 7 distinct classes, one each
  assert 'only classes 0-6 are drawn' in proc.stderr
  assert grid.shape[:2] == (7 * cell + 2, 1 * cell + 2)  # this run's grid: 7 rows, 1 column


def test_sample_reads_no_data(trained_workdir, tmp_path):
  """Inference rebuilds the model from the shape the run saved (run.json): --mode=sample works
  with the dataset gone; a workdir without run.json (an older version's) needs the data."""
  assert json.loads((trained_workdir / 'run.json').read_text()) == {
      'task': 'generate', 'input_shape': [28, 28, 1]}
  gone = f'--config.input.data_dir={tmp_path / "no_data"}'
  proc = _main('--config', 'configs/tiny.py', '--mode=sample', gone,
               '--config.sampling.num_samples=10', workdir=trained_workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  older = tmp_path / 'older'
  shutil.copytree(trained_workdir, older)
  (older / 'run.json').unlink()
  proc = _main('--config', 'configs/tiny.py', '--mode=sample', gone,
               '--config.sampling.num_samples=10', workdir=older)
  _one_error(proc, 'train-images-idx3-ubyte.gz')


@pytest.mark.parametrize('override, fragment', [
    ('--config.sampling.grid_classes=3,42', 'config.sampling.grid_classes=(3, 42) must be None'),
    ('--config.sampling.grid_guidance_scales=abc', 'grid_guidance_scales='),
], ids=['class_out_of_range', 'scale_not_a_number'])
def test_grid_keys_are_checked_before_the_first_step(tmp_path, override, fragment):
  """Keys read only at the first grid or the end fail at start-up, before any training."""
  proc = _main('--config', 'configs/tiny.py', '--config.train.sample_every_steps=2', override,
               workdir=tmp_path / 'run')
  _one_error(proc, fragment)
  assert proc.returncode == 1 and not (tmp_path / 'run').exists()


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_a_backend_that_is_not_here_is_one_line(tmp_path, platform):
  """JAX_PLATFORMS naming a backend this machine lacks: one line, not JAX's traceback."""
  proc = subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
       '--workdir', str(tmp_path / 'run')], cwd=REPO,
      env={**subprocess_env.env(), 'JAX_PLATFORMS': platform}, capture_output=True, text=True,
      timeout=300)
  _one_error(proc, f"JAX_PLATFORMS='{platform}' names", 'unset JAX_PLATFORMS')
  assert proc.returncode == 1 and not (tmp_path / 'run').exists()


def test_a_sample_count_beyond_memory_is_refused_up_front(trained_workdir):
  """--mode=sample holds its uint8 samples in memory: 10^8 Fashion-MNIST samples (73 GiB) are
  refused before anything is sampled, naming the key that allows more."""
  before = sorted(os.listdir(trained_workdir))
  proc = _main('--config', 'configs/tiny.py', '--mode=sample',
               '--config.sampling.num_samples=100000000', workdir=trained_workdir)
  _one_error(proc, 'config.sampling.num_samples=100000000 makes 73.0 GiB', '28x28x1',
             'max_output_gib=4')
  assert 'Sampled' not in proc.stderr and sorted(os.listdir(trained_workdir)) == before


def test_compile_of_an_auxiliary_task_reads_only_its_own_keys(tmp_path):
  """--mode=compile of the classifier (whose config has no input.space) gets as far as the
  target: a bad topology is its one line."""
  proc = _main('--config', 'configs/fmnist_classifier.py', '--mode=compile',
               '--config.compile.topology=v9-8', workdir=tmp_path / 'run')
  _one_error(proc, "config.compile.topology='v9-8' is not a TPU accelerator type")
