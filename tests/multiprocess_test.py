"""Two processes on localhost (`launch/local_multiprocess.sh`: `jax.distributed` with an explicit
coordinator, 2 simulated CPU devices each) running the real CLI: the same steps as one process,
and a SIGTERM to one process that makes both save the same step, exit 0 and resume.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from guidedflow import train_state
from tests import subprocess_env

REPO = subprocess_env.REPO
SCRIPT = os.path.join(REPO, 'launch', 'local_multiprocess.sh')


def _command(workdir, *args):
  return [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
          f'--workdir={workdir}', *args]


def _launch(log_dir, workdir, *args):
  """Starts 2 processes × 2 CPU devices; returns the launcher's Popen."""
  return subprocess.Popen(['bash', SCRIPT, '-n', '2', '-d', '2', '--log-dir', str(log_dir), '--',
                           *_command(workdir, *args)],
                          cwd=REPO, env=subprocess_env.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _logs(log_dir):
  return [open(os.path.join(log_dir, f'process_{i}.log')).read() for i in range(2)]


def _finish(launcher, log_dir, timeout=600):
  try:
    out, _ = launcher.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    launcher.kill()
    out, _ = launcher.communicate()
  logs = _logs(log_dir)
  assert launcher.returncode == 0, out + '\n'.join(log[-3000:] for log in logs)
  return logs


def _restore(workdir):
  config = tiny.get_config()
  with train_state.open_checkpointer(config, str(workdir), handle_sigterm=False) as ckpt:
    state, data_state = train_state.restore_or_init(
        train_state.builder(config, (28, 28, 1)), ckpt)
    steps = ckpt.all_steps()
  return jax.tree.map(np.asarray, jax.device_get(state)), data_state, steps


def _losses(log):
  return [float(x) for x in re.findall(r'step \d+/\d+  loss ([0-9.]+)', log)]


def test_two_processes_match_one_process(tmp_path):
  """3 steps on a hybrid mesh: FSDP over the 2 devices of each process, data parallel across
  the processes (dcn_shape), against one process with one device."""
  launcher = _launch(tmp_path / 'logs', tmp_path / 'two', '--config.train.num_steps=3',
                     '--config.mesh.shape=1,2,1', '--config.mesh.dcn_shape=2,1,1')
  subprocess.run(_command(tmp_path / 'one', '--config.train.num_steps=3'), cwd=REPO,
                 env=subprocess_env.env(), check=True, capture_output=True, timeout=600)
  logs = _finish(launcher, tmp_path / 'logs')
  for log in logs:
    assert 'process 0/2' in log or 'process 1/2' in log
    assert '4 devices (2 local)' in log
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in log
  two, two_data, _ = _restore(tmp_path / 'two')
  one, one_data, _ = _restore(tmp_path / 'one')
  assert int(two['step']) == int(one['step']) == 3
  assert two_data == one_data  # the same global batches were consumed
  # f32; 4 devices vs 1 reduce in different orders. Measured max difference ~1e-8.
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  np.testing.assert_allclose(_losses(logs[0]), _losses(logs[1]), rtol=0)  # one global loss


def test_sigterm_to_one_process_saves_the_same_step_and_resumes(tmp_path):
  log_dir, workdir = tmp_path / 'logs', tmp_path / 'run'
  long_run = ['--config.train.num_steps=100000', '--config.checkpoint.every_steps=100000']
  launcher = _launch(log_dir, workdir, *long_run)
  deadline = time.time() + 300
  while time.time() < deadline and launcher.poll() is None:
    time.sleep(0.5)
    if os.path.exists(log_dir / 'process_1.log') and 'step 5/' in _logs(log_dir)[1]:
      break
  assert launcher.poll() is None, launcher.communicate()[0]
  pid = int(open(log_dir / 'process_1.pid').read())
  os.kill(pid, signal.SIGTERM)  # one process only, as a preempted host would get
  logs = _finish(launcher, log_dir)
  stops = [re.findall(r'Stop requested .*: stopping at step (\d+)', log) for log in logs]
  assert stops[0] and stops[0] == stops[1], stops
  step = int(stops[0][0])
  state, _, steps = _restore(workdir)
  assert steps == [step] and int(state['step']) == step

  launcher = _launch(tmp_path / 'logs2', workdir, f'--config.train.num_steps={step + 2}')
  logs = _finish(launcher, tmp_path / 'logs2')
  for log in logs:
    assert f'Restored checkpoint at step {step}' in log
    assert f'step {step + 2}/{step + 2}' in log
  state, _, steps = _restore(workdir)
  assert int(state['step']) == step + 2 and step + 2 in steps


# In tests/latents_test.py's group: the autoencoder run it reads is trained once for both.
@pytest.mark.xdist_group('latents')
def test_two_processes_write_and_train_on_their_own_latent_cache_shards(tmp_path,
                                                                       latent_autoencoder_dir):
  """A latent generator over 2 processes: each encodes every other example into its own shard
  (meta.json once, by process 0), then trains on its shard alone (process-local reading)."""
  autoencoder_dir = latent_autoencoder_dir
  launcher = _launch(tmp_path / 'logs', tmp_path / 'run', '--config.train.num_steps=3',
                     '--config.model.variant=test/1', '--config.input.space=latents',
                     f'--config.autoencoder.workdir={autoencoder_dir}',
                     '--config.input.num_train_examples=96', '--config.eval.num_examples=40',
                     '--config.autoencoder.batch_size=16')
  logs = _finish(launcher, tmp_path / 'logs')
  cache = tmp_path / 'run' / 'latent_cache' / 'train'
  assert sorted(p.name for p in cache.glob('moments-*')) == [
      'moments-00000-of-00002.npy', 'moments-00001-of-00002.npy']
  assert np.load(cache / 'moments-00001-of-00002.npy').shape == (48, 2, 7, 7, 4)
  for process, log in enumerate(logs):
    assert f'process-locally: shard {process} of 2' in log
    assert 'step 3/3' in log
  np.testing.assert_allclose(_losses(logs[0]), _losses(logs[1]), rtol=0)  # one global loss
