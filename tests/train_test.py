"""The training program on the generator task: config validation, the step, NaN stop,
checkpoint round trip, exact resume, CLI modes, the sampler's NFE."""

import json
import re
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

from configs import tiny
from guidedflow import checkpointing
from guidedflow import errors
from guidedflow import input_pipeline
from guidedflow import sampler as sampler_lib
from guidedflow import sampling_plan
from guidedflow import schema
from guidedflow import train
from guidedflow import train_state
from guidedflow.models import precision
from guidedflow.tasks import registry
from guidedflow.models import factory
from tests import subprocess_env

REPO = subprocess_env.REPO


def _main(workdir, *args, mode='train', check=True, **kwargs):
  cmd = [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
         f'--workdir={workdir}', f'--mode={mode}', *args]
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True,
                        check=check, timeout=600, **kwargs)


def _leaves(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]  # copies: the train step donates its input


def _builder(config):
  construct = factory.generator(config, (28, 28, 1))
  return train_state.StateBuilder(construct, config, train_state.make_mesh(config))


def _restore(workdir, config=None):
  config = config or tiny.get_config()
  with train_state.open_checkpointer(config, str(workdir), handle_sigterm=False) as ckpt:
    return train_state.restore_or_init(_builder(config), ckpt)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize('key,value,needle', [
    ('model.name', 'resnet', "model.name='resnet'"),
    ('loss.parameterization', 'x0', "loss.parameterization='x0'"),
    ('sampling.method', 'rk4', "sampling.method='rk4'"),
    ('train.num_steps', 0, 'train.num_steps=0'),
    ('loss.label_dropout', 1.5, 'loss.label_dropout=1.5'),
    ('sampling.guidance_scale', float('nan'), 'sampling.guidance_scale'),
    ('train.sample_every_steps', -3, 'train.sample_every_steps=-3 must be a step count >= 0'),
    ('eval.every_steps', -1, 'eval.every_steps=-1'),
])
def test_config_validation_names_the_key(key, value, needle):
  config = tiny.get_config()
  group, name = key.split('.')
  config[group][name] = value
  with pytest.raises(errors.ConfigError, match=None) as info:
    registry.validate(config)
  assert needle in str(info.value)


def test_all_configs_validate():
  # pylint: disable=g-import-not-at-top
  from configs import default, fashion_mnist, fmnist_autoencoder, fmnist_classifier
  from configs import imagenet256_latent
  for config in (default.get_config(), fashion_mnist.get_config(), fashion_mnist.get_config('dit'),
                 tiny.get_config(), imagenet256_latent.get_config(),
                 fmnist_classifier.get_config(), fmnist_autoencoder.get_config()):
    registry.validate(config)
    assert registry.get_task(config).name == config.get('task', 'generate')


def test_fashion_mnist_default_builds_its_model_and_evaluates_at_5000_per_w():
  """The documented default: its keys reach the model (a U-Net without GroupNorm, 16/64/128
  channels) and --mode=evaluate measures at least 5,000 samples per guidance scale."""
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config()
  registry.validate(config)
  model = factory.generator(config, (28, 28, 1))()
  assert model.norm == 'none' and model.channels == (16, 64, 128)
  assert not [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if 'norm' in '/'.join(map(str, path))]
  assert config.eval.samples_per_class * config.input.num_classes >= 5_000
  # Its sampler (docs/guidance_methods.md): CFG++ at λ = 0.4 with DPM-Solver++(2M), at the old
  # default's NFE (CFG with Heun 10: 38); the configs built on it that guide otherwise use CFG.
  plans = [sampling_plan.make_plan(
      shape=(28, 28, 1), path='linear', parameterization='velocity', null_label=10,
      method=c.sampling.method, num_steps=c.sampling.num_steps, use_cfg=True,
      guidance_method=c.sampling.guidance_method)
           for c in (config, fashion_mnist.get_config('unet', sampler='cfg'))]
  assert config.sampling.guidance_method == 'cfg_pp' and config.sampling.guidance_scale == 0.4
  assert plans[0].nfe == plans[1].nfe == 38 and plans[1].method == 'heun'
  from configs import fashion_mnist_text, fashion_mnist_unconditional  # pylint: disable=g-import-not-at-top
  for other in (fashion_mnist_text, fashion_mnist_unconditional, fashion_mnist):
    arg = ('dit',) if other is fashion_mnist else ()
    assert other.get_config(*arg).sampling.guidance_method == 'cfg'
  config.model.unet_norm = 'batch'
  with pytest.raises(errors.ConfigError, match="config.model.unet_norm='batch'"):
    registry.validate(config)
  del config.model['unet_norm']  # a config written before the key existed: GroupNorm
  schema.complete(config)
  assert factory.generator(config, (28, 28, 1))().norm == 'group'


