"""The train step and the CFG sampler at the machine's peak: img/s, GFLOP/s, ratio to the matmul peak.

    python benchmarks/step_throughput.py [--json] [--smoke] [--cases W1,W2,unet,unet-lecture]
        [--dtypes f32,bf16] [--steps 5] [--sample_steps 50]
    # on a GPU: batch sizes, attention, remat and block layouts in one process
    python benchmarks/step_throughput.py --cases XL --dtypes bf16 --train_only \
        --train_batch 128,256 --attention_impl cudnn,einsum --remat none,full --matmul_size 8192

In one process: the f32 and bf16 matmul peaks (`P32`, `P16`: a jnp 2048² matmul, bf16 with f32
accumulation), then for each workload and compute dtype
  * the real train step of the program (`train_state.StateBuilder.make_train_step` with the
    generator task's loss: loss, grad, global-norm clip, AdamW, EMA, non-finite guard; donated
    state), built from the same config code as `python -m guidedflow.main`;
  * 50-step CFG sampling (Euler, w = 2: each step one forward of the doubled batch) and plain
    conditional sampling (w = 1: one forward of the batch) through `Sampler.sample`, and one
    forward of the batch and of the doubled batch, so that the sampler's time can be compared
    with NFE × one forward (`vs_fwd`: 1.00 = the sampler costs exactly its model evaluations).
FLOPs are analytic (`guidedflow.models.flops_per_example`, 2 × multiply-adds of matmuls/convs,
attention included); a train step counts 3× the forward. `xP32`/`xP16` is the achieved GFLOP/s
over the peak of the compute dtype's matmul. Workloads (issue 12): W1 DiT-S/2 on 32×32×4
latents, 1000 classes, train batch 32, sample batch 16; XL, DiT-XL/2 on the same latents
(configs/imagenet256_latent.py's model), batch 256 / 64; W2 DiT-T/4 on 28×28×1, batch 128 / 64;
unet, the Fashion-MNIST default U-Net at its batch (configs/fashion_mnist.py) / 64;
unet-lecture, the same with the lecture's widths (32, 64, 128) and GroupNorm (the default before
issue 13); latent, configs/fashion_mnist_latent.py's DiT-XS/1 on 7×7×8 latents, batch 32 / 64 (latent-T:
DiT-T/1).
Memory: the train step's compiled footprint (XLA's arguments + outputs − donated aliases +
temporaries); a step whose footprint exceeds the device's memory limit is reported and not run.
`--attention_impl`, `--remat`, `--scan_blocks`, `--unroll_blocks` and `--train_batch` take
comma-separated lists; every combination is run (DiT options apply to DiT cases only).
Prints numbers only; it asserts nothing about speed. Machines differ: compare runs on one
machine, as ratios.
"""

import argparse
import itertools
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The repository root, so that `configs` imports when run as `python benchmarks/...`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import machine
from configs import default as default_config
from configs import fashion_mnist as fmnist_config

from guidedflow import host_allocator
from guidedflow import models
from guidedflow import sampler as sampler_lib
from guidedflow.tasks import registry
from guidedflow.models import factory
from guidedflow import train_state
# pylint: enable=g-import-not-at-top,wrong-import-position

DTYPES = {'f32': 'float32', 'bf16': 'bfloat16'}


def _dit(variant, size, channels, classes):
  def make():
    config = default_config.get_config()
    config.model.name, config.model.variant = 'dit', variant
    config.input.num_classes = classes
    return config, (size, size, channels)
  return make


def _unet(channels=None, layers=None, norm=None):
  """The Fashion-MNIST default U-Net; the arguments given replace the config's."""
  def make():
    config = fmnist_config.get_config('unet', sampler='cfg')  # CFG's doubled batch; w = 1 alone
    if channels is not None:
      config.model.unet_channels, config.model.unet_num_residual_layers = channels, layers
    if norm is not None:
      config.model.unet_norm = norm
    return config, (28, 28, 1)
  return make


