"""The training program on 8 simulated CPU devices: meshes (8,1,1), (2,4,1), (2,2,2) against one
device (train steps, shardings, per-device bytes, sampler), and checkpoints across meshes.

conftest.py imports jax with one CPU device, so everything runs in one child process started
with 8 devices in XLA_FLAGS; it reports what it measured as JSON, and the tests check the report.

Tolerances (f32): the sharded runs reduce in a different order (partial sums per shard, then a
collective). Measured after 3 AdamW steps (lr 1e-3): parameters differ by at most 3e-8, losses by
6e-7 relative, samples by 2.4e-7. Asserted: parameters atol 1e-6, losses rtol 1e-5, samples
atol 1e-5. Checkpoint restores are exact.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from tests import subprocess_env

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a subprocess or
# a training run) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('multidevice')

MESHES = ['(8, 1, 1)', '(2, 4, 1)', '(2, 2, 2)']

_CHILD = textwrap.dedent(r'''
    import json, os, sys
    import jax
    import numpy as np
    from configs import tiny
    from guidedflow import checkpointing, input_pipeline, sampler, sharding, train_state
    from guidedflow.tasks import registry

    workdir = sys.argv[1]
    config = tiny.get_config()
    config.model.variant = 'test/4'      # width 32, 1 block; 32 x 128 MLP kernels
    config.train.batch_size = 16
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1
    config.mesh.min_shard_size = 1024    # the test model's kernels are small
    dataset = input_pipeline.create_dataset(config.input, 'train')
    image_shape = dataset.image_shape
    base_key = jax.random.PRNGKey(0)
    labels = np.arange(16) % 11          # 11 = the null label: unconditional rows too
    report = {'num_devices': jax.device_count()}

    def run(mesh):
      builder = train_state.builder(config, image_shape, mesh)
      train_step = builder.make_train_step(registry.get_task(config).loss)
      state = builder.init_state()
      init_bytes = {k: sharding.bytes_per_device(state[k]) for k in ('params', 'opt_state',
                                                                    'ema_params')}
      leaves = jax.tree_util.tree_leaves_with_path(state['params'])
      real_bytes = sum(x.addressable_shards[0].data.nbytes for _, x in leaves)
      per_leaf = {jax.tree_util.keystr(p): [x.nbytes, x.addressable_shards[0].data.nbytes,
                                            [e for e in x.sharding.spec if e]] for p, x in leaves}
      iterator = input_pipeline.BatchIterator(dataset, global_batch_size=16, seed=0,
                                              sharding=builder.batch_sharding)
      losses = []
      for _ in range(3):
        state, metrics = train_step(state, next(iterator), base_key)
        losses.append(float(metrics['loss']))
      samples, _ = sampler.Sampler.from_train_state(config, builder, state, image_shape).sample(
          jax.random.PRNGKey(5), labels, 2.0, num_steps=3, method='heun')
      return builder, state, {'losses': losses, 'init_bytes': init_bytes,
                              'real_param_bytes': real_bytes, 'per_leaf': per_leaf,
                              'samples_sharding': str(samples.sharding.spec)}, samples

    def spec(x):
      return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]

    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, ref_state, ref, ref_samples = run(one)
    ref_params = jax.tree.map(np.asarray, jax.device_get(ref_state['params']))
    ref_samples = np.asarray(ref_samples)
    report['(1, 1, 1)'] = ref
    report['total_param_bytes'] = sum(x.nbytes for x in jax.tree.leaves(ref_params))

    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
      config.mesh.shape = shape
      mesh = train_state.make_mesh(config)
      _, state, r, samples = run(mesh)
      params = jax.device_get(state['params'])
      diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), params,
                           ref_params)
      r['param_max_diff'] = max(jax.tree.leaves(diffs))
      r['sample_max_diff'] = float(np.abs(np.asarray(samples) - ref_samples).max())
      block = state['params']['blocks']  # stacked (scanned) blocks: (depth, ...) parameters
      r['fc1'] = spec(block['fc1']['kernel'])
      r['fc1_mu'] = spec(state['opt_state'][1][0].mu['blocks']['fc1']['kernel'])
      r['fc1_ema'] = spec(state['ema_params']['blocks']['fc1']['kernel'])
      r['qkv'] = spec(block['attn']['qkv']['kernel'])
      r['fc1_bias'] = spec(block['fc1']['bias'])
      r['mesh'] = dict(mesh.shape)
      report[str(shape)] = r
      if shape == (2, 4, 1):
        # A checkpoint written on this mesh, restored on one device and on (8, 1, 1).
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'ckpt'))
        ckpt.save(3, state, data_state={'step': 3}, force=True)
        ckpt.wait_until_finished()
        saved = jax.tree.map(np.asarray, jax.device_get(state))
        for name, target in [('restore_one_device', one),
                             ('restore_(8, 1, 1)', sharding.make_mesh((8, 1, 1)))]:
          restored, _ = ckpt.restore(
              train_state.builder(config, image_shape, target).abstract_state())
          equal = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), restored,
                               saved)
          report[name] = {
              'all_equal': all(jax.tree.leaves(equal)),
              'devices': len(restored['params']['blocks']['fc1']['kernel'].sharding.device_set),
              'mesh': dict(target.shape)}
        ckpt.close()
    print('REPORT' + json.dumps(report))
''')


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  env = subprocess_env.env()
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  result = subprocess.run([sys.executable, '-c', _CHILD, str(tmp_path_factory.mktemp('mesh'))],
                          cwd=subprocess_env.REPO, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [ln for ln in result.stdout.splitlines() if ln.startswith('REPORT')][-1]
  return json.loads(line[len('REPORT'):])


@pytest.mark.parametrize('mesh', MESHES)
def test_train_steps_match_one_device(report, mesh):
  ref, r = report['(1, 1, 1)'], report[mesh]
  assert report['num_devices'] == 8
  for a, b in zip(r['losses'], ref['losses']):
    assert abs(a - b) <= 1e-5 * abs(b), (r['losses'], ref['losses'])
  assert r['param_max_diff'] < 1e-6
  assert ref['losses'][0] != ref['losses'][2]  # the steps did something


@pytest.mark.parametrize('mesh', MESHES)
def test_sharded_sampler_matches_unsharded(report, mesh):
  assert report[mesh]['sample_max_diff'] < 1e-5


@pytest.mark.parametrize('mesh', ['(2, 4, 1)', '(2, 2, 2)'])
def test_kernels_optimizer_state_and_ema_are_sharded(report, mesh):
  r = report[mesh]
  # Stacked blocks: the leading 'layers' axis is replicated, the per-block dims shard as before.
  if r['mesh']['tensor'] > 1:
    assert r['fc1'] == [None, 'fsdp', 'tensor']
  else:
    assert r['fc1'][:2] == [None, 'fsdp']
  assert r['fc1_mu'] == r['fc1'] and r['fc1_ema'] == r['fc1']  # AdamW moments and EMA too
  assert r['qkv'][:2] == [None, 'fsdp']
  assert all(e is None for e in r['fc1_bias'])  # small: replicated


@pytest.mark.parametrize('mesh', MESHES)
def test_per_device_bytes_shrink_by_the_sharding_factor(report, mesh):
  """Real device buffers: each sharded parameter holds 1/(product of its mesh axes) per device;
  the FSDP-sharded ones are most of the model; optimizer moments and EMA are laid out alike."""
  r = report[mesh]
  sizes = r['mesh']
  sharded = 0
  for name, (full, shard, axes) in r['per_leaf'].items():
    flat = [a for e in axes for a in ([e] if isinstance(e, str) else e)]
    factor = 1
    for axis in flat:
      factor *= sizes[axis]
    assert shard * factor == full, (name, full, shard, axes)
    if 'fsdp' in flat and sizes['fsdp'] > 1:
      sharded += full
  total = report['total_param_bytes']
  assert r['real_param_bytes'] == sum(shard for _, shard, _ in r['per_leaf'].values())
  if sizes['fsdp'] > 1:
    assert sharded > 0.6 * total  # the large kernels: all but the time MLP's and small params
    assert r['real_param_bytes'] < total - sharded + sharded / sizes['fsdp'] + 1
  else:
    assert r['real_param_bytes'] == total  # (8, 1, 1): pure data parallel, replicated
  assert r['init_bytes']['params'] == r['real_param_bytes']
  assert r['init_bytes']['ema_params'] == r['real_param_bytes']
  assert abs(r['init_bytes']['opt_state'] - 2 * r['real_param_bytes']) <= 16  # mu, nu (+ count)


@pytest.mark.parametrize('target', ['restore_one_device', 'restore_(8, 1, 1)'])
def test_checkpoint_from_fsdp_mesh_restores_on_other_meshes(report, target):
  r = report[target]
  assert r['all_equal']
  assert r['devices'] == (1 if target == 'restore_one_device' else 8)
