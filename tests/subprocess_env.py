"""Environment for tests that run guidedflow in a subprocess: CPU, the repo importable, and the
parent's persistent compilation cache (so the child does not recompile what the suite has)."""

import os

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
  result = dict(os.environ)
  result['PYTHONPATH'] = REPO + os.pathsep + result.get('PYTHONPATH', '')
  result['JAX_PLATFORMS'] = 'cpu'
  result['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir or ''
  result['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return result


def one_error_line(proc, *fragments):
  """The one `error:` line of a failed `guidedflow.main` run (asserted: exit status ≠ 0, no
  traceback on stderr, exactly one such line, holding every one of `fragments`)."""
  assert proc.returncode != 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-5000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]
