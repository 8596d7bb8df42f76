"""Tests for guidedflow.checkpointing: round trips, retention, mismatches, SIGTERM preemption."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from guidedflow import checkpointing
from guidedflow import tree_compat
from guidedflow import train_state

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(scale=1.0):
  """A train-state-like pytree: nested dicts (nnx-style integer-named layers), mixed dtypes."""
  key = jax.random.key(0)
  return {
      'model': {'layers': {'0': {'kernel': scale * jax.random.normal(key, (4, 8)),
                                 'bias': jnp.arange(8, dtype=jnp.float32)},
                           '1': {'kernel': jax.random.normal(key, (8, 2), jnp.bfloat16)}}},
      'ema': {'layers': {'0': {'kernel': jnp.full((4, 8), scale, jnp.float32)}}},
      'opt': {'count': jnp.int32(7), 'mu': jnp.ones((3,), jnp.float32)},
  }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_bitwise_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype and a.shape == e.shape
    assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


@pytest.mark.parametrize('async_save', [False, True])
def test_round_trip_is_bitwise(tmp_path, async_save):
  state, data_state = _state(), {'step': 10, 'seed': 3, 'global_batch_size': 8}
  config = ml_collections.ConfigDict({'model': {'variant': 'T/4', 'channels': (8, 16)},
                                      'input': {'data_dir': None}})
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=5,
                                  async_save=async_save) as ckpt:
    assert ckpt.latest_step() is None and ckpt.restore_config() is None
    assert ckpt.save(10, state, data_state=data_state, config=config)
    ckpt.wait_until_finished()
  with checkpointing.Checkpointer(tmp_path) as ckpt:  # A fresh process would do this.
    assert ckpt.latest_step() == 10
    restored, restored_data = ckpt.restore(_abstract(state))
    assert ckpt.restore_config() == {'model': {'variant': 'T/4', 'channels': [8, 16]},
                                     'input': {'data_dir': None}}
  _assert_bitwise_equal(restored, state)
  assert restored_data == data_state
  leaf = restored['model']['layers']['0']['kernel']
  assert leaf.sharding == state['model']['layers']['0']['kernel'].sharding


def test_a_step_without_checksums_restores_with_a_warning(tmp_path):
  """A step saved before checksums existed (no `checksums/` item) restores, unverified, and says
  so: a warning in the log and in `Checkpointer.warnings` (the loop puts it in result.json)."""
  state = _state()
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(3, state, data_state={'step': 3}, force=True)
    ckpt.wait_until_finished()
    assert ckpt.warnings == []
  shutil.rmtree(tmp_path / '3' / 'checksums')
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore(_abstract(state))
    assert ckpt.warnings == ['checkpoint step 3 has no checksums of this version (written before '
                             'them): restored unverified']
  _assert_bitwise_equal(restored, state)


def test_nnx_model_and_optimizer_state(tmp_path):
  optax = pytest.importorskip('optax')
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def make(seed):
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)),
                           nnx.Linear(4, 2, rngs=nnx.Rngs(seed + 1)))
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  model, optimizer = make(0)
  state = {'model': nnx.state(model), 'opt': nnx.state(optimizer)}
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state={'step': 1}, force=True)
    other_model, other_optimizer = make(5)
    target = {'model': nnx.state(other_model), 'opt': nnx.state(other_optimizer)}
    restored, _ = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                            target))
  nnx.update(other_model, restored['model'])
  _assert_bitwise_equal(nnx.state(other_model), nnx.state(model))


def test_periodic_saves_and_max_to_keep(tmp_path):
  with checkpointing.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(step, _state(step), data_state={'step': step}) for step in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert ckpt.save(7, _state(7), data_state={'step': 7}, force=True)
    assert not ckpt.save(7, _state(7), data_state={'step': 7}, force=True)  # Already there.
    assert ckpt.all_steps() == [6, 7]
    restored, data_state = ckpt.restore(_abstract(_state()), step=6)
  assert data_state == {'step': 6}
  np.testing.assert_array_equal(restored['ema']['layers']['0']['kernel'], np.full((4, 8), 6.0))
  assert sorted(os.listdir(tmp_path)) == ['6', '7']  # Old steps deleted; no temp dirs left.


@pytest.mark.parametrize('change,message', [
    (lambda s: s['model']['layers']['0'].update(kernel=jnp.zeros((4, 16))),
     r"'model/layers/0/kernel' was saved as \(4, 8\) float32 but the model expects "
     r'\(4, 16\) float32'),
    (lambda s: s['opt'].update(mu=jnp.ones((3,), jnp.bfloat16)),
     r"'opt/mu' was saved as \(3,\) float32 but the model expects \(3,\) bfloat16"),
    (lambda s: s['model']['layers'].update({'2': {'kernel': jnp.zeros(2)}}),
     r"has no parameter 'model/layers/2/kernel'"),
    (lambda s: s['model']['layers'].pop('1'),
     r"holds parameter 'model/layers/1/kernel' \(\(8, 2\) bfloat16\) that the model does not"),
])
def test_mismatch_names_parameter_and_fix(tmp_path, change, message):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, _state(), data_state={'step': 3}, force=True)
    expected = _state()
    change(expected)
    with pytest.raises(checkpointing.CheckpointMismatchError, match=message) as error:
      ckpt.restore(_abstract(expected))
  assert '--workdir' in str(error.value)
  assert isinstance(error.value, ValueError)


def _dit_train_state(scan_blocks, abstract=False):
  """The tiny config's DiT train state (params, AdamW, EMA: one 'test/7' block) in a layout."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from guidedflow import sharding  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.scan_blocks = scan_blocks
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  builder = train_state.builder(config, (28, 28, 1), mesh)
  return builder.abstract_state() if abstract else builder.init_state()


