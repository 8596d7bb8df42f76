"""Shared by the launch-script tests (launch_test.py, launch_tpu_test.py): fake executables that
record their arguments, a clean environment with the fakes first on PATH, and running a script."""

import os
import shutil
import subprocess
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = ('tpu_vm.sh', 'gpu.sh', 'slurm.sbatch', 'local_multiprocess.sh', 'make_venv.sh')
BASH = shutil.which('bash')
SYSTEM_PATH = '/usr/bin:/bin'

# A fake executable: appends its name and arguments to $FAKE_CALLS (fields separated by \x1f,
# calls by \x1e), then runs the behaviour given after this prelude.
RECORDER = r"""#!/usr/bin/env bash
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\x1f%s' "$a"; done; printf '\x1e'; } >> "$FAKE_CALLS"
"""

# gcloud: `describe --format=value(state...)` pops the next state from $FAKE_STATES.
FAKE_GCLOUD = RECORDER + r"""
for a in "$@"; do
  case "$a" in
    --format=value\(state*) head -n 1 "$FAKE_STATES"; sed -i 1d "$FAKE_STATES" ;;
  esac
done
"""


def script_path(name):
  return os.path.join(LAUNCH, name)


def fake_executable(bin_dir, name, body=RECORDER):
  path = os.path.join(bin_dir, name)
  with open(path, 'w') as f:
    f.write(body)
  os.chmod(path, 0o755)
  return path


def recorded_calls(tmp_path):
  path = tmp_path / 'calls'
  if not path.exists():
    return []
  return [call.split('\x1f') for call in path.read_text().split('\x1e') if call]


def clean_env(tmp_path, fake_bin, **variables):
  """A clean environment (no TPU_NAME etc. from the caller) with the fakes first on PATH."""
  env = {'PATH': f'{fake_bin}:{SYSTEM_PATH}', 'HOME': str(tmp_path), 'LANG': 'C.UTF-8',
         'FAKE_CALLS': str(tmp_path / 'calls'), 'FAKE_STATES': str(tmp_path / 'states')}
  env.update({key: str(value) for key, value in variables.items()})
  return env


def run_script(name, *args, env, cwd=REPO, timeout=60):
  return subprocess.run([script_path(name), *args], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=timeout)


def wait_for(predicate, timeout=10):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.05)
