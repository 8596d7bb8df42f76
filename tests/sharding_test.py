"""Tests for guidedflow.sharding on 8 simulated CPU devices.

conftest.py imports jax with one CPU device, so the multi-device checks run in one child
process started with 8 devices in XLA_FLAGS, which reports what it saw as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from guidedflow import sharding

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a subprocess or
# a training run) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('sharding')

_CHILD = textwrap.dedent(r'''
    import json, os
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from guidedflow import sharding
    from guidedflow.models import create_model

    cache = os.environ.get('GUIDEDFLOW_JAX_CACHE')
    if cache:
      jax.config.update('jax_compilation_cache_dir', cache)
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

    def spec(a):
      return [list(e) if isinstance(e, tuple) else e for e in a.sharding.spec]

    def create_sharded_model(model_ctor, mesh):
      """The model with every parameter created in its shards (as the train state is)."""
      graphdef, abstract = nnx.split(nnx.eval_shape(model_ctor))
      shardings = sharding.state_shardings(abstract, mesh, min_shard_size=0)
      with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(model_ctor()), out_shardings=shardings)()
      return nnx.merge(graphdef, state)

    def dit(scan_blocks=True):
      return create_model('dit', variant='test/4', input_size=16, in_channels=4,
                          num_classes=10, width=64, depth=2, scan_blocks=scan_blocks,
                          rngs=nnx.Rngs(0))

    report = {'num_devices': jax.device_count()}
    for shape, scan_blocks in [((2, 4, 1), True), ((1, 4, 2), True), ((1, 4, 2), False)]:
      mesh = sharding.make_mesh(shape)
      model = create_sharded_model(lambda: dit(scan_blocks), mesh)
      # Scanned: one stacked module, parameters (depth, ...); unscanned: blocks[0].
      block = model.blocks if scan_blocks else model.blocks[0]
      fc1 = block.fc1.kernel[...]
      shape = shape if scan_blocks else ('unscanned',) + shape
      report[str(shape)] = {
          'mesh': dict(mesh.shape),
          'fc1': spec(fc1), 'fc1_shard': list(fc1.addressable_shards[0].data.shape),
          'fc2': spec(block.fc2.kernel[...]),
          'qkv': spec(block.attn.qkv.kernel[...]),
          'proj': spec(block.attn.proj.kernel[...]),
          'modulation': spec(block.modulation.kernel[...]),
          'label': spec(model.label_embed.embedding[...]),
          'patch': spec(model.patch_embed.kernel[...]),
      }
      # Sharded forward (batch over data × fsdp) equals the same model on one device.
      params = nnx.state(model, nnx.Param)
      leaves, treedef = jax.tree.flatten(params)
      keys = jax.random.split(jax.random.key(1), len(leaves))
      nnx.update(model, jax.tree.unflatten(
          treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
      host_state = jax.device_get(nnx.state(model))
      local = nnx.merge(nnx.graphdef(model), jax.device_put(host_state, jax.devices()[0]))
      x = jax.random.normal(jax.random.key(2), (8, 16, 16, 4))
      t = jnp.linspace(0.0, 1.0, 8)
      y = jnp.arange(8) % 11
      forward = nnx.jit(lambda m, x, t, y: m(x, t, y))
      out = forward(model, jax.device_put(x, sharding.batch_sharding(mesh)),
                    jax.device_put(t, sharding.batch_sharding(mesh)),
                    jax.device_put(y, sharding.batch_sharding(mesh)))
      ref = forward(local, x, t, y)
      report[str(shape)]['forward_max_diff'] = float(np.abs(np.asarray(out) - np.asarray(ref)).max())
      report[str(shape)]['forward_max'] = float(jnp.abs(ref).max())
      report[str(shape)]['out_devices'] = len(out.sharding.device_set)

    mesh = sharding.make_mesh((1, 4, 2))
    unet = create_sharded_model(lambda: create_model(
        'unet', input_size=16, in_channels=1, num_classes=10, channels=(8, 16),
        num_residual_layers=1, rngs=nnx.Rngs(0)), mesh)
    report['unet_down'] = spec(unet.encoders[0].downsample.kernel[...])
    report['unet_final'] = spec(unet.final_conv.kernel[...])  # 1 output channel: replicated

    # Indivisible dims replicate; a mesh axis is not used twice in one spec.
    rules = (('classes', 'fsdp'),) + sharding.DEFAULT_RULES
    for num_classes in (10, 7):  # 11 rows (not divisible by 4) and 8 rows
      abstract = nnx.eval_shape(lambda: create_model(
          'dit', variant='test/4', input_size=16, in_channels=4, num_classes=num_classes,
          width=64, rngs=nnx.Rngs(0)))
      shardings = sharding.state_shardings(nnx.state(abstract), mesh, rules, min_shard_size=0)
      report[f'label_{num_classes}'] = [
          list(e) if isinstance(e, tuple) else e
          for e in shardings['label_embed']['embedding'].get_value().spec]
    # Default: parameters under MIN_SHARD_SIZE elements (biases, the 11 x 64 label table)
    # stay replicated; the (64, 256) MLP kernel is sharded.
    shardings = sharding.state_shardings(nnx.state(abstract), mesh)
    report['default_small'] = {
        'label': list(shardings['label_embed']['embedding'].get_value().spec),
        'fc1_bias': list(shardings['blocks']['fc1']['bias'].get_value().spec),
        'fc1': list(shardings['blocks']['fc1']['kernel'].get_value().spec)}

    for bad in [(3, 1, 1), (-1, 3, 1), (2, 2)]:
      try:
        sharding.make_mesh(bad)
        report[f'error_{bad}'] = None
      except ValueError as e:
        report[f'error_{bad}'] = str(e)
    report['auto_shape'] = dict(sharding.make_mesh((-1, 2, 2)).shape)
    print('REPORT' + json.dumps(report))
''')


@pytest.fixture(scope='module')
def report():
  env = dict(os.environ)
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  env['GUIDEDFLOW_JAX_CACHE'] = os.path.abspath(
      os.path.join(os.path.dirname(__file__), '..', '.jax_cache'))
  result = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [ln for ln in result.stdout.splitlines() if ln.startswith('REPORT')][-1]
  return json.loads(line[len('REPORT'):])


def test_eight_devices(report):
  assert report['num_devices'] == 8


@pytest.mark.parametrize('shape', ['(2, 4, 1)', '(1, 4, 2)', "('unscanned', 1, 4, 2)"])
def test_large_kernels_are_sharded(report, shape):
  r = report[shape]
  # Stacked (scanned) blocks: the leading 'layers' axis is replicated, the rest as unstacked.
  layers = [] if 'unscanned' in shape else [None]
  assert r['fc1'] == layers + ['fsdp', 'tensor']
  assert r['fc2'] == layers + ['tensor', 'fsdp']
  assert r['qkv'] == layers + ['fsdp', 'tensor']
  assert r['proj'] == layers + ['tensor', 'fsdp']
  assert r['modulation'] == layers + ['fsdp', 'tensor']
  assert r['label'] == [None, 'fsdp']
  assert r['patch'] == [None, 'fsdp']
  # (64, 256) kernel per block: width over fsdp = 4, MLP hidden over tensor; both blocks' slices.
  assert r['fc1_shard'] == [2] * len(layers) + [64 // 4, 256 // r['mesh']['tensor']]


@pytest.mark.parametrize('shape', ['(2, 4, 1)', '(1, 4, 2)', "('unscanned', 1, 4, 2)"])
def test_sharded_forward_matches_single_device(report, shape):
  r = report[shape]
  assert r['forward_max'] > 1e-3
  assert r['forward_max_diff'] < 1e-4 * max(1.0, r['forward_max'])
  assert r['out_devices'] == 8


def test_unet_conv_kernels(report):
  assert report['unet_down'] == [None, None, 'fsdp', 'tensor']
  assert report['unet_final'] == [None, None, 'fsdp', None]


def test_indivisible_dims_replicate_and_axes_not_reused(report):
  assert report['label_10'] == [None, 'fsdp']   # 11 rows: not divisible by fsdp = 4
  assert report['label_7'] == ['fsdp', None]    # 8 rows take fsdp; width can't reuse it


def test_small_parameters_replicate_by_default(report):
  small = report['default_small']
  assert all(e is None for e in small['label']) and all(e is None for e in small['fc1_bias'])
  assert small['fc1'] == [None, 'fsdp', 'tensor']


def test_make_mesh(report):
  assert 'needs 3 devices, but 8 are available' in report['error_(3, 1, 1)']
  assert 'not divisible by 3' in report['error_(-1, 3, 1)']
  assert 'must have 3 entries' in report['error_(2, 2)']
  assert report['auto_shape'] == {'data': 2, 'fsdp': 2, 'tensor': 2}


# ---- Single-process checks (no devices needed) ------------------------------------------------


def test_mesh_spec_maps_logical_names():
  assert sharding.mesh_spec(('embed', 'mlp'), sharding.DEFAULT_RULES) == P('fsdp', 'tensor')
  assert sharding.mesh_spec(('mlp', 'heads'), sharding.DEFAULT_RULES) == P('tensor', None)  # no reuse
  assert sharding.mesh_spec((None, None, 'conv_in', 'conv_out'), sharding.DEFAULT_RULES) == P(
      None, None, 'fsdp', 'tensor')
  assert sharding.mesh_spec(('classes', 'unknown'), sharding.DEFAULT_RULES) == P(None, None)
  assert sharding.mesh_spec(None, sharding.DEFAULT_RULES) == P()
  assert sharding.mesh_spec(('embed',), (('embed', ('data', 'fsdp')),)) == P(
      ('data', 'fsdp'))


def test_single_device_mesh_and_shardings():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == sharding.MESH_AXES
  assert sharding.batch_sharding(mesh).spec == P(('data', 'fsdp'))
  assert sharding.replicated(mesh).spec == P()


def test_initialize_distributed_decides_from_mode_and_environment(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_JOB_ID'):
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(sharding, '_on_cloud_tpu_vm', lambda: False)
  assert not sharding.initialize_distributed('off', '127.0.0.1:1', 2, 0)
  assert not sharding.initialize_distributed('auto')  # nothing says there are several processes
  assert not calls
  with pytest.raises(ValueError, match='one of'):
    sharding.initialize_distributed('yes')
  with pytest.raises(ValueError, match='JAX_NUM_PROCESSES and JAX_PROCESS_ID'):
    sharding.initialize_distributed('auto', '127.0.0.1:1234')
  with pytest.raises(ValueError, match=r'process_id=2 must be in \[0, num_processes=2\)'):
    sharding.initialize_distributed('auto', '127.0.0.1:1234', 2, 2)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  assert sharding.initialize_distributed('auto')
  assert calls == [dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1)]
  monkeypatch.setenv('JAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' must be an integer"):
    sharding.initialize_distributed('auto')
  # Slurm with several tasks, or a TPU VM: auto calls initialize() and lets JAX detect the rest.
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(name)
  for name, value in [('SLURM_JOB_ID', '7'), ('SLURM_STEP_NODELIST', 'n[1-2]'),
                      ('SLURM_NTASKS', '2'), ('SLURM_PROCID', '0'), ('SLURM_LOCALID', '0')]:
    monkeypatch.setenv(name, value)
  assert sharding.initialize_distributed('auto')
  assert calls[-1] == dict(coordinator_address=None, num_processes=None, process_id=None)
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not sharding.initialize_distributed('auto')
  monkeypatch.setattr(sharding, '_on_cloud_tpu_vm', lambda: True)
  assert sharding.initialize_distributed('auto')
  assert len(calls) == 3


def test_abstract_mesh_shardings_for_any_device_count():
  """Shardings (and per-device bytes) for 64 devices on a 1-device machine."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from guidedflow.models import create_model  # pylint: disable=g-import-not-at-top
  abstract = nnx.state(nnx.eval_shape(lambda: create_model(
      'dit', variant='test/4', input_size=16, in_channels=4, num_classes=10, width=64,
      rngs=nnx.Rngs(0))))
  mesh = jax.sharding.AbstractMesh((1, 64, 1), sharding.MESH_AXES)
  shardings = sharding.state_shardings(abstract, mesh)
  structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
  fc1 = structs['blocks']['fc1']['kernel'].get_value()
  assert fc1.sharding.spec == P(None, 'fsdp', 'tensor')
  assert fc1.sharding.shard_shape(fc1.shape) == (1, 1, 256)  # 64 rows over fsdp = 64
  full = sum(x.size * 4 for x in jax.tree.leaves(abstract))
  assert sharding.bytes_per_device(structs) < full / 4