@pytest.mark.parametrize('saved_scanned', [False, True], ids=['unscanned_saved', 'scanned_saved'])
def test_block_layout_mismatch_says_which_scan_blocks_to_set(tmp_path, saved_scanned):
  """A checkpoint of one DiT block layout restored into the other is refused with the flag that
  restores it; restored with that flag, it loads exactly."""
  state = _dit_train_state(scan_blocks=saved_scanned)
  saved_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert any(("['blocks'][0]" in p) != saved_scanned for p in saved_paths)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, state, data_state={'step': 4}, force=True)
    flag = f'--config.model.scan_blocks={"true" if saved_scanned else "false"}'
    with pytest.raises(checkpointing.CheckpointMismatchError, match=flag) as error:
      ckpt.restore(_dit_train_state(scan_blocks=not saved_scanned, abstract=True))
    assert 'blocks' in str(error.value) and 'step 4' in str(error.value)
    restored, _ = ckpt.restore(_dit_train_state(scan_blocks=saved_scanned, abstract=True))
  _assert_bitwise_equal(restored, state)


def test_block_layout_hint_only_for_a_pure_layout_difference():
  numbered = {'params/blocks/0/fc1/kernel': 0, 'params/blocks/1/fc1/kernel': 0,
              'params/patch/kernel': 0}
  stacked = {'params/blocks/fc1/kernel': 0, 'params/patch/kernel': 0}
  assert 'scan_blocks=false' in tree_compat._block_layout_fix(numbered, stacked)
  assert 'scan_blocks=true' in tree_compat._block_layout_fix(stacked, numbered)
  assert tree_compat._block_layout_fix(numbered, numbered) is None
  other = {'params/blocks/fc2/kernel': 0, 'params/patch/kernel': 0}  # a different model
  assert tree_compat._block_layout_fix(numbered, other) is None


