"""The benchmarks run at smoke size and print well-formed numbers (they never assert speed)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx
import pytest

from guidedflow import models
from tests import subprocess_env

REPO = subprocess_env.REPO


def _run(script, *args):
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', script), *args],
                       cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True,
                       timeout=600, check=True)
  return out.stdout


def test_model_throughput_smoke():
  report = json.loads(_run('model_throughput.py', '--smoke', '--json', '--dtypes', 'f32'))
  assert report['device'].startswith('cpu') and report['matmul'][0]['gflops'] > 0
  rows = report['models']
  assert {(r['model'], r['pass']) for r in rows} == {
      (m, p) for m in ('dit-test/4', 'unet-tiny') for p in ('fwd', 'fwd+bwd')}
  for r in rows:
    assert r['images_per_s'] > 0 and r['gflops_per_s'] > 0 and r['compile_s'] > 0
  fwd = {r['model']: r['gflop_per_image'] for r in rows if r['pass'] == 'fwd'}
  bwd = {r['model']: r['gflop_per_image'] for r in rows if r['pass'] == 'fwd+bwd'}
  assert all(abs(bwd[m] - 3 * fwd[m]) < 1e-9 for m in fwd)


def test_sampling_throughput_smoke_counts_cfg_nfe():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from guidedflow import sampling  # pylint: disable=g-import-not-at-top
  report = json.loads(_run('sampling_throughput.py', '--smoke', '--json'))
  assert {r['method'] for r in report['rows']} == set(sampling.METHODS)
  rows_run = []

  def counting_model(x, t, y):
    del y
    jax.debug.callback(lambda times: rows_run.append(len(times)), t)
    return -x

  # The reported NFE is the number of model evaluations the same sampler settings run, counted
  # from the rows the model is called on (a doubled CFG batch counts 2): a sampler whose NFE
  # were a formula out of step with what it runs fails here.
  for r in report['rows']:
    rows_run.clear()
    w = r.get('guidance_scale', report['guidance_scale'])
    samples, _ = sampling.sample(
        counting_model, jax.random.PRNGKey(0), jnp.zeros((2,), jnp.int32), shape=(3,),
        path='linear', parameterization='velocity', null_label=1, guidance_scale=float(w),
        method=r['method'], num_steps=r['num_steps'], sigma=0.5,
        guidance_interval=r.get('guidance_interval'))
    jax.block_until_ready(samples)
    jax.effects_barrier()
    assert r['nfe'] == sum(rows_run) // 2, r
  assert all(r['images_per_s'] > 0 for r in report['rows'])
  table = _run('sampling_throughput.py', '--smoke')
  assert 'NFE' in table and 'euler_maruyama' in table


def test_step_throughput_smoke():
  """The real train step and the sampler at smoke size: peaks, FLOP counts, honest NFE."""
  report = json.loads(_run('step_throughput.py', '--smoke', '--json', '--cases', 'unet-tiny',
                           '--dtypes', 'f32'))
  assert report['header']['cpu'] and report['header']['jax']
  assert report['peaks']['f32'] > 0 and report['peaks']['bf16'] > 0
  (row,) = report['rows']
  steps = row['sample_steps']
  # Euler: one model evaluation per step; CFG (w = 2) doubles the batch, w = 1 does not.
  assert (row['cfg_nfe'], row['cond_nfe']) == (2 * steps, steps)
  assert row['train_images_per_s'] > 0 and row['cfg_samples_per_s'] > 0
  # The FLOPs it divides by are the named U-Net's (8/16 channels, one block per level, no norm):
  # XLA's own count of that network's forward, within the analytic count's 15 %.
  model = models.create_model('unet', input_size=28, in_channels=1, num_classes=10,
                              channels=(8, 16), num_residual_layers=1, norm='none',
                              rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  x, t, y = jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  cost = jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, y)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 0.85 < row['gflop_per_image'] * 1e9 / cost['flops'] < 1.15
  assert row['train_gflops'] > 0 and 0 < row['train_x_peak']
  assert row['fwd_ms'] > 0 and row['fwd_doubled_ms'] > 0 and row['cfg_vs_fwd'] > 0


def test_step_throughput_sweeps_model_options(tmp_path):
  """--train_batch / --remat / --scan_blocks lists: one row per combination, built as asked (the
  footprint grows with the batch, the unscanned model compiles a different program); --out
  writes the report that --print turns back into the table."""
  out = tmp_path / 'sweep.json'
  report = json.loads(_run('step_throughput.py', '--smoke', '--json', '--cases', 'dit-test',
                           '--dtypes', 'f32', '--train_only', '--train_batch', '2,16',
                           '--remat', 'none,full', '--scan_blocks', 'true,false',
                           '--out', str(out)))
  rows = report['rows']
  assert [(r['train_batch'], r['remat'], r['scan_blocks']) for r in rows] == [
      (b, remat, scan) for b in (2, 16) for remat in ('none', 'full') for scan in (True, False)]
  for r in rows:
    assert r['train_images_per_s'] > 0 and r['train_footprint_gb'] > 0 and 'cfg_nfe' not in r
  by = {(r['train_batch'], r['remat'], r['scan_blocks']): r for r in rows}
  assert by[16, 'none', True]['train_footprint_gb'] > by[2, 'none', True]['train_footprint_gb']
  assert json.loads(out.read_text())['rows'] == rows
  table = _run('step_throughput.py', '--print', str(out))
  assert len([line for line in table.splitlines() if line.startswith('dit-test')]) == 8


def test_step_throughput_records_a_failing_row_and_goes_on():
  """A combination that cannot be built (cuDNN attention in f32) is a row with its error; the
  next one still runs, the JSON is complete and the exit status says something failed."""
  out = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'step_throughput.py'),
                        '--smoke', '--json', '--cases', 'dit-test', '--dtypes', 'f32',
                        '--train_only', '--attention_impl', 'cudnn,einsum'],
                       cwd=REPO, env=subprocess_env.env(), capture_output=True, text=True,
                       timeout=600, check=False)
  assert out.returncode == 1, out.stderr
  failed, ran = json.loads(out.stdout)['rows']
  assert failed['attention_impl'] == 'cudnn' and 'bfloat16' in failed['error']
  assert 'train_images_per_s' not in failed
  assert ran['attention_impl'] == 'einsum' and ran['train_images_per_s'] > 0
  assert 'FAILED dit-test f32 batch 8' in out.stderr


def _sweep_rows(key, scales, fds):
  return [{key: s, 'nfe': 19, 'classifier_nfe': 19 if key == 'classifier_scale' else 0,
           'fd': fd, 'recall': 0.6 - 0.1 * i, 'precision': 0.8, 'accuracy': 0.8 + 0.05 * i,
           'images_per_s': 20.0, 'num_samples': 100}
          for i, (s, fd) in enumerate(zip(scales, fds))]


def test_guidance_routes_table_and_figure(tmp_path):
  cfg, cg = tmp_path / 'cfg.json', tmp_path / 'cg.json'
  cfg.write_text(json.dumps(_sweep_rows('guidance_scale', [1.0, 2.0], [12.0, 9.5])))
  cg.write_text(json.dumps(_sweep_rows('classifier_scale', [0.0, 1.0, 4.0], [20.0, 15.0, 18.0])))
  figure = tmp_path / 'routes.png'
  out = _run('guidance_routes.py', f'--sweep=CFG={cfg}', f'--sweep=CG={cg}', f'--out={figure}')
  lines = out.splitlines()
  assert lines[0].startswith('| route | w | w_c |') and len(lines) == 2 + 5 + 1
  # The best FD of each route is bold, and only it; seconds per image = 1 / img/s.
  assert '| CFG | 2.0 | – | 19 | 0 | **9.50** |' in out
  assert '| CG | – | 1.0 | 19 | 19 | **15.00** |' in out and out.count('**') == 4
  assert '| 0.050 | 100 |' in out
  assert figure.stat().st_size > 10_000
  bad = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'guidance_routes.py'),
                        f'--sweep={cfg}'], cwd=REPO, env=subprocess_env.env(),
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and 'must be LABEL=PATH' in bad.stderr


def test_checkpoint_io_smoke():
  """The checksum pass, a save and a verified restore of the tiny config's state, timed."""
  row = json.loads(_run('checkpoint_io.py', '--smoke', '--json'))
  assert row['config'] == 'configs/tiny.py' and row['state_mb'] > 0
  for key in ('checksum_first_s', 'checksum_s', 'save_s', 'restore_verified_s'):
    assert row[key] > 0, row
  # The state it times is the tiny config's whole train state: params, EMA and AdamW's two moments
  # (4 float32 copies of the parameters) and a few scalars.
  model = nnx.eval_shape(lambda: models.create_model(
      'dit', variant='test/7', input_size=28, in_channels=1, num_classes=10, rngs=nnx.Rngs(0)))
  num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  assert abs(row['state_mb'] - 4 * 4 * num_params / 2**20) < 0.02, (row, num_params)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason=f'libtpu is not installed for Python {sys.version.split()[0]}')
