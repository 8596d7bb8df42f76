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
