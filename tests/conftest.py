"""Shared pytest setup: a persistent XLA compilation cache so repeated runs compile less."""

import os

import jax

_CACHE_DIR = os.environ.get(
    "GUIDEDFLOW_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
