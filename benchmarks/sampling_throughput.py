"""Sampling throughput with classifier-free guidance: images/s and NFE per sampler.

    python benchmarks/sampling_throughput.py [--num_steps 50] [--json] [--smoke] [--cases unet]
        [--guidance_scale 1] [--hlo_digest]

Every step evaluates the model once on the doubled batch [x; x] with labels [y; ∅] (CFG at
w = 2, traced), inside one `lax.scan` (guidedflow.sampling.sample); `--guidance_scale 1` runs
the conditional batch alone (w = 1 is a Python number, as the Sampler passes it).
`--hlo_digest` adds a digest of each program's StableHLO (no locations): two checkouts whose
digests agree compile the same program, so their speed cannot differ (before/after a change:
run this script in both, see benchmarks/README.md). NFE counts model evaluations per
sample with the CFG doubling included (Euler: 2N, Heun: 2(2N − 1), Euler–Maruyama: 2N).
Random-init models: the timing does not depend on the weights (the DiT's zero-initialised output
layer still runs its matmuls). Compile time is printed separately from the timed calls.
Prints numbers only; it asserts nothing about speed.
"""

import argparse
import hashlib
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow import host_allocator
from guidedflow import models
from guidedflow import sampling

# name → (create_model kwargs, batch size)
CASES = {
    'unet': (dict(name='unet', input_size=28, in_channels=1, num_classes=10), 128),
    'dit-T/4': (dict(name='dit', variant='T/4', input_size=28, in_channels=1, num_classes=10),
                128),
    'dit-S/2': (dict(name='dit', variant='S/2', input_size=32, in_channels=4, num_classes=1000),
                32),
}
SMOKE_CASES = {
    'unet-tiny': (dict(name='unet', input_size=16, in_channels=1, num_classes=10,
                       channels=(8, 16), num_residual_layers=1), 4),
}
METHODS = sampling.METHODS  # every sampler the library has


def benchmark_case(name, kwargs, batch, method, num_steps, repeats, dtype, guidance_scale=2.0):
  kwargs = dict(kwargs)
  model_name = kwargs.pop('name')
  model = models.create_model(model_name, dtype=dtype, rngs=nnx.Rngs(0), **kwargs)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  num_classes = kwargs['num_classes']
  shape = (kwargs['input_size'], kwargs['input_size'], kwargs['in_channels'])

  def run(params, key, labels, traced_scale):
    model_fn = lambda x, t, y: nnx.merge(graphdef, params, rest)(x, t, y)
    samples, info = sampling.sample(
        model_fn, key, labels, shape=shape, path='linear', parameterization='velocity',
        null_label=num_classes,
        guidance_scale=1.0 if guidance_scale == 1.0 else traced_scale, method=method,
        num_steps=num_steps, sigma_schedule='decreasing',
        sigma=1.0 if method == 'euler_maruyama' else 0.0)
    return samples, info['nfe']

  labels = jnp.arange(batch, dtype=jnp.int32) % num_classes
  args = (params, jax.random.key(0), labels, jnp.float32(guidance_scale))
  start = time.perf_counter()
  lowered = jax.jit(run).lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  digest = hashlib.sha256(lowered.as_text(debug_info=False).encode()).hexdigest()[:12]
  samples, nfe = compiled(*args)
  jax.block_until_ready(samples)
  start = time.perf_counter()
  for i in range(repeats):
    samples, _ = compiled(params, jax.random.key(i + 1), labels, jnp.float32(guidance_scale))
  jax.block_until_ready(samples)
  seconds = (time.perf_counter() - start) / repeats
  return dict(model=name, method=method, num_steps=num_steps, batch=batch, nfe=int(nfe),
              dtype=jnp.dtype(dtype).name, images_per_s=batch / seconds,
              seconds_per_batch=seconds, forwards_per_s=batch * int(nfe) / seconds,
              compile_s=compile_s, hlo_digest=digest)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_steps', type=int, default=50, help='sampler steps')
  parser.add_argument('--repeats', type=int, default=2, help='timed sampler calls per case')
  parser.add_argument('--smoke', action='store_true', help='tiny sizes, for CI')
  parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
  parser.add_argument('--cases', default=None,
                      help=f'comma-separated subset of {sorted(CASES)} (default: unet,dit-T/4)')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--batch', type=int, default=None, help='override every case\'s batch')
  parser.add_argument('--guidance_scale', type=float, default=2.0,
                      help='w: 1 runs the conditional batch alone, any other value CFG')
  parser.add_argument('--hlo_digest', action='store_true',
                      help='a column with a digest of each program\'s StableHLO')
  args = parser.parse_args()

  if args.smoke:
    cases, num_steps, repeats = SMOKE_CASES, min(args.num_steps, 4), 1
  else:
    cases, num_steps, repeats = CASES, args.num_steps, args.repeats
    cases = {k: cases[k] for k in (args.cases or 'unet,dit-T/4').split(',')}
  rows = [benchmark_case(name, kwargs, batch, method, num_steps, repeats,
                         jnp.dtype(args.dtype), args.guidance_scale)
          for name, (kwargs, batch) in cases.items() for method in args.methods.split(',')
          for batch in [args.batch or batch]]
  device = jax.local_devices()[0]
  report = dict(device=f'{device.platform}:{device.device_kind}', jax=jax.__version__,
                guidance_scale=args.guidance_scale, rows=rows)
  if args.json:
    print(json.dumps(report, indent=1))
    return
  w = args.guidance_scale
  print(f"device {report['device']}  jax {jax.__version__}  "
        + ('w = 1 (conditional batch)' if w == 1 else f'CFG w = {w:g} (doubled batch)'))
  header = (f"{'model':<10} {'method':<15} {'steps':>5} {'NFE':>5} {'batch':>5} {'dtype':<8} "
            f"{'img/s':>9} {'s/batch':>8} {'fwd/s':>9} {'compile s':>9}"
            + (f" {'StableHLO':>12}" if args.hlo_digest else ''))
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f"{r['model']:<10} {r['method']:<15} {r['num_steps']:>5} {r['nfe']:>5} "
          f"{r['batch']:>5} {r['dtype']:<8} {r['images_per_s']:>9.2f} "
          f"{r['seconds_per_batch']:>8.3f} {r['forwards_per_s']:>9.1f} {r['compile_s']:>9.2f}"
          + (f" {r['hlo_digest']:>12}" if args.hlo_digest else ''))


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  main()
