"""launch/tpu_vm.sh: fail-early checks and the gcloud commands it runs (create, setup, train,
stop, samples, delete; the ahead-of-time compile first), against a fake gcloud that records them."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from tests.launch_scripts import (
    BASH, SYSTEM_PATH, RECORDER, FAKE_GCLOUD, script_path, fake_executable, recorded_calls,
    clean_env, run_script, wait_for)


# ----------------------------------------------------------------------------- tpu_vm.sh

# COMPILE=0: these tests are about gcloud; the local compile `create` runs first has its own.
_TPU = {'TPU_NAME': 'gf-test', 'ZONE': 'us-central2-b', 'ACCELERATOR_TYPE': 'v4-32',
        'REPO_URL': 'https://example.com/guidedflow.git', 'CONFIG': 'configs/fashion_mnist.py',
        'WORKDIR': 'gs://bucket/runs/fmnist', 'COMPILE': '0'}


@pytest.fixture
def gcloud(tmp_path, fake_bin):
  fake_executable(fake_bin, 'gcloud', FAKE_GCLOUD)

  def run(*args, drop=(), **variables):
    settings = {key: value for key, value in {**_TPU, **variables}.items() if key not in drop}
    return run_script('tpu_vm.sh', *args, env=clean_env(tmp_path, fake_bin, **settings))

  return run


def _ssh_command(call):
  """The --command of a recorded `gcloud compute tpus tpu-vm ssh` call."""
  assert call[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], call
  (command,) = [arg[len('--command='):] for arg in call if arg.startswith('--command=')]
  return command


@pytest.mark.parametrize('subcommand,missing', [
    ('create', 'ACCELERATOR_TYPE'), ('create', 'ZONE'), ('create', 'TPU_NAME'),
    ('setup', 'REPO_URL'), ('train', 'CONFIG'), ('train', 'WORKDIR'), ('all', 'REPO_URL'),
    ('all', 'CONFIG'), ('logs', 'TPU_NAME'), ('stop', 'ZONE'), ('delete', 'ZONE'),
    ('status', 'TPU_NAME'), ('samples', 'WORKDIR'),
])
def test_tpu_missing_variable_fails_before_running_anything(gcloud, tmp_path, subcommand, missing):
  result = gcloud(subcommand, drop=(missing,))
  assert result.returncode != 0
  assert f'{missing} is not set' in result.stderr
  assert f"'{subcommand}' needs it" in result.stderr
  assert recorded_calls(tmp_path) == []


def test_tpu_samples_from_a_local_workdir_needs_the_tpu(gcloud, tmp_path):
  result = gcloud('samples', WORKDIR='runs/x', drop=('TPU_NAME',))
  assert result.returncode != 0 and 'TPU_NAME is not set' in result.stderr
  assert recorded_calls(tmp_path) == []


def test_tpu_create_queued_spot(gcloud, tmp_path):
  result = gcloud('create', QUEUED=1, SPOT=1, ACCELERATOR_TYPE='v5p-64', PROJECT='my-proj')
  assert result.returncode == 0, result.stderr
  (call,) = recorded_calls(tmp_path)
  assert call[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'gf-test-qr']
  assert set(call[6:]) == {'--node-id=gf-test', '--zone=us-central2-b', '--project=my-proj',
                           '--accelerator-type=v5p-64', '--spot',
                           '--runtime-version=v2-alpha-tpuv5'}


def test_tpu_create_plain_vm(gcloud, tmp_path):
  result = gcloud('create')
  assert result.returncode == 0, result.stderr
  (call,) = recorded_calls(tmp_path)
  assert call == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'gf-test',
                  '--zone=us-central2-b', '--accelerator-type=v4-32',
                  '--version=tpu-ubuntu2204-base']


@pytest.mark.parametrize('accelerator,variables,version', [
    ('v5litepod-8', {}, 'v2-alpha-tpuv5-lite'),
    ('v6e-8', {}, 'v2-alpha-tpuv6e'),
    ('v3-8', {}, 'tpu-ubuntu2204-base'),
    ('v4-8', {'RUNTIME_VERSION': 'tpu-vm-v4-base'}, 'tpu-vm-v4-base'),
])
def test_tpu_runtime_version_by_accelerator(gcloud, tmp_path, accelerator, variables, version):
  assert gcloud('create', ACCELERATOR_TYPE=accelerator, **variables).returncode == 0
  (call,) = recorded_calls(tmp_path)
  assert f'--version={version}' in call


def test_tpu_unknown_accelerator_asks_for_runtime_version(gcloud, tmp_path):
  result = gcloud('create', ACCELERATOR_TYPE='x9-8')
  assert result.returncode != 0 and 'set RUNTIME_VERSION' in result.stderr
  assert recorded_calls(tmp_path) == []


def test_tpu_train_starts_guidedflow_on_all_workers(gcloud, tmp_path):
  result = gcloud('train', EXTRA_ARGS='--config.train.num_steps=7')
  assert result.returncode == 0, result.stderr
  (call,) = recorded_calls(tmp_path)
  assert call[5:8] == ['gf-test', '--zone=us-central2-b', '--worker=all']
  command = _ssh_command(call)
  for needle in ['nohup', '.venv/bin/python -m guidedflow.main', '--config configs/fashion_mnist.py',
                 '--workdir gs://bucket/runs/fmnist', '--config.mesh.distributed=on',
                 '--config.train.num_steps=7', '>> train.log']:
    assert needle in command, needle


def test_tpu_local_workdir_warns(gcloud):
  result = gcloud('train', WORKDIR='runs/x')
  assert result.returncode == 0 and 'is not gs://' in result.stderr


def test_tpu_train_and_stop_commands_run_in_a_posix_shell(gcloud, tmp_path):
  """Runs the remote train/stop commands with sh in a fake worker home: quoting, nohup, pid file,
  the already-running guard and SIGTERM."""
  home = tmp_path / 'worker'
  venv_bin = home / 'guidedflow' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  fake_executable(venv_bin, 'python', r"""#!/usr/bin/env bash