# name → (config maker, train batch, sample batch)
CASES = {
    'W1': (_dit('S/2', 32, 4, 1000), 32, 16),
    'XL': (_dit('XL/2', 32, 4, 1000), 256, 64),
    'W2': (_dit('T/4', 28, 1, 10), 128, 64),
    'unet': (_unet(), None, 64),  # None: the config's own train batch
    # The default before issue 13: the lecture's widths with GroupNorm.
    'unet-lecture': (_unet((32, 64, 128), 2, 'group'), None, 64),
    # configs/fashion_mnist_latent.py: DiT-T/1 on the 7×7×8 latents of the autoencoder (the
    # sampler here does not decode; decoding is timed by --mode=sample).
    'latent': (_dit('XS/1', 7, 8, 10), 32, 64),
    'latent-T': (_dit('T/1', 7, 8, 10), 32, 64),
}
SMOKE_CASES = {
    'dit-test': (_dit('test/4', 16, 4, 10), 8, 4),
    'unet-tiny': (_unet((8, 16), 1, 'none'), 8, 4),
}


def _time(fn, steps, rounds=3, warm_up=True):
  """Seconds per call of `fn()` (after one warm-up call): best of `rounds` rounds of `steps`."""
  if warm_up:
    jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def matmul_peak(dtype, size, steps):
  """GFLOP/s of a size² matmul; bf16 operands accumulate in f32 (the models' policy, and the
  form XLA:CPU sends to AMX: a bf16-output matmul there runs as an f32 one plus converts)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  return 2 * size**3 / _time(lambda: matmul(a, b), steps) / 1e9


def _builder(make, dtype_name, train_batch, model_options, train_cpu_dots=None):
  """(the generator's StateBuilder, config, image shape) of one workload; `model_options`
  (attention_impl, remat, scan_blocks, unroll_blocks) replace the config's for DiT workloads,
  `train_cpu_dots` (when given) the config's `train.cpu_dots`."""
  config, image_shape = make()
  config.model.dtype = DTYPES[dtype_name]
  if train_cpu_dots:
    config.train.cpu_dots = train_cpu_dots
  if train_batch:
    config.train.batch_size = train_batch
  if config.model.name == 'dit':
    config.model.update(model_options)
  config.mesh.shape = (1, 1, 1)
  config.train.num_steps = 10_000  # the learning-rate schedule only
  registry.validate(config)
  return train_state.builder(config, image_shape), config, tuple(image_shape)


def _flops(config, image_shape):
  kwargs = dict(input_size=image_shape[0], in_channels=image_shape[2],
                num_classes=config.input.num_classes)
  if config.model.name == 'dit':
    kwargs['variant'] = config.model.variant
  else:
    kwargs.update(channels=tuple(config.model.unet_channels),
                  num_residual_layers=config.model.unet_num_residual_layers)
  return models.flops_per_example(config.model.name, **kwargs)


def _options_used(config, image_shape):
  """The DiT options the model was built with ('auto' attention and unrolling resolved); None
  for a U-Net."""
  if config.model.name != 'dit':
    return dict.fromkeys(MODEL_OPTIONS)
  kwargs = factory.generator_kwargs(config)
  model = nnx.eval_shape(factory.generator(config, image_shape))
  unroll = models.dit.resolve_unroll_blocks(model.unroll_blocks, model.config.depth)
  return dict({k: kwargs[k] for k in MODEL_OPTIONS}, attention_impl=model.attention_impl,
              unroll_blocks=unroll if model.scan_blocks else None)


def _footprint_bytes(compiled):
  """XLA's memory footprint of a compiled step (None where the backend does not say)."""
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def _device_memory(key):
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get(key)


def bench_train(builder, config, image_shape, steps, rounds):
  """(final state or None, img/s or None, compile s, footprint bytes) of the real train step;
  a step that would not fit in the device's memory is compiled but not run."""
  batch_size = config.train.batch_size
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (batch_size,) + image_shape).astype(np.float32),
           'label': rng.integers(0, config.input.num_classes, batch_size).astype(np.int32)}
  batch = jax.device_put(batch, builder.batch_sharding)
  key = jax.random.PRNGKey(0)
  state = builder.init_state()
  train_step = registry.get_task(config).make_train_step(builder)  # with the task's XLA options
  start = time.perf_counter()
  with jax.set_mesh(builder.mesh):
    compiled = train_step.jitted.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  footprint = _footprint_bytes(compiled)
  limit = _device_memory('bytes_limit')
  if footprint and limit and footprint > limit:
    return None, None, compile_s, footprint
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch, key)
    return metrics['loss']

  seconds = _time(step, steps, rounds)
  return holder[0], batch_size / seconds, compile_s, footprint