@pytest.mark.parametrize('topology,chips', [('v4-32', 16), ('v5p-64', 32), ('v5e-32', 32)])
def test_imagenet_topology_meshes(topology, chips):
  from configs import imagenet256_latent  # pylint: disable=g-import-not-at-top
  config = imagenet256_latent.get_config(f'XL/2,{topology}')
  registry.validate(config)
  data, fsdp, tensor = config.mesh.shape
  assert data * fsdp * tensor == chips
  assert config.train.batch_size % (data * fsdp) == 0
  with pytest.raises(ValueError, match='Unknown topology'):
    imagenet256_latent.get_config('XL/2,v9-8')


@pytest.mark.parametrize('key,value,needle', [
    ('shape', (2, 2), 'config.mesh.shape=(2, 2) must be three sizes'),
    ('dcn_shape', (0, 1, 1), 'config.mesh.dcn_shape=(0, 1, 1)'),
    ('distributed', 'yes', "config.mesh.distributed='yes'"),
])
def test_mesh_config_errors(key, value, needle):
  config = tiny.get_config()
  config.mesh[key] = value
  with pytest.raises(errors.ConfigError) as info:
    registry.validate(config)
  assert needle in str(info.value)


def test_mesh_that_does_not_fit_says_so():
  config = tiny.get_config()
  config.mesh.shape = (2, 1, 1)  # this process has 1 device
  with pytest.raises(errors.ConfigError, match='needs 2 devices, but 1 are available'):
    train_state.make_mesh(config)


# ----------------------------------------------------------------------------- in-process training


@pytest.fixture(scope='module')
def generator():
  """(config, train dataset, StateBuilder, compiled train step) of the tiny generator."""
  config = tiny.get_config()
  task = registry.get_task(config)
  builder = _builder(config)
  return config, task.train_dataset(), builder, builder.make_train_step(task.loss)


def test_train_step_decreases_loss_and_updates_ema(generator):
  config, dataset, builder, train_step = generator
  state = builder.init_state()
  it = input_pipeline.BatchIterator(dataset, global_batch_size=8, seed=0,
                                    sharding=builder.batch_sharding)
  batch = next(it)
  key = jax.random.PRNGKey(0)
  params0 = _leaves(state['params'])
  state, m0 = train_step(state, batch, key)
  assert int(state['step']) == 1 and int(state['nonfinite_step']) == -1
  assert np.isfinite(float(m0['loss'])) and float(m0['grad_norm']) > 0
  assert any(not np.array_equal(a, b) for a, b in zip(params0, _leaves(state['params'])))
  # EMA warm-up: decay_0 = min(0.999, 1/10) = 0.1, so ema = 0.1 p0 + 0.9 p1.
  for e, p0, p1 in zip(_leaves(state['ema_params']), params0, _leaves(state['params'])):
    np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_freezes_state_and_names_the_step(generator):
  _, dataset, builder, train_step = generator
  state = builder.init_state()
  it = input_pipeline.BatchIterator(dataset, global_batch_size=8, seed=0,
                                    sharding=builder.batch_sharding)
  key = jax.random.PRNGKey(0)
  state, _ = train_step(state, next(it), key)
  good = _leaves(state['params'])
  bad = next(it)
  bad = dict(bad, image=bad['image'] * jnp.nan)
  state, metrics = train_step(state, bad, key)
  assert not np.isfinite(float(metrics['loss']))
  assert int(state['nonfinite_step']) == 1
  state, _ = train_step(state, next(it), key)  # later good batches change nothing
  for a, b in zip(good, _leaves(state['params'])):
    np.testing.assert_array_equal(a, b)