def test_sharding_review_smoke():
  report = json.loads(_run('sharding_review.py', '--smoke', '--json'))
  assert report['ici_topology'] == 'v5e:2x2'
  assert [(r['mesh'], r['constraints']) for r in report['rows']] == [('fsdp', False),
                                                                      ('fsdp', True)]
  for row in report['rows']:
    assert row['mesh_shape'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
    assert row['argument_gib'] > 0 and row['collectives']['all-gather']['count'] > 0
    assert row['total_mb'] == pytest.approx(sum(c['mb'] for c in row['collectives'].values()))


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason=f'libtpu is not installed for Python {sys.version.split()[0]}')
def test_memory_compiled_smoke_formula_and_compiler_agree():
  rows = json.loads(_run('memory_compiled.py', '--smoke', '--json'))
  assert [r['per_device_batch'] for r in rows] == [1, 2]
  for r in rows:
    assert r['variant'] == 'S/2' and r['devices'] == 4
    # The formula and XLA:TPU agree on the whole (docs/scaling.md: within 10% from S/2 to XL/2).
    assert 0.5 < r['compiled_total_gib'] / r['formula_total_gib'] < 2.0, r
  assert 0.5 < rows[1]['compiled_per_sample_mib'] / rows[1]['formula_per_sample_mib'] < 2.0


