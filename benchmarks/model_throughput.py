"""Model throughput: images/s and achieved GFLOP/s of forward and forward+backward passes.

    python benchmarks/model_throughput.py [--steps 5] [--json] [--smoke] [--cases dit-S/2,unet]

FLOPs are analytic (`guidedflow.models.flops_per_example`: 2 × multiply-adds of matmuls and
convs, attention included); forward+backward counts 3× the forward. A jnp matmul is timed too,
as the peak to compare against. Peak memory comes from `device.memory_stats()` (GPU/TPU; None
on CPU); the XLA temp buffer size of each compiled function is printed on every backend.
Prints numbers only; it asserts nothing about speed.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow import host_allocator
from guidedflow import models

# name → (create_model kwargs, batch size)
CASES = {
    'dit-S/2': (dict(name='dit', variant='S/2', input_size=32, in_channels=4, num_classes=1000),
                32),
    'dit-T/4': (dict(name='dit', variant='T/4', input_size=28, in_channels=1, num_classes=10),
                128),
    'dit-T/2': (dict(name='dit', variant='T/2', input_size=28, in_channels=1, num_classes=10),
                128),
    'unet': (dict(name='unet', input_size=28, in_channels=1, num_classes=10), 128),
}
SMOKE_CASES = {
    'dit-test/4': (dict(name='dit', variant='test/4', input_size=16, in_channels=4,
                        num_classes=10), 8),
    'unet-tiny': (dict(name='unet', input_size=16, in_channels=1, num_classes=10,
                       channels=(8, 16), num_residual_layers=1), 8),
}
DTYPES = {'f32': jnp.float32, 'bf16': jnp.bfloat16}


def _time(fn, args, steps: int) -> float:
  """Seconds per call of a compiled `fn`, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def _compile(fn, args):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    temp = None
  return compiled, seconds, temp


def _peak_bytes():
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def matmul_peak(size: int, dtype, steps: int) -> dict:
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  compiled, _, _ = _compile(jnp.matmul, (a, b))
  seconds = _time(compiled, (a, b), steps)
  return dict(size=size, dtype=jnp.dtype(dtype).name, gflops=2 * size**3 / seconds / 1e9)


def benchmark_case(name: str, kwargs: dict, batch: int, dtype_name: str, steps: int) -> list:
  kwargs = dict(kwargs)
  model_name = kwargs.pop('name')
  model = models.create_model(model_name, dtype=DTYPES[dtype_name], rngs=nnx.Rngs(0), **kwargs)
  flops = models.flops_per_example(model_name, **kwargs)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  size, channels = kwargs['input_size'], kwargs['in_channels']
  key_x, key_t, key_y = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (batch, size, size, channels))
  t = jax.random.uniform(key_t, (batch,))
  y = jax.random.randint(key_y, (batch,), 0, kwargs['num_classes'] + 1)

  def forward(params, x, t, y):
    return nnx.merge(graphdef, params, rest)(x, t, y)

  def forward_backward(params, x, t, y):
    return jax.grad(lambda p: jnp.mean(jnp.square(forward(p, x, t, y) - x)))(params)

  rows = []
  for pass_name, fn, multiple in (('fwd', forward, 1), ('fwd+bwd', forward_backward, 3)):
    compiled, compile_s, temp = _compile(fn, (params, x, t, y))
    seconds = _time(compiled, (params, x, t, y), steps)
    rows.append(dict(
        model=name, dtype=dtype_name, batch=batch, **{'pass': pass_name},
        images_per_s=batch / seconds, gflops_per_s=multiple * flops * batch / seconds / 1e9,
        gflop_per_image=multiple * flops / 1e9, compile_s=compile_s,
        params_m=models.param_count(model) / 1e6,
        temp_mb=None if temp is None else temp / 2**20,
        peak_mb=None if _peak_bytes() is None else _peak_bytes() / 2**20))
  return rows


def _fmt(value, spec):
  return 'None' if value is None else format(value, spec)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5, help='timed iterations per measurement')
  parser.add_argument('--smoke', action='store_true', help='tiny sizes, for CI')
  parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
  parser.add_argument('--cases', default=None,
                      help=f'comma-separated subset of {sorted(CASES)} (default: all)')
  parser.add_argument('--dtypes', default='f32,bf16', help='comma-separated subset of f32,bf16')
  parser.add_argument('--matmul_size', type=int, default=2048)
  args = parser.parse_args()

  cases = SMOKE_CASES if args.smoke else CASES
  if args.cases:
    cases = {k: cases[k] for k in args.cases.split(',')}
  steps = min(args.steps, 2) if args.smoke else args.steps
  dtypes = args.dtypes.split(',')
  matmul_size = 256 if args.smoke else args.matmul_size

  peaks = [matmul_peak(matmul_size, DTYPES[d], steps) for d in dtypes]
  rows = []
  for name, (kwargs, batch) in cases.items():
    for dtype_name in dtypes:
      rows.extend(benchmark_case(name, kwargs, batch, dtype_name, steps))
  device = jax.local_devices()[0]
  report = dict(device=f'{device.platform}:{device.device_kind}', jax=jax.__version__,
                steps=steps, matmul=peaks, models=rows)
  if args.json:
    print(json.dumps(report, indent=1))
    return

  print(f"device {report['device']}  jax {jax.__version__}  steps {steps}")
  for peak in peaks:
    print(f"matmul {peak['size']}² {peak['dtype']}: {peak['gflops']:.1f} GFLOP/s")
  header = (f"{'model':<11} {'dtype':<5} {'pass':<8} {'batch':>5} {'params M':>8} "
            f"{'img/s':>9} {'GFLOP/s':>8} {'GFLOP/img':>9} {'compile s':>9} {'temp MB':>8} "
            f"{'peak MB':>8}")
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f"{r['model']:<11} {r['dtype']:<5} {r['pass']:<8} {r['batch']:>5} "
          f"{r['params_m']:>8.2f} {r['images_per_s']:>9.1f} {r['gflops_per_s']:>8.1f} "
          f"{r['gflop_per_image']:>9.3f} {r['compile_s']:>9.2f} {_fmt(r['temp_mb'], '8.1f')} "
          f"{_fmt(r['peak_mb'], '8.1f')}")


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  main()