def test_nan_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.unlock()
  config.train.num_steps = 6
  config.checkpoint.every_steps = 2
  original = input_pipeline.BatchIterator.__next__

  def poisoned(self):
    batch = original(self)
    if self.get_state()['step'] == 4:  # the 4th batch (step index 3) is NaN
      batch = dict(batch, image=batch['image'] * jnp.nan)
    return batch

  monkeypatch.setattr(input_pipeline.BatchIterator, '__next__', poisoned)
  with pytest.raises(errors.TrainingError, match='step 4') as info:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'last good checkpoint (step 2)' in str(info.value)
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_checkpoint_round_trip_restores_state_and_iterator(tmp_path):
  config = tiny.get_config()
  state, result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == config.train.num_steps and np.isfinite(result['heldout_loss_ema'])
  assert json.load(open(tmp_path / 'result.json'))['task'] == 'generate'
  restored, data_state = _restore(tmp_path)
  assert data_state['step'] == config.train.num_steps
  for a, b in zip(_leaves(state), _leaves(restored)):
    np.testing.assert_array_equal(a, b)
  # A different model shape in the same workdir is refused with a clear error.
  other = tiny.get_config()
  other.unlock()
  other.model.variant = 'test/4'
  with pytest.raises(checkpointing.CheckpointMismatchError):
    _restore(tmp_path, other)
  assert os.path.exists(tmp_path / 'samples' / 'grid_latest.png')


# ----------------------------------------------------------------------------- CLI (subprocess)


def test_main_trains_samples_and_evaluates(tmp_path):
  workdir = tmp_path / 'run'
  out = _main(workdir, '--config.train.num_steps=2', '--config.train.sample_every_steps=1')
  assert 'step 2/2' in out.stderr, out.stderr[-3000:]
  # A grid at every periodic step, and the final grid once (not again after the periodic one).
  for step in (1, 2):
    assert out.stderr.count(f'Wrote sample grid at step {step} ') == 1, out.stderr[-3000:]
  assert os.path.exists(workdir / 'samples' / 'grid_step0000002.png')
  assert os.path.isdir(workdir / 'tensorboard')
  out = _main(workdir, '--config.sampling.num_samples=25', '--config.sampling.batch_size=10',
              mode='sample')
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['num_samples'] == 25 and result['nfe'] > 0
  data = np.load(workdir / 'samples' / 'samples.npz')
  assert data['images'].dtype == np.uint8 and data['images'].shape == (25, 28, 28, 1)
  assert data['labels'].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(data['labels'], minlength=10),
                                [3, 3, 3, 3, 3, 2, 2, 2, 2, 2])  # balanced
  assert os.path.exists(workdir / 'samples' / 'grid.png')
  out = _main(workdir, mode='evaluate')
  metrics = json.loads(out.stdout[out.stdout.index('{'):])
  assert metrics['step'] == 2 and np.isfinite(metrics['loss_ema'])
  # Another model than the one trained: the key and both values are named, not a shape error.
  out = _main(workdir, '--config.model.variant=test/14', mode='sample', check=False)
  subprocess_env.one_error_line(out, "trained with config.model.variant='test/7'",
                                "this config has 'test/14'", '--config.model.variant=')