def test_quality_vs_time_plots_every_space_and_reads_minutes_off_the_result(tmp_path):
  lines = tmp_path / 'curves.jsonl'
  rows = [{'run': run, 'step': step, 'minutes': minutes, 'w': 1.5, 'num_samples': 1000,
           'sharpness': {'edge_gradient': 0.9},
           **{space: {'fd': 10.0, 'kid': kid, 'kid_se': kid / 10} for space in ('cls', 'enc')}}
          for run, step, minutes, kid in (('a', 100, 5.0, 3e-3), ('a', 200, 10.0, 2e-3),
                                          ('b', 100, 6.0, 4e-3))]
  lines.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  figure = tmp_path / 'curves.png'
  out = _run('quality_vs_time.py', f'--plot={lines}', f'--figure={figure}')
  assert 'wrote' in out and figure.stat().st_size > 10_000
  spec = importlib.util.spec_from_file_location(
      'quality_vs_time', os.path.join(REPO, 'benchmarks', 'quality_vs_time.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = {'steps_this_run': 1000, 'num_steps': 1000, 'setup_s': 30.0, 'compile_s': 30.0,
            'train_s': 1080.0, 'periodic_s': 60.0}
  assert module._minutes(result, 500) == 10.5  # 1 min + half of 19 min  pylint: disable=protected-access
  assert module._minutes(result, 1000) == 20.0  # pylint: disable=protected-access


def test_input_pipeline_smoke():
  """Every reader through every path (hand-written and grain) at toy size, with the CPU named."""
  report = json.loads(_run('input_pipeline.py', '--smoke', '--json'))
  assert report['cpu'] and report['grain']
  paths = {'old-sync', 'old-thread', 'grain-sync', 'grain-t1-b2', 'grain-t2-b4'}
  rows = report['rows']
  assert {r['path'] for r in rows if r['reader'] == 'fashion_mnist'} == paths
  assert {r['path'] for r in rows if r['reader'] == 'latent_cache'} == paths | {'grain-mp1'}
  for r in rows:
    assert r['batches_per_s'] > 0 and r['images_per_s'] == pytest.approx(
        r['batches_per_s'] * r['batch_size'], rel=0.01, abs=1)
    assert r['ratio_to_old_sync'] > 0 and r['first_batch_ms'] >= 0
  assert all(r['ratio_to_old_sync'] == 1.0 for r in rows if r['path'] == 'old-sync')


def test_captions_benchmark_reproduces_the_terciles_and_draws_the_grid(tmp_path):
  out = _run('captions.py', f'--out={tmp_path / "grid.png"}', '--repeats=5', '--step_ms=300')
  recomputed = float(out.split('max |recomputed - documented| / documented:')[1].split()[0])
  assert recomputed < 2e-6
  assert 'caption table: 3960 captions' in out and 'held out: dark sneaker' in out
  assert '% of a 300 ms train step' in out and os.path.getsize(tmp_path / 'grid.png') > 10_000


def test_text_encoders_benchmark_smoke():
  out = _run('text_encoders.py', '--encoders=test', '--batch=4', '--repeats=1')
  row = [line for line in out.splitlines() if line.startswith('| test |')]
  assert len(row) == 1 and 'CPU:' in out
  cells = [c.strip() for c in row[0].strip('|').split('|')]
  assert float(cells[4]) > 0 and cells[6].endswith('min')


def test_text_unet_throughput_smoke():
  out = _run('text_unet_throughput.py', '--smoke', '--batch=2', '--rounds=1', '--steps=1',
             '--variants=levels=-1')
  assert 'CPU:' in out
  rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip('|').split('|')]
                                        for line in out.splitlines() if line.startswith('| '))}
  bytes_row, words_row = 'text levels=-1 + encoder, 64 bytes', 'text levels=-1 + encoder, 16 words'
  assert set(rows) >= {'class', 'text levels=-1', bytes_row, words_row}
  params = {name: int(row[1].replace(',', '')) for name, row in rows.items() if name != 'model'}
  assert params['class'] < params['text levels=-1'] < params[words_row] < params[bytes_row]
  # 206 fewer embedding rows (53 word ids, not 259) and 48 fewer positions, width 128
  assert params[bytes_row] - params[words_row] == (206 + 48) * 128
  assert float(rows['class'][7]) == 1.0 and float(rows['text levels=-1'][6]) > 0