def test_restore_missing_step_and_config(tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
      ckpt.restore(_abstract(_state()))
    ckpt.save(2, _state(), data_state={'step': 2}, force=True)  # No config.
    assert ckpt.restore_config() is None
    with pytest.raises(FileNotFoundError, match=r'available: \[2\]'):
      ckpt.restore(_abstract(_state()), step=5)


def test_sigterm_handler_installed_and_restored(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  ckpt = checkpointing.Checkpointer(tmp_path)
  assert signal.getsignal(signal.SIGTERM) != previous and ckpt.preemption_mode == 'sigterm'
  assert not ckpt.should_stop(0)
  os.kill(os.getpid(), signal.SIGTERM)
  assert ckpt.should_stop(1) and ckpt.should_stop(2)  # Sticky once stopped.
  ckpt.close()
  assert signal.getsignal(signal.SIGTERM) == previous
  assert checkpointing.Checkpointer(tmp_path, handle_sigterm=False).preemption_mode == 'none'


_LOOP = textwrap.dedent('''
    import os, sys, time
    import jax
    if sys.argv[2] == 'distributed':  # JAX's preemption service catches SIGTERM.
      jax.distributed.initialize(coordinator_address='127.0.0.1:' + sys.argv[3],
                                 num_processes=1, process_id=0)
    import jax.numpy as jnp
    from guidedflow import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1], save_interval_steps=1000)
    assert ckpt.preemption_mode == ('jax' if sys.argv[2] == 'distributed' else 'sigterm')
    state, step = {'w': jnp.zeros(3)}, 0
    print('READY', flush=True)
    while step < 100_000:
      if ckpt.should_stop(step):
        ckpt.save(step, state, data_state={'step': step}, force=True)
        ckpt.wait_until_finished()
        ckpt.close()
        print('STOPPED', step, flush=True)
        sys.exit(0)
      state = {'w': state['w'] + 1}
      step += 1
      time.sleep(0.005)
    sys.exit(3)
''')


class _Child:
  """A Python subprocess whose stdout lines are collected by a thread (stderr goes to a file)."""

  def __init__(self, script, args, log_path):
    env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS='cpu')
    self.log_path = log_path
    with open(log_path, 'w') as log:
      self.process = subprocess.Popen([sys.executable, '-c', script, *args], stdout=subprocess.PIPE,
                                      stderr=log, text=True, env=env, cwd=_REPO)
    self.lines, self.ready = [], threading.Event()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.process.stdout:  # Gloo and others print to stdout too.
      self.lines.append(line.strip())
      if line.strip() == 'READY':
        self.ready.set()

  def wait_ready(self, timeout=60):
    assert self.ready.wait(timeout), self.stderr()

  def wait(self, timeout=60):
    """Waits for exit; kills the process after `timeout` seconds."""
    try:
      self.process.wait(timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()

  def stopped_step(self):
    """The step the child printed after STOPPED (it must have exited with 0)."""
    assert self.process.returncode == 0, self.stderr()
    stopped = [line for line in self.lines if line.startswith('STOPPED')]
    assert stopped, self.lines
    return int(stopped[0].split()[1])

  def stderr(self):
    with open(self.log_path) as log:
      return log.read()[-3000:]


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return str(s.getsockname()[1])


@pytest.mark.parametrize('mode,signum', [('local', signal.SIGTERM), ('distributed', signal.SIGTERM),
                                         ('local', signal.SIGHUP), ('distributed', signal.SIGHUP)])
def test_sigterm_subprocess_saves_and_exits_cleanly(tmp_path, mode, signum):
  """SIGTERM (preemption) and SIGHUP (a closed terminal) save the step and exit 0."""
  child = _Child(_LOOP, [str(tmp_path / 'ckpt'), mode, _free_port()], tmp_path / 'stderr.txt')
  try:
    child.wait_ready()
    time.sleep(0.5)  # Let it run some steps, then preempt.
    os.kill(child.process.pid, signum)
  finally:
    child.wait()
  reported = child.stopped_step()
  assert reported > 0
  with checkpointing.Checkpointer(tmp_path / 'ckpt', handle_sigterm=False) as ckpt:
    assert ckpt.latest_step() == reported
    restored, data_state = ckpt.restore({'w': jax.ShapeDtypeStruct((3,), jnp.float32)})
  assert data_state == {'step': reported}
  np.testing.assert_array_equal(restored['w'], np.full(3, reported, np.float32))


_TWO_PROCESS_LOOP = textwrap.dedent('''
    import sys, time
    import jax
    process_id, port, mode, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    if mode == 'sigterm':  # Without JAX's service: own handler + all-gathered flags.
      jax.config.update('jax_enable_preemption_service', False)
    jax.distributed.initialize(coordinator_address='127.0.0.1:' + port, num_processes=2,
                               process_id=process_id)
    import numpy as np
    from guidedflow import checkpointing
    ckpt = checkpointing.Checkpointer(directory, save_interval_steps=1000)
    assert ckpt.preemption_mode == mode, ckpt.preemption_mode
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    print('READY', flush=True)
    for step in range(100_000):
      if ckpt.should_stop(step):
        w = jax.make_array_from_callback((3,), replicated,
                                         lambda index: np.full(3, step, np.float32)[index])
        ckpt.save(step, {'w': w}, data_state={'step': step}, force=True)
        ckpt.close()
        print('STOPPED', step, flush=True)
        sys.exit(0)
      time.sleep(0.005 * (1 + process_id))  # The processes run at different speeds.
    sys.exit(3)
''')


@pytest.mark.parametrize('mode', ['jax', 'sigterm'])
def test_two_processes_stop_at_the_same_step(tmp_path, mode):
  """SIGTERM to process 1 only: both processes stop, save and exit 0 at one common step."""
  port, directory = _free_port(), str(tmp_path / 'ckpt')
  children = [_Child(_TWO_PROCESS_LOOP, [str(i), port, mode, directory],
                     tmp_path / f'stderr{i}.txt') for i in range(2)]
  try:
    for child in children:
      child.wait_ready()
    time.sleep(0.5)
    os.kill(children[1].process.pid, signal.SIGTERM)
  finally:
    for child in children:
      child.wait()
  steps = {child.stopped_step() for child in children}
  assert len(steps) == 1
  with checkpointing.Checkpointer(directory, handle_sigterm=False) as ckpt:
    assert ckpt.all_steps() == list(steps)
    restored, _ = ckpt.restore({'w': jax.ShapeDtypeStruct((3,), jnp.float32)})
  np.testing.assert_array_equal(restored['w'], np.full(3, steps.pop(), np.float32))