def test_main_errors_are_clear(tmp_path):
  out = _main(tmp_path / 'empty', mode='sample', check=False)
  assert out.returncode == 1 and 'No checkpoint' in out.stderr and 'Traceback' not in out.stderr
  out = _main(tmp_path / 'x', '--config.input.data_dir=/nonexistent', check=False)
  assert out.returncode == 1 and 'dataset-fashion-mnist' in out.stderr
  assert 'Traceback' not in out.stderr
  out = _main(tmp_path / 'x', '--config.sampling.method=rk4', check=False)
  assert out.returncode == 1 and 'sampling.method' in out.stderr


def test_exact_resume_after_sigterm(tmp_path):
  """N steps straight == N/2-ish steps, SIGTERM, resume to N: bitwise equal state."""
  num_steps = 40
  args = [f'--config.train.num_steps={num_steps}', '--config.checkpoint.every_steps=1000',
          '--config.train.log_every_steps=1']
  _main(tmp_path / 'straight', *args)
  cmd = [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
         f'--workdir={tmp_path / "split"}', *args]
  proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env.env(), stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if f'step 5/{num_steps}' in line:
      proc.send_signal(signal.SIGTERM)
      break
  _, rest = proc.communicate(timeout=300)
  assert proc.returncode == 0, ''.join(lines) + rest
  assert 'Stop requested (SIGTERM)' in rest, rest[-2000:]
  stopped, data_state = _restore(tmp_path / 'split')
  stopped_at = int(stopped['step'])
  assert 5 <= stopped_at < num_steps and data_state['step'] == stopped_at
  _main(tmp_path / 'split', *args)  # resumes from the checkpoint
  a, _ = _restore(tmp_path / 'straight')
  b, _ = _restore(tmp_path / 'split')
  assert int(a['step']) == int(b['step']) == num_steps
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- sampling NFE


def test_sample_runs_the_single_batch_at_w_1_and_counts_its_nfe(generator, monkeypatch):
  """NFE counted from the rows the model runs on: w = 1 (sample, grid, sample_images) costs half."""
  config, _, builder, _ = generator
  state = builder.init_state()
  sampler = sampler_lib.Sampler.from_train_state(config, builder, state, (28, 28, 1))
  rows, traces = [], []
  original = builder.merge

  def counting_merge(params):
    model = original(params)

    def model_fn(x, t, y):
      traces.append(x.shape[0])
      jax.debug.callback(lambda times: rows.append(len(times)), t)
      return model(x, t, y)

    return model_fn

  monkeypatch.setattr(builder, 'merge', counting_merge)

  def counted(run, num_samples):
    rows.clear()
    out = run()
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert sum(rows) % num_samples == 0
    return out, sum(rows) // num_samples

  assert (config.sampling.method, config.sampling.num_steps) == ('heun', 2)  # 3 evaluations
  assert config.sampling.guidance_interval is None
  labels = np.arange(10, dtype=np.int32)
  key = jax.random.PRNGKey(0)
  (_, nfe_1), count_1 = counted(lambda: sampler.sample(key, labels, 1.0), 10)
  assert nfe_1 == count_1 == 3
  assert set(traces) == {10}  # the single batch only
  (_, nfe_3), count_3 = counted(lambda: sampler.sample(key, labels, 3.0), 10)
  assert nfe_3 == count_3 == 6
  num_traces = len(traces)
  (_, nfe_2), count_2 = counted(lambda: sampler.sample(key, labels, 2.0), 10)
  assert nfe_2 == count_2 == 6 and len(traces) == num_traces  # w != 1 shares one compile
  _, count_grid = counted(lambda: sampler.guidance_grid(key, (1.0, 3.0)), 10)
  assert count_grid == 3 + 6  # one block at w = 1 (single batch), one at w = 3 (doubled)
  # sample_images: 10 labels in 3 padded batches of 4 rows.
  (_, nfe, _), count = counted(lambda: sampler.sample_images(key, labels, 1.0, batch_size=4), 12)
  assert nfe == count == 3


