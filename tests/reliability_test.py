"""What a long run meets in real life, through `python -m guidedflow.main` as a user runs it:
damaged and silently changed checkpoints, Ctrl-C, unusable workdirs, a full disk, a changed
objective on resume. Each failure must end in one `error:` line naming the cause (no
traceback), exit ≠ 0, and keep every checkpoint that existed before, byte for byte.

Read-only mounts and a small full disk are real (a private mount namespace via `unshare -rm`);
where the machine cannot make one the test is skipped with the reason, and the in-process
tests inject the same errors.
"""

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guidedflow import checkpointing
from guidedflow import checksums
from tests import subprocess_env

# One worker runs this module and tests/cli_errors_test.py (`--dist loadgroup` in .ci/run): the
# tiny run both start from (conftest.py's tiny_run_dir, a subprocess) is then trained once.
pytestmark = pytest.mark.xdist_group('tiny_run')

REPO = subprocess_env.REPO


def _cmd(workdir, *args, mode='train'):
  return [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
          f'--workdir={workdir}', f'--mode={mode}', *args]


def _main(workdir, *args, mode='train'):
  return subprocess.run(_cmd(workdir, *args, mode=mode), cwd=REPO,
                        env=subprocess_env.env(), capture_output=True, text=True, timeout=600)


_error_line = subprocess_env.one_error_line


def _files(directory):
  """{relative path: sha256} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _result(out):
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def trained(tiny_run_dir):
  """A finished tiny run: checkpoints at steps 2 and 4 (tests/conftest.py; only copied here)."""
  return tiny_run_dir


@pytest.fixture
def run(trained, tmp_path):
  """A fresh copy of the trained run, and the hashes of its checkpoint files."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  return workdir, _files(workdir / 'checkpoints')


def _kept(before, workdir):
  """Every checkpoint file of `before` is still there, byte for byte, in checkpoints/ or moved
  to checkpoints_damaged/."""
  now = {**_files(workdir / 'checkpoints'),
         **{k: v for k, v in _files(str(workdir / 'checkpoints') + '_damaged').items()}}
  for path, digest in before.items():
    assert now.get(path) == digest, path


# ----------------------------------------------------------------------------- 1, 2: damage


def _truncate_state(step_dir):
  path = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir / 'state') for f in fs),
             key=os.path.getsize)
  os.truncate(path, 1000)


def _overwrite_2000_bytes(step_dir):
  path = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir / 'state') for f in fs),
             key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(np.random.default_rng(0).bytes(2000))


@pytest.mark.parametrize('damage', ['truncate', 'no_state', 'no_data', 'overwrite'])
def test_damaged_newest_checkpoint_is_moved_aside_and_training_resumes_before_it(run, damage):
  workdir, _ = run
  step4 = workdir / 'checkpoints' / '4'
  {'truncate': _truncate_state, 'overwrite': _overwrite_2000_bytes,
   'no_state': lambda d: shutil.rmtree(d / 'state'),
   'no_data': lambda d: shutil.rmtree(d / 'data')}[damage](step4)
  damaged = _files(step4)
  out = _main(workdir, '--config.train.num_steps=6')
  assert out.returncode == 0 and 'Traceback' not in out.stderr, out.stderr[-5000:]
  assert 'Checkpoint step 4 is damaged' in out.stderr
  result = _result(out)
  assert result['step'] == 6 and result['steps_this_run'] == 4  # resumed from step 2
  assert _files(str(workdir / 'checkpoints') + '_damaged/4') == damaged  # kept, unchanged
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']  # 4 redone


def test_checkpoint_without_its_metadata_files_restores_when_its_arrays_verify(run):
  """Missing _CHECKPOINT_METADATA / commit_success.txt alone is no damage: the arrays are read
  and their checksums match, so the step is used (it was wrongly blamed on another model)."""
  workdir, before = run
  for name in ('_CHECKPOINT_METADATA', 'commit_success.txt'):
    os.remove(workdir / 'checkpoints' / '4' / name)
  out = _main(workdir, '--config.train.num_steps=6')
  assert out.returncode == 0, out.stderr[-3000:]
  assert _result(out)['steps_this_run'] == 2 and 'damaged' not in out.stderr


