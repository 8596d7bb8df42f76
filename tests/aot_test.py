"""--mode=compile: the loop's train step compiled by XLA:TPU for TPU topologies, on this CPU.

Needs libtpu (the test extra installs it: `jax[tpu]`); skipped, saying so, where it cannot be
installed for the interpreter.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import tiny
from guidedflow import aot
from guidedflow import errors
from guidedflow import hlo_collectives
from guidedflow import sharding
from guidedflow import text_encoders
from guidedflow import train_state
from guidedflow.tasks import registry
from tests import subprocess_env

REPO = subprocess_env.REPO
HAVE_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason=f'libtpu is not installed for Python {sys.version.split()[0]} '
    "(pip install -e '.[aot]')")


@pytest.mark.parametrize('name, generation, topology, chips', [
    ('v5p-64', 'v5p', 'v5p:2x4x4', 32),
    ('v5p-8', 'v5p', 'v5p:2x2x1', 4),
    ('v4-8', 'v4', 'v4:2x2x1', 4),
    ('v5litepod-1', 'v5e', 'v5e:1x1', 1),
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


def _config(mesh_shape, variant='test/7', batch_size=8):
  config = tiny.get_config()
  config.model.variant = variant
  config.train.batch_size = batch_size
  config.mesh.shape = mesh_shape
  return config


@pytest.fixture(scope='module')
def v5e_2x2():
  if not HAVE_LIBTPU:
    pytest.skip(f'libtpu is not installed for Python {sys.version.split()[0]}')
  return aot.topology_devices('v5e:2x2')[3]


def _fsdp_sharded_shapes(config, devices, min_size):
  """Per-layer shapes (dims sorted, 1s dropped) of the parameters split over 'fsdp' that have
  at least `min_size` elements per layer."""
  is_variable = lambda x: isinstance(x, nnx.Variable)  # pylint: disable=unnecessary-lambda-assignment
  model = nnx.eval_shape(registry.get_task(config).model_constructor((28, 28, 1)))
  params = nnx.state(model, nnx.Param)
  specs = sharding.state_shardings(params, train_state.make_mesh(config, devices))
  shapes = set()
  for param, spec in zip(jax.tree.leaves(params, is_leaf=is_variable),
                         jax.tree.leaves(specs, is_leaf=is_variable)):
    names = param.get_metadata()['out_sharding']
    shape = _dims(n for n, name in zip(param.shape, names) if name != 'layers')
    if 'fsdp' in jax.tree.leaves(tuple(spec.get_value().spec)) and math.prod(shape) >= min_size:
      shapes.add(shape)
  return shapes


def _dims(dims):
  return tuple(sorted(d for d in dims if d != 1))


@needs_libtpu
def test_data_parallel_and_fsdp_compile_for_a_tpu_topology(v5e_2x2):
  """DiT-XS/4 (6 blocks of width 192; 64 images of 7×7 tokens: per-device tokens ≫ width, the
  regime of real runs) under data parallelism and FSDP over 4 TPU v5e chips."""
  figures = {}
  for name, shape in (('data', (4, 1, 1)), ('fsdp', (1, 4, 1))):
    config = _config(shape, 'XS/4', 64)
    figures[name] = aot.compile_train_step(registry.get_task(config), config, (28, 28, 1),
                                           v5e_2x2, keep_hlo=True)
  data, fsdp = figures['data'], figures['fsdp']
  assert data['devices'] == fsdp['devices'] == 4 and data['compiler_flops_per_device'] > 0
  assert data['analytic_flops_per_device'] == fsdp['analytic_flops_per_device'] > 0
  assert data['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert data['loop_trip_counts_known'] and fsdp['loop_trip_counts_known']
  # The train state is replicated under data parallelism, split 4 ways under FSDP (all but the
  # small arrays under mesh.min_shard_size).
  assert 0.25 <= fsdp['argument_bytes'] / data['argument_bytes'] < 0.3, (fsdp, data)
  assert set(data['collectives']) == {'all-reduce'}  # the gradients, nothing else
  # FSDP: parameters all-gathered for use in every block (forward and backward, 6 blocks) and
  # gradients reduce-scattered; no all-reduce of a whole fsdp-sharded parameter (its gradient
  # reduced everywhere, then sliced), and no activation all-reduces. (XLA:TPU all-reduces two
  # tiny gradients whole, combined: the 16×192 patch embedding and final projection, where
  # latency, not bytes, decides; the check covers parameters of ≥ 2^15 elements, i.e. every
  # block weight.)
  assert fsdp['collectives']['all-gather']['count'] >= 2 * 6
  assert fsdp['collectives']['reduce-scatter']['count'] >= 1
  sharded = _fsdp_sharded_shapes(_config((1, 4, 1), 'XS/4', 64), v5e_2x2, 2**15)
  # proj and time_mlp2, final modulation, qkv, fc1 and fc2, the blocks' modulation:
  assert sharded == {(192, 192), (192, 384), (192, 576), (192, 768), (192, 1152)}
  records, _ = hlo_collectives.instances(fsdp['hlo'])
  for record in records:
    if record['op'] == 'all-reduce':
      for dims in re.findall(r'\[([0-9,]*)\]', record['type']):
        assert _dims(int(d) for d in dims.split(',') if d) not in sharded, record
  all_reduced = {k: v['collectives']['all-reduce']['bytes'] for k, v in figures.items()}
  assert all_reduced['fsdp'] < 0.05 * all_reduced['data'], all_reduced
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
  assert 'Ahead-of-time compile of the train step and the CFG sampler' in out.stderr
  # The sampler: tiny.py's 20 samples, data parallel over 4 chips. Each device samples its own
  # 5 (the doubled CFG rows side by side): no collective at all.
  sampler = report['sampler']
  assert sampler['batch_size'] == 20 and not sampler['decodes']
  assert sampler['collectives'] == {}, sampler['collectives']
  assert sampler['with_train_state_bytes'] == (report['argument_bytes'] + sampler['output_bytes']
                                               + sampler['temp_bytes'])


def test_latent_shape_follows_from_the_sd_vae_and_is_asked_for_otherwise(tmp_path):
  from configs import imagenet256_latent  # pylint: disable=g-import-not-at-top
  assert aot._latent_shape(imagenet256_latent.get_config('XL/2')) == (32, 32, 4)  # pylint: disable=protected-access
  # A guidedflow autoencoder's sizes live in its run (not read by a compile): one line.
  out = subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/fashion_mnist_latent.py',
       f'--workdir={tmp_path / "run"}', '--mode=compile', '--config.compile.topology=v5e-4'],
      cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True, timeout=600)
  subprocess_env.one_error_line(out, '--config.compile.image_shape=')
  assert not (tmp_path / 'run').exists()


@needs_libtpu
def test_fsdp_sampler_gathers_the_weights_once_per_call(v5e_2x2):
  """Under FSDP the sampler gathers the weights once (sampling.gather_weights, the default),
  not at every model evaluation: its all-gathers do not grow with the number of steps."""
  gathers = {}
  for gather in (True, False):
    for steps in (2, 4):
      config = _config((1, 4, 1), 'XS/4', 64)
      config.sampling.update(method='euler', num_steps=steps, batch_size=8, gather_weights=gather)
      sampler = aot.compile_sampler(registry.get_task(config), config, (28, 28, 1), v5e_2x2)
      gathers[gather, steps] = sampler['collectives']['all-gather']['count']
  assert gathers[True, 2] == gathers[True, 4], gathers
  assert gathers[False, 4] > gathers[False, 2] >= 2 * 6, gathers  # per step, per block


@needs_libtpu
def test_megacore_generations_have_one_device_per_chip():
  """A real v4 or v5p chip is one (megacore) device; libtpu's compile-only v4 would otherwise
  describe its two TensorCores as two devices."""
  for name, chips in (('v4-32', 16), ('v5p-16', 8), ('v5litepod-8', 8)):
    _, _, count, devices = aot.topology_devices(name)
    assert count == chips == len(devices), (name, len(devices))


@needs_libtpu
@pytest.mark.parametrize('name, chips', [('v4-8', 4), ('v5p-8', 4), ('v5litepod-1', 1),
                                         ('v6e-1', 1), ('v6e-4', 4)])
def test_the_smallest_slice_of_each_generation_is_described(name, chips):
  """libtpu accepts the topology of every generation's smallest real slice (v5p-8 as 2x2x1,
  single-chip v5e / v6e with a one-chip host)."""
  _, _, count, devices = aot.topology_devices(name)
  assert count == chips == len(devices)


def test_text_to_image_latent_recipe_compiles_with_its_frozen_encoder_sharded(v5e_2x2):
  """configs/t2i_latent.py scaled down (the latent recipes' compile): the cross-attention DiT's
  step on latent moments (no autoencoder loaded) and
  cached text features, its CFG sampler on the text condition (∅ of the same shapes), and the
  frozen encoder's forward pass sharded on the same mesh — from a preset's name, no weights."""
  from configs import t2i_latent  # pylint: disable=g-import-not-at-top
  config = t2i_latent.get_config('test/2')
  config.text.encoder, config.text.weights, config.text.max_length = 'clip', 'test', None
  config.text.batch_size = 6
  config.mesh.shape = (1, 4, 1)
  config.train.batch_size = 8
  config.sampling.batch_size, config.sampling.num_steps = 4, 2
  config.compile.topology = 'v5e:2x2'
  config.compile.image_shape = (4, 4, 4)
  registry.validate(config)
  task = registry.get_task(config)
  batch = task.abstract_batch(8, (4, 4, 4))
  assert batch['text_hidden'][0] == (8, 16, 32) and 'label' not in batch  # CLIP 'test' preset
  assert {'mean', 'logvar'} <= set(batch)  # the latent cache's moments; z is drawn in the step
  report = aot.report(task, config, (4, 4, 4))
  assert report['devices'] == 4 and report['sampler']['batch_size'] == 4
  # Its sampler decodes to pixels with the SD-VAE's architecture, weights abstract: the f32
  # decoder (49.5M parameters; jit drops the unused encoder), replicated; nothing was loaded.
  assert report['sampler']['decodes'] and report['sampler']['argument_bytes'] > 4 * 49e6
  assert not os.path.exists(config.autoencoder.weights or '')
  encoder = report['text_encoder']
  assert encoder['batch_size'] == 8 and encoder['tokens'] == 16  # 6 rounded up to the shards
  assert encoder['parameters'] == sum(
      math.prod(x.shape) for x in jax.tree.leaves(nnx.state(text_encoders.abstract(config)[0])))
  assert encoder['with_train_state_bytes'] == report['argument_bytes'] + encoder['total_bytes']
  assert report['analytic_flops_per_device'] > 0  # the text DiT's count, through its wrapper
