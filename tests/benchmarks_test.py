"""The benchmarks run at smoke size and print well-formed numbers (they never assert speed)."""

import json
import os
import subprocess
import sys

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
  report = json.loads(_run('sampling_throughput.py', '--smoke', '--json'))
  nfe = {r['method']: r['nfe'] for r in report['rows']}
  steps = report['rows'][0]['num_steps']
  # One doubled (CFG) forward per model evaluation; Heun's last step is an Euler step.
  assert nfe == {'euler': 2 * steps, 'heun': 2 * (2 * steps - 1), 'euler_maruyama': 2 * steps}
  assert all(r['images_per_s'] > 0 for r in report['rows'])
  table = _run('sampling_throughput.py', '--smoke')
  assert 'NFE' in table and 'euler_maruyama' in table
