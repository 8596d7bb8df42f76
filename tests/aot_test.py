"""--mode=compile: the loop's train step compiled by XLA:TPU for TPU topologies, on this CPU.

Needs libtpu (the test extra installs it: `jax[tpu]`); skipped, saying so, where it cannot be
installed for the interpreter.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from guidedflow import aot
from guidedflow import errors
from guidedflow import tasks
from tests import subprocess_env

REPO = subprocess_env.REPO
HAVE_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason=f'libtpu is not installed for Python {sys.version.split()[0]} '
    "(pip install -e '.[aot]')")


@pytest.mark.parametrize('name, generation, topology, chips', [
    ('v5p-64', 'v5p', 'v5p:2x4x4', 32),
    ('v5p-8', 'v5p', 'v5p:1x2x2', 4),
    ('v4-32', 'v4', 'v4:2x2x4', 16),
    ('v5e-32', 'v5e', 'v5e:4x8', 32),
    ('v5litepod-16', 'v5e', 'v5e:4x4', 16),
    ('v5p:4x4x2', 'v5p', 'v5p:4x4x2', 32),
])
def test_accelerator_types_become_topologies(name, generation, topology, chips):
  assert aot.parse_topology(name) == (generation, topology, chips)


@pytest.mark.parametrize('name', ['v9-8', 'v5p-12', 'tpu', None, 'v5p-9'])
def test_bad_topology_names_are_config_errors(name):
  with pytest.raises(errors.ConfigError):
    aot.parse_topology(name)


def test_collectives_are_counted_with_their_bytes():
  hlo = '\n'.join([
      '  %all-reduce.1 = (f32[], f32[32,32]{1,0:T(8,128)}, /*index=2*/bf16[8]{0}) all-reduce(%a, '
      '%b, %c), replica_groups={}',
      '  %ag = f32[4,128]{1,0} all-gather-start(%x), dimensions={0}',
      '  %agd = f32[4,128]{1,0} all-gather-done(%ag)',
      '  ROOT %rs.3 = bf16[64]{0} reduce-scatter(%y), dimensions={0}',
      '  %gte = f32[32] get-tuple-element(%all-reduce.1), index=1'])
  assert aot.collectives(hlo) == {
      'all-reduce': {'count': 1, 'bytes': 4 + 32 * 32 * 4 + 8 * 2},
      'all-gather': {'count': 1, 'bytes': 4 * 128 * 4},
      'reduce-scatter': {'count': 1, 'bytes': 64 * 2}}


def _config(mesh_shape):
  config = tiny.get_config()
  config.mesh.shape = mesh_shape
  config.mesh.min_shard_size = 0  # shard even the tiny model's kernels
  return config


@pytest.fixture(scope='module')
def v5e_2x2():
  if not HAVE_LIBTPU:
    pytest.skip(f'libtpu is not installed for Python {sys.version.split()[0]}')
  return aot.topology_devices('v5e:2x2')[3]


@needs_libtpu
def test_data_parallel_and_fsdp_compile_for_a_tpu_topology(v5e_2x2):
  figures = {}
  for name, shape in (('data', (4, 1, 1)), ('fsdp', (1, 4, 1))):
    config = _config(shape)
    figures[name] = aot.compile_train_step(tasks.get_task(config), config, (28, 28, 1),
                                           v5e_2x2)
  data, fsdp = figures['data'], figures['fsdp']
  assert data['devices'] == fsdp['devices'] == 4 and data['compiler_flops_per_device'] > 0
  assert data['analytic_flops_per_device'] == fsdp['analytic_flops_per_device'] > 0
  assert data['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  # The train state is replicated under data parallelism, split 4 ways under FSDP (all but the
  # few arrays whose dimensions 4 does not divide).
  assert 0.25 <= fsdp['argument_bytes'] / data['argument_bytes'] < 0.5, (fsdp, data)
  assert 'all-reduce' in data['collectives'] and 'all-gather' not in data['collectives']
  assert fsdp['collectives']['all-gather']['count'] > 0  # parameters gathered for use
  for figure in figures.values():
    assert figure['alias_bytes'] > 0  # the donated state is updated in place


@needs_libtpu
def test_a_config_that_does_not_fit_exits_with_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
       f'--workdir={tmp_path / "run"}', '--mode=compile', '--config.compile.topology=v5e:2x2',
       '--config.model.variant=XL/2', '--config.train.batch_size=512',
       '--config.compile.image_shape=64,64,4'],
      cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  subprocess_env.one_error_line(out, 'does not fit', 'fsdp')
  assert not (tmp_path / 'run').exists()  # nothing left behind


@needs_libtpu
def test_compile_mode_reports_and_writes_compile_json(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
       f'--workdir={tmp_path / "run"}', '--mode=compile', '--config.compile.topology=v5e-4'],
      cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report == json.loads((tmp_path / 'run' / 'compile.json').read_text())
  assert report['ici_topology'] == 'v5e:2x2' and report['chips'] == 4
  assert 0 < report['total_bytes'] < report['hbm_bytes_per_device'] and report['headroom'] > 0.9
  assert 'Ahead-of-time compile of the train step' in out.stderr


def test_latent_generator_compiles_on_latent_moments_without_its_autoencoder(v5e_2x2):
  """The ImageNet-256 latent recipe's step (scaled down): the batch is the cache's moments,
  z is drawn in the step, no autoencoder is loaded (its weights file does not exist here)."""
  from configs import imagenet256_latent  # pylint: disable=g-import-not-at-top
  config = imagenet256_latent.get_config('XL/2')
  config.model.variant = 'test/2'
  config.mesh.shape = (1, 4, 1)
  config.train.batch_size = 8
  task = tasks.get_task(config)
  assert set(task.abstract_batch(8, (32, 32, 4))) == {'mean', 'logvar', 'label'}
  figures = aot.compile_train_step(task, config, (32, 32, 4), v5e_2x2)
  assert figures['devices'] == 4 and figures['argument_bytes'] > 0
  assert not os.path.exists(config.autoencoder.weights or '')  # nothing was loaded


def test_latent_generator_without_its_latent_shape_is_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/imagenet256_latent.py:XL/2',
       f'--workdir={tmp_path / "run"}', '--mode=compile', '--config.compile.topology=v5p-64'],
      cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True, timeout=600)
  subprocess_env.one_error_line(out, '--config.compile.image_shape=32,32,4')
