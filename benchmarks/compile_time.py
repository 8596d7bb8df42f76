"""Compile time of a DiT training step, blocks unscanned vs scanned (`nnx.scan`).

    python benchmarks/compile_time.py [--variants XL/2,S/2] [--dtypes float32,bfloat16]
        [--layouts unscanned,scanned,unrolled] [--remat none] [--batch 2] [--json] [--smoke]

Layouts: 'unscanned' (a module per block), 'scanned' (stacked blocks, one block per scan
iteration: `unroll_blocks=1`, the accelerators' default), 'unrolled' (stacked blocks, the scan
fully unrolled: `unroll_blocks='auto'` on a CPU).

The step is the loss's gradient and an `optax.adamw` update, on 32×32×4 latents with 1000
classes (configs/imagenet256_latent.py's shapes). It is traced, lowered and compiled for this
machine's default backend from `jax.ShapeDtypeStruct`s: nothing is allocated and nothing runs,
so DiT-XL/2 compiles on a small CPU. Printed per row: trace + lower seconds, XLA compile
seconds, and the size of the lowered StableHLO (lines), which grows with depth unscanned and
stays flat scanned. `--smoke`: a 2- and a 4-block test-sized model (seconds; for CI).
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from guidedflow import host_allocator
from guidedflow import models

IMAGE_SHAPE = (32, 32, 4)
NUM_CLASSES = 1000
SMOKE_IMAGE_SHAPE = (8, 8, 4)
SMOKE_VARIANTS = ('test/2:depth=2', 'test/2:depth=4')


def _model_kwargs(variant: str) -> dict:
  """'XL/2' or 'test/2:depth=4' (overrides after a colon) → create_model kwargs."""
  name, _, overrides = variant.partition(':')
  kwargs = dict(variant=name)
  for item in filter(None, overrides.split(',')):
    key, _, value = item.partition('=')
    kwargs[key] = int(value)
  return kwargs


LAYOUTS = {'unscanned': dict(scan_blocks=False), 'scanned': dict(unroll_blocks=1),
           'unrolled': dict(unroll_blocks=10**6)}  # capped at the depth


def lower_and_compile(variant: str, dtype: str, layout: str, *, batch: int = 2,
                      remat: str = 'none', image_shape=IMAGE_SHAPE,
                      num_classes: int = NUM_CLASSES) -> dict:
  """Times `jax.jit(step).lower(abstract args)` and `.compile()` of one training step."""
  height, _, channels = image_shape
  model = nnx.eval_shape(lambda: models.create_model(
      'dit', input_size=height, in_channels=channels, num_classes=num_classes,
      dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0), remat=remat, **LAYOUTS[layout],
      **_model_kwargs(variant)))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, x, t, y, target):
    def loss(p):
      return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, y) - target))

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  args = (params, opt_state, x, jax.ShapeDtypeStruct((batch,), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32), x)
  start = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args)
  lowered_at = time.perf_counter()
  lowered.compile()
  compiled_at = time.perf_counter()
  return dict(variant=variant, dtype=dtype, layout=layout,
              remat=remat, batch=batch, depth=model.config.depth,
              lower_s=lowered_at - start, compile_s=compiled_at - lowered_at,
              hlo_lines=lowered.as_text().count('\n'))


def print_table(rows) -> None:
  print(f'DiT train step (grad + AdamW) compile time, backend {jax.default_backend()} '
        f'({jax.devices()[0].device_kind}), jax {jax.__version__}\n')
  print('| model | depth | compute | blocks | remat | trace+lower s | compile s | total s | '
        'StableHLO lines |')
  print('|---|---:|---|---|---|---:|---:|---:|---:|')
  for r in rows:
    print(f"| DiT-{r['variant']} | {r['depth']} | {r['dtype']} | {r['layout']} | {r['remat']} | "
          f"{r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['lower_s'] + r['compile_s']:.1f} | "
          f"{r['hlo_lines']} |")


def main(argv=None) -> list:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='XL/2,S/2',
                      help="DiT variants, comma-separated; overrides after ':', e.g. 'S/2:depth=4'")
  parser.add_argument('--dtypes', default='float32,bfloat16', help='compute dtypes')
  parser.add_argument('--layouts', default=','.join(LAYOUTS))
  parser.add_argument('--remat', default='none', help="'none' | 'full' | "
                      "'dots_with_no_batch_dims_saveable'")
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
  parser.add_argument('--smoke', action='store_true',
                      help=f'tiny models {SMOKE_VARIANTS} on {SMOKE_IMAGE_SHAPE}, float32')
  args = parser.parse_args(argv)

  variants, dtypes = args.variants.split(','), args.dtypes.split(',')
  image_shape, num_classes = IMAGE_SHAPE, NUM_CLASSES
  if args.smoke:
    variants, dtypes = list(SMOKE_VARIANTS), ['float32']
    image_shape, num_classes = SMOKE_IMAGE_SHAPE, 10
  layouts = args.layouts.split(',')
  unknown = set(layouts) - set(LAYOUTS)
  if unknown:
    parser.error(f'--layouts: unknown {sorted(unknown)}; use {", ".join(LAYOUTS)}')
  rows = []
  for variant in variants:
    for dtype in dtypes:
      for layout in layouts:
        rows.append(lower_and_compile(variant, dtype, layout, batch=args.batch,
                                      remat=args.remat, image_shape=image_shape,
                                      num_classes=num_classes))
        print(f'  {rows[-1]}', file=sys.stderr, flush=True)
  if args.json:
    print(json.dumps(rows, indent=1))
  else:
    print_table(rows)
  return rows


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  main()
