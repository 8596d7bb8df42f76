"""Shared pytest setup: a persistent XLA compilation cache so repeated runs compile less."""

import os

# Tests run on CPU. libtpu (installed by the test extra for tests/aot_test.py, which asks for
# TPU topologies explicitly) would otherwise make every process probe for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

_CACHE_DIR = os.environ.get(
    "GUIDEDFLOW_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
