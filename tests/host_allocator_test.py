"""`host_allocator.keep_freed_memory`: XLA:CPU's temporaries stop costing page faults.

Each case runs a child process (the allocator must be set before JAX starts its threads) that
executes a jitted function with a 128 MiB temporary several times and counts the minor page
faults of the median later run (`getrusage`): with glibc's default the temporary is mapped afresh and
faulted in on every run; kept, the later runs fault (almost) nothing. Counts, not times.
"""

import json
import subprocess
import sys

import pytest

from guidedflow import host_allocator
from tests import subprocess_env

_CHILD = r'''
import json, resource, sys
from guidedflow import host_allocator
said = host_allocator.keep_freed_memory()
import jax, jax.numpy as jnp
from jax import lax

@jax.jit
def f(x):  # the barrier keeps sin(x) (128 MiB) a temporary of its own, not fused away
  y = lax.optimization_barrier(jnp.sin(x))
  return (y * 2.0).sum()

x = jnp.ones((32 * 1024 * 1024,), jnp.float32)
compiled = f.lower(x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
for _ in range(3):
  f(x).block_until_ready()
counts = []
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(counts)[3]  # the median run: the heap may still settle in one of them
print(json.dumps(dict(said=said, temp_pages=temp / resource.getpagesize(), faults=faults)))
'''


def _run(choice):
  env = subprocess_env.env()
  env[host_allocator.ENV] = choice
  proc = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc page-fault behaviour')
def test_kept_memory_is_not_faulted_in_again_each_run():
  system, kept = _run('system'), _run('keep')
  assert system['temp_pages'] >= 32 * 1024  # the 128 MiB temporary is there
  assert 'system default' in system['said'] and 'keeps freed memory' in kept['said']
  # glibc's default: the temporary is mapped and faulted in again on every run.
  assert system['faults'] > 0.5 * system['temp_pages'], system
  # kept: the later runs reuse the heap; nothing (or almost nothing) is faulted in.
  assert kept['faults'] < 0.05 * kept['temp_pages'], kept


def test_bad_setting_is_refused(monkeypatch):
  monkeypatch.setenv(host_allocator.ENV, 'tcmalloc')
  with pytest.raises(ValueError, match='GUIDEDFLOW_HOST_ALLOCATOR=.tcmalloc.: use keep or system'):
    host_allocator.keep_freed_memory()


def test_accelerator_hosts_keep_the_system_default(monkeypatch):
  monkeypatch.setenv(host_allocator.ENV, 'keep')
  monkeypatch.setattr(host_allocator, '_cpu_only', lambda: False)
  assert 'system default' in host_allocator.keep_freed_memory()