trap 'echo SIGTERM > "$HOME/stopped"; exit 0' TERM
echo "$GF_TEST" > "$HOME/remote_env"
printf '%s\n' "$@" > "$HOME/argv"
while :; do sleep 0.05; done
""")
  extra = "--config.mesh.shape='(-1, 1, 1)' --config.train.num_steps=7"
  log = "logs/it's a.log"  # quoted for the worker's shell, a folder that train makes
  assert gcloud('train', EXTRA_ARGS=extra, REMOTE_ENV='GF_TEST=1', LOG_FILE=log).returncode == 0
  assert gcloud('stop', LOG_FILE=log).returncode == 0
  train, stop = map(_ssh_command, recorded_calls(tmp_path))
  worker_env = {'PATH': SYSTEM_PATH, 'HOME': str(home), 'FAKE_CALLS': str(tmp_path / 'calls')}

  def on_worker(command):
    return subprocess.run(['sh', '-c', command], cwd=home, env=worker_env, capture_output=True,
                          text=True, timeout=30)

  started = on_worker(train)
  assert started.returncode == 0, started.stderr
  pid = int((home / 'guidedflow' / 'logs' / "it's a.pid").read_text())
  try:
    wait_for(lambda: (home / 'argv').exists() and (home / 'argv').read_text().endswith('7\n'))
    assert (home / 'argv').read_text().splitlines() == [
        '-m', 'guidedflow.main', '--config', 'configs/fashion_mnist.py', '--workdir',
        'gs://bucket/runs/fmnist', '--config.mesh.distributed=on', '--config.mesh.shape=(-1, 1, 1)',
        '--config.train.num_steps=7']
    assert f'training, pid {pid}' in started.stdout
    assert (home / 'remote_env').read_text() == '1\n'
    again = on_worker(train)
    assert again.returncode != 0 and f'already training (pid {pid})' in again.stderr
    stopped = on_worker(stop)
    assert stopped.returncode == 0 and f'sent SIGTERM to pid {pid}' in stopped.stdout
    wait_for(lambda: (home / 'stopped').exists())
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert (home / 'guidedflow' / log).read_text().startswith('=== ')


@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_tpu_setup_command_runs_in_a_posix_shell(gcloud, tmp_path):
  """Runs the remote setup command with sh against a local git repository, with fake sudo,
  python3 and pip: clone at REPO_REF, venv, pip install of the checkout (with the gcs extra) and jax[tpu]."""
  origin = tmp_path / 'origin'
  git_env = {'PATH': SYSTEM_PATH, 'HOME': str(tmp_path), 'GIT_AUTHOR_NAME': 'a',
             'GIT_AUTHOR_EMAIL': 'a@b', 'GIT_COMMITTER_NAME': 'a', 'GIT_COMMITTER_EMAIL': 'a@b'}
  for args in (['init', '-q', str(origin)], ['-C', str(origin), 'commit', '-q', '--allow-empty',
               '-m', 'one'], ['-C', str(origin), 'tag', 'v1'], ['-C', str(origin), 'commit', '-q',
               '--allow-empty', '-m', 'two']):
    subprocess.run(['git', *args], env=git_env, check=True, capture_output=True)
  tagged = subprocess.run(['git', '-C', str(origin), 'rev-parse', 'v1'], env=git_env, check=True,
                          capture_output=True, text=True).stdout.strip()
  assert gcloud('setup', REPO_URL=str(origin), REPO_REF='v1').returncode == 0
  (call,) = recorded_calls(tmp_path)
  assert '--worker=all' in call
  command = _ssh_command(call)

  home = tmp_path / 'worker'
  home.mkdir()
  worker_bin = tmp_path / 'worker_bin'
  worker_bin.mkdir()
  fake_executable(worker_bin, 'sudo')
  pip = fake_executable(tmp_path, 'pip')  # copied into the venv that the fake python3 makes
  fake_executable(worker_bin, 'python3', RECORDER + r"""
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\necho 0.0-fake\n' > "$3/bin/python"
  chmod +x "$3/bin/python"
  cp "$FAKE_PIP" "$3/bin/pip"