def test_min_shard_size_counts_one_layer_of_stacked_parameters():
  """A stacked bias of 40 layers × 256 (10240 elements) stays replicated like one layer's 256
  would; a stacked kernel (64 × 256 per layer) is sharded."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from guidedflow.models import create_model  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
  for scan_blocks in (True, False):
    abstract = nnx.state(nnx.eval_shape(lambda s=scan_blocks: create_model(
        'dit', variant='test/4', input_size=16, in_channels=4, num_classes=10, width=64,
        depth=40, scan_blocks=s, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract, mesh)
    fc1 = shardings['blocks'] if scan_blocks else shardings['blocks'][0]
    layers = (None,) if scan_blocks else ()
    assert fc1['fc1']['bias'].get_value().spec == P()
    assert fc1['fc1']['kernel'].get_value().spec == P(*layers, 'fsdp', 'tensor')


def test_without_axis_drops_one_mesh_axis_and_keeps_the_others():
  mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
  specs = {'a': NamedSharding(mesh, P('fsdp', 'tensor')),
           'b': NamedSharding(mesh, P(('data', 'fsdp'))),
           'c': NamedSharding(mesh, P(None, 'fsdp')), 'd': NamedSharding(mesh, P())}
  out = sharding.without_axis(specs, 'fsdp')
  assert {k: v.spec for k, v in out.items()} == {'a': P(None, 'tensor'), 'b': P('data'),
                                                 'c': P(None, None), 'd': P()}
