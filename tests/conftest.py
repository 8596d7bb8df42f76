"""Shared pytest setup: fast XLA:CPU compiles and a persistent compilation cache."""

import importlib.metadata
import os

import pytest

# Tests run on CPU. libtpu (installed by the test extra for tests/aot_test.py, which asks for
# TPU topologies explicitly) would otherwise make every process probe for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite's time on a 2-core CI machine is mostly XLA:CPU compiling small programs. Two flags
# make those compiles cheaper and leave the programs the same at the HLO level (fusion, sharding,
# layouts, the dot dtypes tests/precision_test.py checks): LLVM at -O0, and (jaxlib 0.10, whose
# XLA still has them) the loop emitters for fusions instead of the MLIR fusion emitters;
# tests/models_test.py, cold cache: 100 s -> 88 s -> 45 s. Set in the environment, so that
# subprocesses the tests start inherit them; a flag already in XLA_FLAGS is kept.
_FAST_COMPILE = {"xla_backend_optimization_level": "0"}
if importlib.metadata.version("jaxlib").startswith("0.10."):
  _FAST_COMPILE["xla_cpu_use_fusion_emitters"] = "false"  # an unknown flag from jaxlib 0.12 on
for flag, value in _FAST_COMPILE.items():
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f'{os.environ.get("XLA_FLAGS", "")} --{flag}={value}'.strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

_CACHE_DIR = os.environ.get(
    "GUIDEDFLOW_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope='session')
def latent_autoencoder_dir(tmp_path_factory):
  """A tiny Fashion-MNIST autoencoder run (tests/latents_test.py's config), trained once for the
  tests of the xdist_group 'latents' (tests/latents_test.py and the latent cache test of
  tests/multiprocess_test.py, which only read it)."""
  from guidedflow import train  # pylint: disable=g-import-not-at-top
  from tests import latents_test  # pylint: disable=g-import-not-at-top
  config = latents_test._autoencoder_config()  # pylint: disable=protected-access
  workdir = str(tmp_path_factory.mktemp('autoencoder'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='session')
def tiny_run_dir(tmp_path_factory):
  """`python -m guidedflow.main --config configs/tiny.py` run to its end (checkpoints at steps 2
  and 4), once for the tests of the xdist_group 'tiny_run' (tests/reliability_test.py,
  tests/cli_errors_test.py); each takes a copy before it changes anything."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import subprocess_env  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('tiny_run') / 'run'
  proc = subprocess.run([sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
                         f'--workdir={workdir}', '--mode=train'], cwd=subprocess_env.REPO,
                        env=subprocess_env.env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture
def fake_bin(tmp_path):
  """An empty directory for fake executables (tests/launch_scripts.py puts it first on PATH)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  return bin_dir


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Puts the `xdist_group` name back into each marked test's node id under `--dist loadgroup`.

  pytest-xdist (3.8) groups tests by an `@group` suffix it writes to `item._nodeid`; pytest 9
  keeps the node id in `item._id`, so that write is lost and every group is split over the
  workers: each worker then builds the group's module fixtures (training runs, subprocesses)
  again. Nothing to do where xdist's own suffix took effect (pytest 8).
  """
  if not getattr(config.option, 'loadgroup', False):
    return
  for item in items:
    groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get('name', 'default'))
                     for mark in item.iter_markers('xdist_group')})
    suffix = '@' + '_'.join(groups)
    node_id = getattr(item, '_id', None)
    if groups and node_id is not None and not item.nodeid.endswith(suffix):
      item._id = type(node_id).parse(item.nodeid + suffix)  # pylint: disable=protected-access