def test_guidance_methods_smoke_toy_rows_tables_and_figures(tmp_path):
  """Every method and a solver on the Gaussian-mixture toy at smoke size: one JSON line per
  point with its exact-target metrics, the table, both figures (numbers only, no speed)."""
  out, curves, solvers = tmp_path / 'gm.jsonl', tmp_path / 'curves.png', tmp_path / 'solvers.png'
  table = _run('guidance_methods.py', '--smoke', f'--out={out}', f'--plot={curves},{solvers}')
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['sweep'] for r in rows] == ['cfg', 'cfg', 'rescale', 'cfg_zero_star', 'apg',
                                        'cfg_pp', 'autoguidance', 'solvers']
  for r in rows:
    assert r['part'] == 'toy' and r['num_samples'] == 200 and r['ed'] >= 0
    assert 0 <= r['precision'] <= 1 and 0 <= r['recall'] <= 1 and r['spread'] > 0
    assert r['log_p_y'] <= 1e-5 and 0 <= r['accuracy'] <= 1
  by = {(r['sweep'], r['w']): r for r in rows}
  # NFE as the sampler counts it: w = 1 runs the conditional batch alone, CFG doubles it, and
  # CFG-Zero*'s zero-init step evaluates nothing.
  assert by['cfg', 3.0]['nfe'] == 2 * 7 and by['cfg', 1.0]['nfe'] == 7
  assert by['cfg_zero_star', 3.0]['nfe'] < by['cfg', 3.0]['nfe']
  # CFG++ (Euler, 4 steps) and autoguidance (the weak model beside the strong one) count 2.
  assert by['cfg_pp', 0.5]['nfe'] == 2 * 4 and by['autoguidance', 3.0]['nfe'] == 2 * 7
  # Over-guiding the exact model moves the samples away from p(x|y); rescale pulls them back.
  assert by['cfg', 3.0]['ed'] > by['cfg', 1.0]['ed']
  assert by['rescale', 3.0]['ed'] < by['cfg', 3.0]['ed']
  assert '| rescale | 3 | φ=0.7 | heun 4 | 14 |' in table
  assert '| cfg_pp | 0.5 | w is λ | euler 4 | 8 |' in table
  assert curves.stat().st_size > 10_000 and solvers.stat().st_size > 5_000