def _dots_in_ynnpack(hlo):
  """How many YNNPACK fusions of a compiled program's HLO text contain a dot."""
  called = re.findall(r'calls=%([\w.-]+), [^\n]*"kind":"__ynn_fusion"', hlo)
  bodies = dict(re.findall(r'\n%([\w.-]+) [^\n]*\{\n(.*?)\n\}', hlo, re.S))
  return sum(' dot(' in bodies.get(name, '') for name in called)


def test_train_cpu_dots_onednn_compiles_the_steps_dots_in_onednn(generator):
  """`train.cpu_dots='onednn'` (jaxlib >= 0.12) compiles the train step's dots into oneDNN
  fusions, and the step agrees with XLA's default one to f32 rounding; with jaxlib 0.10, whose
  oneDNN fusions abort some programs, the config check refuses it."""
  config, dataset, builder, plain_step = generator
  choice = config.copy_and_resolve_references()
  choice.train.cpu_dots = 'onednn'
  if precision.jaxlib_version_tuple() < precision.ONEDNN_SINCE:
    with pytest.raises(errors.ConfigError, match=r"cpu_dots='onednn' needs jaxlib >= 0.12"):
      registry.validate(choice)
    return
  registry.validate(choice)
  task = registry.get_task(choice)
  step = builder.make_train_step(task.loss, task.train_compiler_options('cpu'))
  batch = next(input_pipeline.BatchIterator(dataset, global_batch_size=8, seed=0,
                                            sharding=builder.batch_sharding))
  key = jax.random.PRNGKey(0)
  with jax.set_mesh(builder.mesh):
    hlo = step.jitted.lower(builder.abstract_state(), batch, key).compile().as_text()
  assert '"__onednn_fusion"' in hlo
  (plain, plain_metrics), (onednn, metrics) = (
      train_step(builder.init_state(), batch, key) for train_step in (plain_step, step))
  np.testing.assert_allclose(float(metrics['loss']), float(plain_metrics['loss']), rtol=1e-5)
  for a, b in zip(_leaves(onednn['params']), _leaves(plain['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cpu_dots_compile_the_samplers_dots_outside_ynnpack(generator):
  """`sampling.cpu_dots`: 'eigen' takes the f32 sampler's dots out of YNNPACK (XLA:CPU's Eigen
  GEMMs), 'onednn' (jaxlib >= 0.12; refused before) into oneDNN fusions, 'ynnpack' leaves
  XLA:CPU's default; the samples agree to f32 rounding."""
  config, _, builder, _ = generator
  state = builder.init_state()
  labels, key = np.arange(8, dtype=np.int32), jax.random.PRNGKey(3)
  choices = ['ynnpack', 'eigen']
  onednn_config = config.copy_and_resolve_references()
  onednn_config.sampling.cpu_dots = 'onednn'
  if precision.jaxlib_version_tuple() < precision.ONEDNN_SINCE:
    with pytest.raises(errors.ConfigError, match=r"sampling.cpu_dots='onednn' needs jaxlib"):
      registry.validate(onednn_config)
  else:
    choices.append('onednn')
  dots, hlo, samples = {}, {}, {}
  for choice in choices:
    choice_config = config.copy_and_resolve_references()
    choice_config.sampling.cpu_dots = choice
    sampler = sampler_lib.Sampler.from_train_state(choice_config, builder, state, (28, 28, 1))
    hlo[choice] = sampler.lower_cfg(8).compile().as_text()
    dots[choice] = _dots_in_ynnpack(hlo[choice])
    samples[choice] = np.asarray(sampler.sample(key, labels, 2.0)[0])
  assert dots['ynnpack'] > 0 and dots['eigen'] == 0, dots
  assert '"__onednn_fusion"' not in hlo['ynnpack']
  for choice in choices[1:]:
    np.testing.assert_allclose(samples[choice], samples['ynnpack'], atol=1e-4)
  if 'onednn' in choices:
    assert '"__onednn_fusion"' in hlo['onednn'] and dots['onednn'] < dots['ynnpack'], dots