fi
""")
  (tmp_path / 'calls').unlink()
  result = subprocess.run(['sh', '-c', command], cwd=home, capture_output=True, text=True,
                          timeout=60, env={**git_env, 'HOME': str(home),
                                           'PATH': f'{worker_bin}:{SYSTEM_PATH}',
                                           'FAKE_CALLS': str(tmp_path / 'calls'),
                                           'FAKE_PIP': pip})
  assert result.returncode == 0, result.stderr
  checkout = home / 'guidedflow'
  head = subprocess.run(['git', '-C', str(checkout), 'rev-parse', 'HEAD'], env=git_env,
                        check=True, capture_output=True, text=True).stdout.strip()
  assert head == tagged
  calls = recorded_calls(tmp_path)
  assert ['sudo', 'DEBIAN_FRONTEND=noninteractive', 'apt-get', '-qq', '-o',
          'DPkg::Lock::Timeout=600', 'install', '-y', 'dataset-fashion-mnist'] in calls
  assert ['python3', '-m', 'venv', './guidedflow/.venv'] in calls
  assert ['pip', 'install', '-q', '-e', './guidedflow[gcs]', 'jax[tpu]'] in calls
  assert 'guidedflow ' + tagged[:7] in result.stdout and 'jax 0.0-fake' in result.stdout


def test_tpu_logs_stop_status_delete(gcloud, tmp_path):
  for args, variables in [(['logs'], {}), (['logs'], {'WORKER': '2'}), (['stop'], {}),
                          (['status'], {}), (['delete'], {}), (['delete'], {'QUEUED': '1'})]:
    assert gcloud(*args, **variables).returncode == 0
  logs0, logs2, stop, describe, status, delete, delete_queued = recorded_calls(tmp_path)
  assert '--worker=0' in logs0 and 'tail -n 100 -f train.log' in _ssh_command(logs0)
  assert '--worker=2' in logs2
  assert '--worker=all' in stop and 'kill -TERM' in _ssh_command(stop)
  assert describe == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'gf-test',
                      '--zone=us-central2-b']
  assert '--worker=all' in status and 'not training' in _ssh_command(status)
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'gf-test',
                    '--zone=us-central2-b']
  assert delete_queued == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
                           'gf-test-qr', '--zone=us-central2-b', '--force']


def test_tpu_samples(gcloud, tmp_path):
  local = tmp_path / 'out'
  assert gcloud('samples', LOCAL_DIR=local, drop=('TPU_NAME', 'ZONE')).returncode == 0
  assert gcloud('samples', LOCAL_DIR=local, WORKDIR='runs/x').returncode == 0
  assert gcloud('samples', LOCAL_DIR=local, WORKDIR='/data/runs/x/').returncode == 0
  from_gcs, from_relative, from_absolute = recorded_calls(tmp_path)
  assert from_gcs == ['gcloud', 'storage', 'cp', '-r', 'gs://bucket/runs/fmnist/samples',
                      f'{local}/']
  assert from_relative == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp',
                           'gf-test:guidedflow/runs/x/samples', f'{local}/', '--recurse',
                           '--worker=0', '--zone=us-central2-b']
  assert from_absolute[5] == 'gf-test:/data/runs/x/samples'
  assert local.is_dir()


def test_tpu_all_queued_waits_then_sets_up_and_trains(gcloud, tmp_path):
  (tmp_path / 'states').write_text('WAITING_FOR_RESOURCES\nACTIVE\n')
  result = gcloud('all', QUEUED=1, POLL_SECONDS=1)
  assert result.returncode == 0, result.stderr
  create, poll1, poll2, setup, train = recorded_calls(tmp_path)
  assert create[3:5] == ['queued-resources', 'create']
  assert poll1 == poll2 == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe',
                            'gf-test-qr', '--zone=us-central2-b', '--format=value(state.state)']
  assert 'git clone' in _ssh_command(setup)
  assert 'guidedflow.main' in _ssh_command(train)


def test_tpu_wait_stops_on_failed_state(gcloud, tmp_path):
  (tmp_path / 'states').write_text('FAILED\n')
  result = gcloud('wait')
  assert result.returncode != 0 and 'state FAILED' in result.stderr


def test_tpu_dry_run_prints_and_runs_nothing(gcloud, tmp_path):
  result = gcloud('all', '--dry-run', QUEUED=1, SPOT=1)
  assert result.returncode == 0, result.stderr
  assert recorded_calls(tmp_path) == []
  lines = [line for line in result.stdout.splitlines() if line.startswith('+ gcloud')]
  assert len(lines) == 4
  create = shlex.split(lines[0][2:])
  assert create[3:5] == ['queued-resources', 'create'] and '--spot' in create
  train = shlex.split(lines[3][2:])
  assert '--config.mesh.distributed=on' in train[-1]


def test_tpu_without_gcloud_fails_early(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  result = subprocess.run([BASH, script_path('tpu_vm.sh'), 'delete'], capture_output=True, text=True,
                          env={'PATH': str(empty), **_TPU})
  assert result.returncode != 0 and 'gcloud not found' in result.stderr


@pytest.mark.parametrize('args,message', [
    ([], 'missing SUBCOMMAND'), (['launch'], "unknown subcommand 'launch'"),
    (['create', 'delete'], 'one subcommand at a time'), (['--bogus'], "unknown option '--bogus'"),
])
def test_tpu_bad_arguments(gcloud, tmp_path, args, message):
  result = gcloud(*args)
  assert result.returncode != 0 and message in result.stderr
  assert recorded_calls(tmp_path) == []


# A python that records its arguments and JAX_PLATFORMS, and exits with $FAKE_PYTHON_RC.
_FAKE_COMPILE_PYTHON = RECORDER + r"""
echo "$JAX_PLATFORMS" > "$FAKE_CALLS.jax_platforms"
exit "${FAKE_PYTHON_RC:-0}"
"""


def test_tpu_create_compiles_the_config_here_first(gcloud, tmp_path, fake_bin):
  python = fake_executable(fake_bin, 'python', _FAKE_COMPILE_PYTHON)
  result = gcloud('create', COMPILE=1, LOCAL_PYTHON=python, ACCELERATOR_TYPE='v5p-64',
                  EXTRA_ARGS="--config.mesh.shape='(4,8,1)' --config.train.batch_size=256",
                  COMPILE_DIR=tmp_path / 'compile_out')
  assert result.returncode == 0, result.stderr
  compile_call, create = recorded_calls(tmp_path)
  assert compile_call == [
      'python', '-m', 'guidedflow.main', '--mode=compile', '--config', 'configs/fashion_mnist.py',
      '--workdir', f'{tmp_path}/compile_out', '--config.compile.topology=v5p-64',
      '--config.mesh.shape=(4,8,1)', '--config.train.batch_size=256']
  assert (tmp_path / 'calls.jax_platforms').read_text().strip() == 'cpu'
  assert create[3:5] == ['tpu-vm', 'create'] and 'fits v5p-64' in result.stderr


def test_tpu_create_stops_when_the_config_does_not_compile(gcloud, tmp_path, fake_bin):
  python = fake_executable(fake_bin, 'python', _FAKE_COMPILE_PYTHON)
  result = gcloud('all', COMPILE=1, LOCAL_PYTHON=python, FAKE_PYTHON_RC=1)
  assert result.returncode != 0
  assert 'did not compile for v4-32' in result.stderr and 'COMPILE=0' in result.stderr
  assert [call[0] for call in recorded_calls(tmp_path)] == ['python']  # no TPU created


def test_tpu_create_needs_the_config_it_compiles(gcloud, tmp_path):
  result = gcloud('create', COMPILE=1, drop=('CONFIG',))
  assert result.returncode != 0 and 'CONFIG is not set' in result.stderr
  assert recorded_calls(tmp_path) == []


def test_tpu_dry_run_prints_the_compile_first(gcloud, tmp_path):
  result = gcloud('all', '--dry-run', COMPILE=1)
  assert result.returncode == 0, result.stderr
  assert recorded_calls(tmp_path) == []  # a dry run calls nothing
  lines = [line for line in result.stdout.splitlines() if line.startswith('+ ')]
  assert '--mode=compile' in lines[0] and lines[1].startswith('+ gcloud compute tpus tpu-vm create')


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason=f'libtpu is not installed for Python {sys.version.split()[0]}')
def test_tpu_compile_runs_xla_tpu_here_without_gcloud(tmp_path, fake_bin):
  """The real compile (no fake): tiny.py for a v5e-4, on this CPU, with no gcloud on PATH."""
  env = clean_env(tmp_path, fake_bin, CONFIG='configs/tiny.py', ACCELERATOR_TYPE='v5litepod-4',
             LOCAL_PYTHON=sys.executable, COMPILE_DIR=tmp_path / 'compiled')
  result = run_script('tpu_vm.sh', 'compile', env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / 'compiled' / 'compile.json').read_text())
  assert report['ici_topology'] == 'v5e:2x2' and 'fits v5litepod-4' in result.stderr