def bench_sample(sampler, sample_batch, num_steps, guidance_scale, rounds):
  labels = np.arange(sample_batch, dtype=np.int32) % sampler.num_classes
  key = jax.random.PRNGKey(1)
  options = dict(num_steps=num_steps, method='euler')
  start = time.perf_counter()
  _, nfe = sampler.sample(key, labels, guidance_scale, **options)
  first_s = time.perf_counter() - start
  # The first call compiled and ran it: the timed rounds need no other warm-up.
  seconds = _time(lambda: sampler.sample(key, labels, guidance_scale, **options)[0],
                  1, rounds, warm_up=False)
  return seconds, nfe, first_s


def bench_forward(builder, params, image_shape, batch, steps, rounds, compiler_options=None):
  """Seconds of one jitted forward of `batch` rows (the sampler's unit of work), compiled as
  the Sampler compiles (`compiler_options`)."""
  forward = jax.jit(lambda p, x, t, y: builder.merge(p)(x, t, y),
                    compiler_options=compiler_options)
  x = jnp.zeros((batch,) + image_shape, jnp.float32)
  t = jnp.full((batch,), 0.5, jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  with jax.set_mesh(builder.mesh):
    return _time(lambda: forward(params, x, t, y), steps, rounds)


def benchmark_case(name, make, train_batch, sample_batch, dtype_name, args, peaks,
                   model_options, train_cpu_dots=None):
  builder, config, image_shape = _builder(make, dtype_name, train_batch, model_options,
                                          train_cpu_dots)
  flops = _flops(config, image_shape)
  peak = peaks[dtype_name]
  state, train_ips, train_compile_s, footprint = bench_train(
      builder, config, image_shape, args.steps, args.rounds)
  row = dict(case=name, model=config.model.name,
             variant=config.model.variant if config.model.name == 'dit' else
             'x'.join(map(str, config.model.unet_channels)), dtype=dtype_name,
             train_batch=config.train.batch_size, gflop_per_image=flops / 1e9,
             train_images_per_s=train_ips, train_compile_s=train_compile_s,
             train_footprint_gb=footprint / 2**30 if footprint else None,
             train_dots=_dots_library(
                 registry.get_task(config).train_compiler_options(builder.platform)),
             **_options_used(config, image_shape))
  if train_ips is None:  # does not fit: compiled, not run
    return row
  row['train_gflops'] = 3 * flops * train_ips / 1e9
  row['train_x_peak'] = row['train_gflops'] / peak
  peak_bytes = _device_memory('peak_bytes_in_use')
  row['device_peak_gb'] = peak_bytes / 2**30 if peak_bytes else None  # the process's, so far
  if args.train_only:
    return row
  sampler = sampler_lib.Sampler.from_train_state(config, builder, state, image_shape)
  params = sampler.params  # the EMA weights
  options = sampler.compiler_options
  fwd_1 = bench_forward(builder, params, image_shape, sample_batch, args.steps, args.rounds,
                        options)
  fwd_2 = bench_forward(builder, params, image_shape, 2 * sample_batch, args.steps, args.rounds,
                        options)
  n = args.sample_steps
  cfg_s, cfg_nfe, cfg_compile_s = bench_sample(sampler, sample_batch, n, 2.0, args.rounds)
  cond_s, cond_nfe, _ = bench_sample(sampler, sample_batch, n, 1.0, args.rounds)
  row.update(
      sample_batch=sample_batch, sample_steps=n, sample_compile_s=cfg_compile_s,
      cfg_nfe=cfg_nfe, cfg_samples_per_s=sample_batch / cfg_s,
      cfg_gflops=cfg_nfe * flops * sample_batch / cfg_s / 1e9,
      cfg_vs_fwd=cfg_s / (n * fwd_2), cond_nfe=cond_nfe,
      cond_samples_per_s=sample_batch / cond_s, cond_vs_fwd=cond_s / (n * fwd_1),
      w1_over_w2_time=cond_s / cfg_s, fwd_ms=fwd_1 * 1e3, fwd_doubled_ms=fwd_2 * 1e3,
      sampler_dots=_dots_library(options))
  row['cfg_x_peak'] = row['cfg_gflops'] / peak
  return row


def _dots_library(compiler_options):
  """Where the program's dots run, by its XLA options (`precision.*_compiler_options`)."""
  if not compiler_options:
    return 'default'
  return 'onednn' if compiler_options.get('xla_cpu_use_onednn') else 'eigen'


def header(allocator=''):
  return dict(cpu=machine.cpu_description(), allocator=allocator, device=str(jax.devices()[0].device_kind),
              platform=jax.devices()[0].platform, jax=jax.__version__,
              jaxlib=jax.lib.__version__ if hasattr(jax.lib, '__version__') else '',
              python=platform.python_version(), xla_flags=os.environ.get('XLA_FLAGS', ''))


def _cell(value, spec):
  width = re.match(r'[<>]\d+', spec).group()
  if value is None:
    return format('-', width)
  if isinstance(value, bool):
    value = 'scan' if value else 'loop'
  return format(value, spec if not isinstance(value, str) else width)


def print_table(report):
  h = report['header']
  print(f"cpu {h['cpu']}\n{h['platform']}:{h['device']}  jax {h['jax']}  python {h['python']}"
        f"  XLA_FLAGS='{h['xla_flags']}'\n{h['allocator']}")
  for dtype, gflops in report['peaks'].items():
    print(f'P{dtype[-2:]} ({dtype} {report.get("matmul_size", 2048)}² matmul, f32 accumulation): '
          f'{gflops:.1f} GFLOP/s')
  cols = [('case', '<4', 'case'), ('dtype', '<4', 'dt'), ('attention_impl', '<6', 'attn'),
          ('remat', '<5', 'remat'), ('scan_blocks', '<4', 'blks'),
          ('unroll_blocks', '>6', 'unroll'), ('train_batch', '>5', 'batch'),
          ('train_dots', '<7', 'dots'),
          ('train_images_per_s', '>8.2f', 'train/s'), ('train_gflops', '>8.1f', 'GFLOP/s'),
          ('train_x_peak', '>5.2f', 'xPeak'), ('train_compile_s', '>6.1f', 'comp s'),
          ('train_footprint_gb', '>6.2f', 'GiB'),
          ('sample_batch', '>4', 'sb'), ('sampler_dots', '<7', 'dots'), ('cfg_nfe', '>4', 'NFE'),
          ('cfg_samples_per_s', '>8.3f', 'cfg/s'), ('cfg_gflops', '>7.1f', 'GFLOP/s'),
          ('cfg_x_peak', '>5.2f', 'xPeak'), ('cfg_vs_fwd', '>6.3f', 'vsFwd'),
          ('cond_nfe', '>4', 'NFE1'), ('cond_samples_per_s', '>8.3f', 'w=1/s'),
          ('cond_vs_fwd', '>6.3f', 'vsFwd1'), ('w1_over_w2_time', '>6.3f', 't1/t2'),
          ('sample_compile_s', '>6.1f', 'comp s')]
  print(' '.join(_cell(title, spec) for _, spec, title in cols))
  for row in report['rows']:
    print(' '.join(_cell(row.get(key), spec) for key, spec, _ in cols))
  for row in report['rows']:
    what = f"{row['case']} {row['dtype']} batch {row['train_batch']}"
    if 'error' in row:
      print(f"failed: {what}: {row['error']}")
    elif row.get('train_images_per_s') is None:
      print(f"not run: {what} needs {row['train_footprint_gb']:.1f} GiB, more than the device has")


def print_reports(paths):
  """One table of several JSON reports of one machine (the first one's header and peaks)."""
  reports = []
  for path in paths:
    with open(path, encoding='utf-8') as f:
      reports.append(json.load(f))
  print_table(dict(reports[0], rows=[row for r in reports for row in r['rows']]))


MODEL_OPTIONS = ('attention_impl', 'remat', 'scan_blocks', 'unroll_blocks')


def _list(text, kind=str):
  return [kind(item) for item in text.split(',')] if text else []


def _model_options(args):
  """Every combination of the DiT options given ({} alone: the configs' own)."""
  given = {'attention_impl': _list(args.attention_impl), 'remat': _list(args.remat),
           'scan_blocks': [{'true': True, 'false': False}[v.lower()]
                           for v in _list(args.scan_blocks)],
           'unroll_blocks': [v if v == 'auto' else int(v) for v in _list(args.unroll_blocks)]}
  given = {k: v for k, v in given.items() if v}
  return [dict(zip(given, values)) for values in itertools.product(*given.values())]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5, help='timed train steps per round')
  parser.add_argument('--rounds', type=int, default=3,
                      help='timing rounds (the best is reported); a round of sampling is 1 call')
  parser.add_argument('--sample_steps', type=int, default=50, help='sampler steps')
  parser.add_argument('--smoke', action='store_true', help='tiny sizes, for CI')
  parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
  parser.add_argument('--cases', default=None, help='comma-separated subset of ' + ','.join(CASES))
  parser.add_argument('--dtypes', default='f32,bf16', help='comma-separated subset of f32,bf16')
  parser.add_argument('--matmul_size', type=int, default=2048,
                      help='size of the peak matmuls (8192 on a GPU)')
  parser.add_argument('--train_only', action='store_true', help='no sampling rows')
  parser.add_argument('--out', default=None,
                      help='also write the JSON report here, rewritten after every row')
  parser.add_argument('--train_batch', default=None,
                      help="comma-separated train batch sizes (default: each case's)")
  parser.add_argument('--attention_impl', default=None,
                      help='DiT: comma-separated subset of ' + ','.join(models.dit.ATTENTION_IMPLS))
  parser.add_argument('--remat', default=None,
                      help='DiT: comma-separated subset of ' + ','.join(models.dit.REMAT_POLICIES))
  parser.add_argument('--scan_blocks', default=None,
                      help='DiT: comma-separated subset of true,false (false: a module per block)')
  parser.add_argument('--unroll_blocks', default=None,
                      help="DiT: comma-separated blocks per scan iteration ('auto' or numbers)")
  parser.add_argument('--train_cpu_dots', default=None,
                      help="comma-separated config.train.cpu_dots values, alternated per case "
                           "(default: the configs' own, 'auto')")
  parser.add_argument('--print', nargs='+', default=None, metavar='REPORT',
                      help='print the table of these --out / --json reports (merged) and exit')
  args = parser.parse_args()
  if args.print:
    print_reports(args.print)
    return
  host_allocator.skip_tpu_probe_without_tpu()  # as the program does, before any JAX op
  allocator = host_allocator.keep_freed_memory()
  cases = SMOKE_CASES if args.smoke else CASES
  if args.cases:
    unknown = set(args.cases.split(',')) - set(cases)
    if unknown:
      parser.error(f'unknown cases {sorted(unknown)}; choose from {sorted(cases)}')
    cases = {k: cases[k] for k in args.cases.split(',')}
  if args.smoke:
    args.steps, args.rounds = 1, 1
    args.sample_steps, args.matmul_size = min(args.sample_steps, 3), 256
  dtypes = args.dtypes.split(',')
  peaks = {d: matmul_peak(jnp.dtype(DTYPES[d]), args.matmul_size, max(args.steps, 3))
           for d in ('f32', 'bf16')}
  rows = []
  report = dict(header=header(allocator), peaks=peaks, matmul_size=args.matmul_size, rows=rows)
  for name, (make, train_batch, sample_batch) in cases.items():
    for dtype_name, batch, options, dots in itertools.product(
        dtypes, _list(args.train_batch, int) or [train_batch], _model_options(args),
        _list(args.train_cpu_dots) or [None]):
      try:
        rows.append(benchmark_case(name, make, batch, sample_batch, dtype_name, args, peaks,
                                   options, dots))
      except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: go on
        rows.append(dict(case=name, dtype=dtype_name, train_batch=batch, **options,
                         error=f'{type(e).__name__}: {str(e)[:400]}'))
      if args.out:
        with open(args.out, 'w', encoding='utf-8') as f:
          json.dump(report, f, indent=1)
      print(f"  {'FAILED' if 'error' in rows[-1] else 'done'} {name} {dtype_name} batch "
            f"{rows[-1]['train_batch']} {options} {rows[-1].get('error', '')}",
            file=sys.stderr, flush=True)
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print_table(report)
  if any('error' in row for row in rows):
    sys.exit(1)


if __name__ == '__main__':
  main()