def test_sampling_skips_a_damaged_checkpoint_without_moving_it(run):
  workdir, before = run
  _truncate_state(workdir / 'checkpoints' / '4')
  damaged = _files(workdir / 'checkpoints')
  out = _main(workdir, mode='sample')
  assert out.returncode == 0 and 'Traceback' not in out.stderr, out.stderr[-5000:]
  assert 'Checkpoint step 4 is damaged' in out.stderr and _result(out)['step'] == 2
  assert _files(workdir / 'checkpoints') == damaged  # inference changes no file of the run
  shutil.rmtree(workdir / 'checkpoints' / '2' / 'state')
  _error_line(_main(workdir, mode='sample'), 'None of the 2 checkpoint(s)', 'can be restored')


def _tree(scale):
  key = jax.random.key(1)
  return {'w': scale * jax.random.normal(key, (16, 8)), 'b': jnp.arange(8, dtype=jnp.bfloat16),
          'step': jnp.int32(3), 'flag': jnp.bool_(True)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_changed_arrays_are_caught_by_the_checksums(tmp_path):
  """Step 4's arrays replaced by step 2's (valid files, other bytes): only the checksums can
  tell. restore_newest reports it, moves it aside and returns step 2."""
  directory = tmp_path / 'checkpoints'
  with checkpointing.Checkpointer(directory, handle_sigterm=False) as ckpt:
    ckpt.save(2, _tree(1.0), data_state={'step': 2}, force=True)
    ckpt.save(4, _tree(2.0), data_state={'step': 4}, force=True)
  shutil.rmtree(directory / '4' / 'state')
  shutil.copytree(directory / '2' / 'state', directory / '4' / 'state')
  with checkpointing.Checkpointer(directory, handle_sigterm=False) as ckpt:
    with pytest.raises(checkpointing.DamagedCheckpointError, match=r"checksums of 1 array\(s\) differ .* first 'w'"):
      ckpt.restore(_abstract(_tree(1.0)), 4)
    step, state, data = ckpt.restore_newest(_abstract(_tree(1.0)), move_damaged=True)
    assert step == 2 and data == {'step': 2} and ckpt.all_steps() == [2]
    np.testing.assert_array_equal(state['w'], _tree(1.0)['w'])
  assert os.listdir(str(directory) + '_damaged') == ['4']


def test_checksums_of_another_algorithm_are_not_blamed(tmp_path):
  """A step whose checksums were computed by another algorithm version restores unverified;
  the same step with this version's checksums of other arrays is damaged."""
  directory = tmp_path / 'checkpoints'
  with checkpointing.Checkpointer(directory, handle_sigterm=False) as ckpt:
    ckpt.save(2, _tree(1.0), data_state={'step': 2}, force=True)
  metadata = directory / '2' / 'checksums' / 'metadata'
  saved = json.loads(metadata.read_text())
  assert saved['algorithm'] == checksums.ALGORITHM
  saved['arrays']['w'] = '00000000'
  metadata.write_text(json.dumps(saved))
  with checkpointing.Checkpointer(directory, handle_sigterm=False) as ckpt:
    with pytest.raises(checkpointing.DamagedCheckpointError, match="first 'w'"):
      ckpt.restore(_abstract(_tree(1.0)), 2)
  metadata.write_text(json.dumps(dict(saved, algorithm='an-older-one/v0')))
  with checkpointing.Checkpointer(directory, handle_sigterm=False) as ckpt:
    state, _ = ckpt.restore(_abstract(_tree(1.0)), 2)
  np.testing.assert_array_equal(state['w'], _tree(1.0)['w'])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_checksum_catches_every_single_element_change_and_a_swap(dtype):
  x = (jnp.arange(24).reshape(2, 3, 4) % 2 == 0 if dtype == jnp.bool_
       else jnp.arange(24).reshape(2, 3, 4).astype(dtype))
  base = checksums.checksums({'x': x})['x']
  flat = np.array(x).reshape(-1)
  for i in range(flat.size):
    changed = flat.copy()
    changed[i] = not changed[i] if dtype == jnp.bool_ else changed[i] + 1
    assert checksums.checksums({'x': jnp.asarray(changed.reshape(x.shape))})['x'] != base, i
  swapped = flat.copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert checksums.checksums({'x': jnp.asarray(swapped.reshape(x.shape))})['x'] != base
  assert checksums.checksums({'x': x})['x'] == base
  if dtype in (jnp.float32, jnp.bfloat16):  # the same bits added to every element
    assert checksums.checksums({'x': x * 2})['x'] != base


# ----------------------------------------------------------------------------- 3: Ctrl-C


def _interrupt(workdir, signals, after='step 20/'):
  args = ['--config.train.num_steps=100000', '--config.checkpoint.every_steps=1000000',
          '--config.train.log_every_steps=1']
  proc = subprocess.Popen(_cmd(workdir, *args), cwd=REPO, env=subprocess_env.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if after in line:
      for signum in signals:  # a person's second Ctrl-C (the kernel merges simultaneous ones)
        proc.send_signal(signum)
        time.sleep(0.3)
      break
  stdout, rest = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, ''.join(lines) + rest)


def test_ctrl_c_saves_the_current_step_and_exits_130(tmp_path):
  out = _interrupt(tmp_path / 'run', [signal.SIGINT])
  assert out.returncode == 130 and 'Traceback' not in out.stderr, out.stderr[-5000:]
  result = _result(out)
  assert result['stop_signal'] == 'SIGINT' and result['step'] >= 20
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == [str(result['step'])]


_BUSY = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from guidedflow import stop_signals
    signals = stop_signals.StopSignals()
    assert signals.install()
    # Minutes inside XLA (the GIL released, no Python bytecode in the main thread): only the
    # watcher thread can see a signal now.
    busy = jax.jit(lambda x: jax.lax.fori_loop(0, 10**9, lambda i, v: jnp.sin(v) + 1.0, x))
    busy.lower(jnp.ones(4096)).compile()
    print('BUSY', flush=True)
    busy(jnp.ones(4096)).block_until_ready()
    print('finished the computation: the second signal did not abort', flush=True)
""")


def test_second_ctrl_c_aborts_at_once_even_inside_xla():
  proc = subprocess.Popen([sys.executable, '-c', _BUSY], cwd=REPO, env=subprocess_env.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'BUSY'
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  start = time.time()
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGINT and time.time() - start < 30, stdout + stderr
  assert 'Ctrl-C (SIGINT) received' in stderr and 'Traceback' not in stderr, stderr
  lines = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'aborted at once' in lines[0], stderr


# ----------------------------------------------------------------------------- 4: workdirs


def _in_namespace(tmp_path, setup, command):
  """Runs shell `command` after shell `setup` in a private mount namespace (`unshare -rm`),
  where `setup` may mount; skips when the machine cannot make one."""
  probe_dir = tmp_path / 'probe_mount_point'
  probe_dir.mkdir(exist_ok=True)
  probe = subprocess.run(['unshare', '-rm', 'sh', '-c',
                          f'mount -t tmpfs -o size=64k tmpfs {probe_dir}'],
                         capture_output=True, text=True)
  if probe.returncode:
    pytest.skip(f'no private mount namespace here (unshare -rm: {probe.stderr.strip()})')
  return subprocess.run(['unshare', '-rm', 'sh', '-c', f'{setup} && {command}'], cwd=REPO,
                        env=subprocess_env.env(), capture_output=True, text=True, timeout=600)


def test_workdir_that_is_a_file_or_under_proc(tmp_path):
  (tmp_path / 'file').write_text('x')
  _error_line(_main(tmp_path / 'file'), 'is a file, not a directory')
  _error_line(_main('/proc/guidedflow_run'), '/proc/guidedflow_run', 'Errno')


def test_read_only_workdir_fails_before_training_or_sampling(run, tmp_path):
  workdir, before = run
  mount = tmp_path / 'ro'
  mount.mkdir()
  setup = f'mount --bind {workdir} {mount} && mount -o remount,ro,bind {mount}'
  for mode in ('train', 'sample'):
    out = _in_namespace(tmp_path, setup, shlex.join(
        _cmd(mount, '--config.train.num_steps=6', mode=mode)))
    _error_line(out, str(mount), 'Read-only file system', 'Errno 30')
    assert 'Restored checkpoint' not in out.stderr  # failed at start-up
  _kept(before, workdir)


def test_full_disk_keeps_the_previous_checkpoint_and_says_what_the_save_needs(tmp_path):
  mount = tmp_path / 'small_disk'
  mount.mkdir()
  # Room for one tiny checkpoint (about 0.45 MB with the logs), not two. The files are listed
  # before the namespace (and its disk) go away.
  out = _in_namespace(
      tmp_path, f'mount -t tmpfs -o size=700k tmpfs {mount}',
      f'{shlex.join(_cmd(mount / "run"))}; status=$?; '
      f'find {mount}/run/checkpoints -type f | sort | xargs sha256sum; exit $status')
  line = _error_line(out, 'No space left to save checkpoint step 4', 'needs about',
                     'previous checkpoint (step 2) is kept')
  assert 'MB free' in line
  saved = [ln.split()[1] for ln in out.stdout.splitlines() if '/checkpoints/' in ln]
  assert saved and all('/checkpoints/2/' in path for path in saved), saved


_CACHE_ON_A_FULL_DISK = textwrap.dedent("""
    import sys
    import numpy as np
    from guidedflow import input_pipeline, latent_cache

    class Space:  # a stand-in encoder: 64x64x4 latents of zeros (33.5 MB for 256 images)
      def latent_shape(self, shape):
        return (64, 64, 4)

      def encode(self, images):
        z = np.zeros((len(images), 64, 64, 4), np.float32)
        return z, z

    pixels = input_pipeline.ArrayDataset(np.zeros((256, 28, 28, 1), np.uint8),
                                         np.zeros(256, np.int32), num_classes=10)
    try:
      latent_cache.write(Space(), pixels, sys.argv[1], flip=False, batch_size=64)
    except OSError as e:
      print(f'error: {e}')
      sys.exit(1)
""")


def test_a_latent_cache_on_a_full_disk_is_an_os_error_not_a_crash(tmp_path):
  """The shard is memory-mapped for writing: without its blocks reserved up front, the first
  write into a page past the disk's end kills the process with SIGBUS."""
  mount = tmp_path / 'small_disk'
  mount.mkdir()
  out = _in_namespace(tmp_path, f'mount -t tmpfs -o size=1m tmpfs {mount}',
                      shlex.join([sys.executable, '-c', _CACHE_ON_A_FULL_DISK, str(mount)]))
  assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
  assert 'No space left on device' in out.stdout and 'Traceback' not in out.stderr


def test_disk_full_while_writing_is_one_error_and_removes_the_partial_save(tmp_path,
                                                                           monkeypatch):
  """ENOSPC from inside orbax (the real error is tensorstore's RESOURCE_EXHAUSTED)."""
  directory = tmp_path / 'checkpoints'
  with checkpointing.Checkpointer(directory, handle_sigterm=False) as ckpt:
    ckpt.save(2, _tree(1.0), data_state={'step': 2}, force=True)
    before = _files(directory)

    def full(step, *args, **kwargs):
      (directory / f'{step}.orbax-checkpoint-tmp').mkdir()
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0": Failed to write 278688 '
                       'bytes to file 20: No space left on device') from OSError(
                           errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(ckpt._manager, 'save', full)  # pylint: disable=protected-access
    with pytest.raises(checkpointing.DiskFullError, match='previous checkpoint .step 2. is kept'):
      ckpt.save(4, _tree(2.0), data_state={'step': 4}, force=True)
  assert _files(directory) == before and sorted(os.listdir(directory)) == ['2']


def test_config_and_data_errors_leave_no_new_workdir(tmp_path):
  _error_line(_main(tmp_path / 'a', '--config.sampling.method=rk4'), 'sampling.method')
  _error_line(_main(tmp_path / 'b', '--config.input.data_dir=/nonexistent'), '/nonexistent')
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


# ----------------------------------------------------------------------------- 7: resume


def test_resume_with_another_objective_is_refused_and_changes_nothing(run):
  workdir, before = run
  config_json = (workdir / 'config.json').read_text()
  out = _main(workdir, '--config.loss.parameterization=score', '--config.train.num_steps=6')
  _error_line(out, 'config.loss.parameterization', "'velocity'", "'score'",
              'allow_config_change=true')
  assert (workdir / 'config.json').read_text() == config_json
  assert _files(workdir / 'checkpoints') == before
  out = _main(workdir, '--config.path.schedule=cosine', '--config.train.num_steps=6',
              '--config.train.allow_config_change=true')
  assert out.returncode == 0, out.stderr[-3000:]
  assert "config.path.schedule changed from 'linear' to 'cosine'" in out.stderr
  assert 'config.train.num_steps: 4 -> 6' in out.stderr  # keys that may change are logged


def test_read_only_checkpoints_folder_fails_at_start_up(run, tmp_path):
  """A writable workdir whose checkpoints/ cannot be written (a read-only mount) fails before
  the first step, naming that folder, not at the first save after minutes of training."""
  workdir, before = run
  checkpoints = workdir / 'checkpoints'
  setup = f'mount --bind {checkpoints} {checkpoints} && mount -o remount,ro,bind {checkpoints}'
  out = _in_namespace(tmp_path, setup, shlex.join(_cmd(workdir, '--config.train.num_steps=600')))
  _error_line(out, f'the run folder {checkpoints}', 'Read-only file system')
  assert 'First step' not in out.stderr
  _kept(before, workdir)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_sampling_is_one_line_and_keeps_the_samples(run, signum):
  """SIGTERM (or a closed terminal) during --mode=sample ends it at once with one line and
  128 + the signal; the samples of an earlier call stay byte for byte."""
  workdir, _ = run
  assert _main(workdir, mode='sample').returncode == 0
  before = _files(workdir / 'samples')
  proc = subprocess.Popen(
      _cmd(workdir, '--config.sampling.num_samples=200000', '--config.sampling.num_steps=50',
           mode='sample'), cwd=REPO, env=subprocess_env.env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if 'Restored checkpoint' in line:
      time.sleep(2)  # inside the compile or the sampling
      proc.send_signal(signum)
      break
  stdout, rest = proc.communicate(timeout=120)
  out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, ''.join(lines) + rest)
  assert out.returncode == 128 + signum, out.stderr[-3000:]
  _error_line(out, f'stopped by {signal.Signals(signum).name} during --mode=sample')
  assert _files(workdir / 'samples') == before


# ----------------------------------------------------------------------------- workdir lock


def test_second_run_on_a_workdir_is_refused_and_a_dead_runs_lock_is_reclaimed(tmp_path):
  """A second training on a workdir in use exits 1 with one line naming the holder, and the
  first trains on untouched; a lock left by a killed run is taken over with a log line."""
  workdir = tmp_path / 'run'
  first = subprocess.Popen(
      _cmd(workdir, '--config.train.num_steps=100000', '--config.checkpoint.every_steps=1000000',
           '--config.train.log_every_steps=1'), cwd=REPO, env=subprocess_env.env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in first.stderr:
      if 'step 3/' in line:
        break
    holder = json.loads((workdir / '.lock').read_text())
    assert holder['pid'] == first.pid
    second = _main(workdir, '--config.optim.learning_rate=1e-3', '--config.train.seed=7')
    _error_line(second, f'--workdir {workdir} is in use by the training of PID {first.pid}',
                'use another --workdir')
    assert second.returncode == 1 and first.poll() is None  # the first trains on
    assert json.loads((workdir / 'config.json').read_text())['train']['seed'] == 0
  finally:
    first.kill()  # SIGKILL: no exit path runs, the lock stays
    first.communicate(timeout=60)
  assert json.loads((workdir / '.lock').read_text())['pid'] == first.pid
  third = _main(workdir, '--config.train.num_steps=4')
  assert third.returncode == 0, third.stderr[-3000:]
  assert f'Reclaiming the lock of --workdir {workdir}: its run (PID {first.pid}' in third.stderr
  assert not (workdir / '.lock').exists()  # released at the end


def test_a_history_it_cannot_continue_is_refused_until_restart_is_asked(run):
  """After every step turned out damaged, or with checkpoints/ deleted beside a result.json, a
  rerun does not silently train from step 0 over the old run: one line names the flag."""
  workdir, _ = run
  for step in ('2', '4'):
    _truncate_state(workdir / 'checkpoints' / step)
  _error_line(_main(workdir, '--config.train.num_steps=6'), 'None of the 2 checkpoint(s)')
  result_before = (workdir / 'result.json').read_bytes()
  refused = _main(workdir, '--config.train.num_steps=6')
  _error_line(refused, 'holds the result.json of a run and damaged checkpoints',
              '--config.train.restart=true')
  assert (workdir / 'result.json').read_bytes() == result_before  # nothing replaced
  restarted = _main(workdir, '--config.train.num_steps=4', '--config.train.restart=true')
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert 'training' in restarted.stderr and 'again from step 0' in restarted.stderr
  assert _result(restarted)['steps_this_run'] == 4
  shutil.rmtree(workdir / 'checkpoints')
  shutil.rmtree(str(workdir / 'checkpoints') + '_damaged')
  _error_line(_main(workdir, '--config.train.num_steps=4'), 'holds the result.json of a run',
              'no checkpoint to continue from')
