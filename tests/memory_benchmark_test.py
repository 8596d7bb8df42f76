"""benchmarks/memory.py: exact sharded state bytes, the activation formula, largest batches."""

import contextlib
import importlib.util
import io
import math
import os

import jax
import numpy as np
import pytest

from guidedflow.models import precision
from guidedflow import train_state
from tests import subprocess_env

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (the benchmark run
# once) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('memory_benchmark')

_spec = importlib.util.spec_from_file_location(
    'memory_benchmark', os.path.join(subprocess_env.REPO, 'benchmarks', 'memory.py'))
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

MESHES = ((1, 1, 1), (1, 8, 1), (1, 64, 1))
CAPACITIES = (('small', 4), ('v5e', 16), ('v4', 32), ('v5p', 95))  # ascending


@pytest.fixture(scope='module')
def run():
  argv = ['--variant', 'S/2', '--meshes', *(','.join(map(str, m)) for m in MESHES),
          '--capacities', ','.join(f'{name}={gib}' for name, gib in CAPACITIES)]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    report = memory.main(argv)
  return report, printed.getvalue()


@pytest.fixture
def report(run):
  return run[0]


def _mesh(report, shape):
  return next(m for m in report['meshes'] if tuple(m['mesh']) == shape)


def _nbytes(x, divide=1):
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize // divide


def test_state_is_params_plus_adamw_plus_ema(report):
  state = _mesh(report, (1, 1, 1))['state']
  params = state['params']
  # S/2 on 32×32×4 latents, 1000 classes: 33.0M f32 parameters.
  assert 32e6 < params / 4 < 34e6
  assert state['ema_params'] == params
  # mu and nu in f32, plus two int32 counts (adam's and the learning-rate schedule's).
  assert state['opt_state'] == 2 * params + 2 * 4
  assert state['scalars'] == 2 * 4  # step, nonfinite_step
  assert state['total'] == 4 * params + 4 * 4


def test_fsdp8_state_is_exact_shard_sum():
  config = memory.recipe('S/2')
  abstract = train_state.builder(config, memory.IMAGE_SHAPE,
                                   memory.abstract_mesh((1, 8, 1))).abstract_state()
  mesh_sizes = {'data': 1, 'fsdp': 8, 'tensor': 1}
  expected = replicated_bytes = 0
  for path, x in jax.tree_util.tree_leaves_with_path(abstract):
    axes = [a for entry in x.sharding.spec for a in
            ((entry,) if isinstance(entry, str) else (entry or ()))]
    ways = math.prod(mesh_sizes[a] for a in axes)  # 8 if split over fsdp, else 1
    # Stacked (scanned) blocks: the size rule counts one layer of the leading 'layers' axis.
    stacked = "['blocks']" in jax.tree_util.keystr(path)
    per_layer = x.size // x.shape[0] if stacked else x.size
    assert ways in (1, 8) and (ways == 8 or per_layer < 4096 or 'tensor' in axes), path
    expected += _nbytes(x, ways)
    replicated_bytes += _nbytes(x) if ways == 1 else 0
  full = sum(_nbytes(x) for x in jax.tree.leaves(abstract))
  got = memory.state_bytes(abstract)['total']
  assert got == expected
  # Only small leaves (biases, the time-MLP input kernel, split over 'tensor') stay replicated.
  assert replicated_bytes < 0.01 * full
  assert full / 8 < got < full / 7.5


def test_report_state_shrinks_with_fsdp(report):
  totals = [_mesh(report, m)['state']['total'] for m in MESHES]
  assert totals[0] / 8 < totals[1] < totals[0] / 7.5
  assert totals[0] / 64 < totals[2] < totals[1] / 6


def test_gathered_working_set_hand_computed(report):
  # One S/2 block (h = 384, MLP 1536): qkv, proj, fc1, fc2, modulation kernels 18·h² and
  # biases 15·h elements, gathered whole (no tensor axis), × 2 (prefetch) × (2 bf16 weights +
  # 4 f32 gradient).
  h = 384
  assert _mesh(report, (1, 8, 1))['gathered'] == 2 * (18 * h * h + 15 * h) * (2 + 4)
  assert _mesh(report, (1, 1, 1))['gathered'] == 0
  # bf16 copies of the local f32 shards: half their bytes.
  for shape in MESHES:
    mesh = _mesh(report, shape)
    assert mesh['weight_casts'] == mesh['state']['params'] // 2


def test_max_batch_monotone_in_capacity_and_fsdp(report):
  names = [name for name, _ in CAPACITIES]
  for key in ('max_batch', 'max_batch_remat'):
    for shape in MESHES:
      batches = [_mesh(report, shape)[key][n] for n in names]
      assert batches == sorted(batches) and batches[0] < batches[-1], (key, shape, batches)
    for name in names:
      by_fsdp = [_mesh(report, shape)[key][name] for shape in MESHES]
      assert by_fsdp == sorted(by_fsdp), (key, name, by_fsdp)
    assert _mesh(report, (1, 1, 1))[key]['small'] < _mesh(report, (1, 8, 1))[key]['small']
  for shape in MESHES:
    mesh = _mesh(report, shape)
    for name in names:
      assert mesh['max_batch_remat'][name] >= mesh['max_batch'][name]
    # The definition: the largest B with fixed + B · per sample <= (1 − margin) · capacity.
    usable = (1 - report['margin']) * 16 * 2**30 - mesh['fixed']
    batch = mesh['max_batch']['v5e']
    assert batch * mesh['activation_per_sample'] <= usable
    assert (batch + 1) * mesh['activation_per_sample'] > usable


def test_activation_formula_hand_computed():
  config = memory.recipe('S/2')
  cfg = memory.dit_config(config)
  s, h, a = 256, 384, 6
  assert (cfg.num_tokens, cfg.width, cfg.num_heads, cfg.depth) == (s, h, a, 12)
  # bf16, t = 1: 32·s·h + 4·a·s² per block (Korthikanti's 32·s·h without dropout).
  assert memory.block_activation_bytes(cfg, 2) == 32 * s * h + 4 * a * s * s == 4_718_592
  # Outside the blocks: patch input 2·s·16, final LayerNorm 4·s·h, loss residual 4·s·16.
  assert memory.outside_activation_bytes(cfg, 2) == 4 * s * h + 6 * s * 16 == 417_792
  assert memory.activation_bytes_per_sample(cfg, 2) == 12 * 4_718_592 + 417_792 == 57_040_896
  # f32: 48·s·h + 4·a·s² per block.
  assert memory.block_activation_bytes(cfg, 4) == 48 * s * h + 4 * a * s * s == 6_291_456
  # Tensor parallel t = 2: s·h·(16 + (4 + 4)·2/2) + 4·a·s²/2.
  assert memory.block_activation_bytes(cfg, 2, tensor=2) == 24 * s * h + 2 * a * s * s
  # Remat every block: 12 f32 block inputs (4·s·h) + one block + outside.
  assert memory.activation_bytes_per_sample(cfg, 2, remat=True) == (
      12 * 4 * s * h + 4_718_592 + 417_792)
  # Korthikanti et al. eq. (1), 16-bit with dropout: s·h·(34 + 5·a·s/h); without: 32, 2.
  assert memory.korthikanti_block_bytes(cfg, dropout=True) == pytest.approx(
      34 * s * h + 5 * a * s * s)
  assert memory.korthikanti_block_bytes(cfg) == pytest.approx(32 * s * h + 2 * a * s * s)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_formula_matches_residuals_jax_saves(report, dtype):
  """The formula is an upper estimate of what `jax.vjp` keeps. With jax 0.10.2 it counts every
  (s, h)-sized residual (one bf16 (s, h) tensor more or fewer per block would be a 1.7% error:
  measured 0.2%); jax 0.12 saves 7-9% less (fewer f32 LayerNorm intermediates). A missing term
  (attention scores, the GeLU, the f32 norms) would break either bound."""
  computes_in = precision.resolve_compute_dtype(dtype, jax.default_backend())[0]
  if dtype == 'bfloat16' and computes_in == 'float32':
    # A CPU without bf16 units (AVX512-BF16 / AMX) builds the bf16 recipe in float32: the
    # residuals traced are the f32 model's, and the f32 formula is the one they must match.
    formula = memory.activation_bytes_per_sample(memory.dit_config(memory.recipe('S/2')), 4)
    traced = report['activations']['traced_per_sample']
  elif dtype == 'bfloat16':
    formula = report['activations']['per_sample']
    traced = report['activations']['traced_per_sample']
  else:
    config = memory.recipe('S/2')
    config.model.dtype = dtype
    formula = memory.activation_bytes_per_sample(memory.dit_config(config), 4)
    traced = memory.traced_residual_bytes_per_sample(config)
  if jax.__version__.startswith('0.10.'):
    assert formula <= traced < 1.01 * formula
  else:
    assert 0.85 * formula <= traced < 1.01 * formula


def test_tables_printed(run):
  report, out = run
  assert '| 1,8,1 | 8 |' in out and 'v5e 16 GiB' in out
  fsdp8 = _mesh(report, (1, 8, 1))
  assert f"| {fsdp8['max_batch']['v5e']} / {fsdp8['max_batch_remat']['v5e']} |" in out
