"""benchmarks/memory.py's memory formula against XLA:TPU's own figures for the train step.

    python benchmarks/memory_compiled.py [--variants S/2 B/2 L/2 XL/2]
        [--topologies v5e:2x2 v5p:2x2x1 v4:2x2x1] [--batches 8 32] [--remats none full]
        [--json] [--smoke]

The ImageNet-256 latent recipe (configs/imagenet256_latent.py: 32×32×4 latents, 1000 classes,
AdamW + EMA, f32 parameters, bf16 compute) under FSDP over all devices of a small TPU topology
(mesh (1, N, 1)), compiled by XLA:TPU on this CPU with `--mode=compile`'s path (libtpu needed,
nothing runs). Per device and per row:

  * formula: the train state (exact), gradients, bf16 weight casts and gathered blocks (the
    formula's fixed terms), and activations = per-device batch × memory.py's per-sample count
    (with remat='full': the block inputs plus one block);
  * compiled: XLA's argument bytes (the state and the batch) + temporaries;
  * per sample: the slope of XLA's temporaries between the two batch sizes, next to the
    formula's activations per sample: what each further sample costs, free of fixed terms.

"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
import memory  # benchmarks/memory.py: the formula
from guidedflow import aot
from guidedflow import host_allocator
from guidedflow.tasks import registry
# pylint: enable=g-import-not-at-top,wrong-import-position

GIB = 2**30


def compiled_row(variant, topology, devices, per_device_batch, remat):
  config = memory.recipe(variant)
  config.model.remat = remat
  config.mesh.shape = (1, len(devices), 1)
  config.train.batch_size = per_device_batch * len(devices)
  figures = aot.compile_train_step(registry.get_task(config), config, memory.IMAGE_SHAPE, devices)
  formula = memory.mesh_memory(config, config.mesh.shape)
  per_sample = (formula.activation_per_sample_remat if remat == 'full'
                else formula.activation_per_sample)
  return dict(variant=variant, topology=topology, devices=len(devices), remat=remat,
              per_device_batch=per_device_batch,
              formula_fixed_gib=formula.fixed / GIB,
              formula_activations_gib=per_device_batch * per_sample / GIB,
              formula_total_gib=(formula.fixed + per_device_batch * per_sample) / GIB,
              formula_per_sample_mib=per_sample / 2**20,
              compiled_arguments_gib=figures['argument_bytes'] / GIB,
              compiled_temp_gib=figures['temp_bytes'] / GIB,
              compiled_total_gib=(figures['argument_bytes'] + figures['temp_bytes']) / GIB,
              compile_s=figures['compile_s'])


def add_slopes(rows):
  """XLA's temporaries per further sample, between consecutive batch sizes of one setting."""
  groups = {}
  for r in rows:
    groups.setdefault((r['variant'], r['topology'], r['remat']), []).append(r)
  for group in groups.values():
    group.sort(key=lambda r: r['per_device_batch'])
    for a, b in zip(group, group[1:]):
      b['compiled_per_sample_mib'] = ((b['compiled_temp_gib'] - a['compiled_temp_gib']) * 1024
                                      / (b['per_device_batch'] - a['per_device_batch']))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', nargs='+', default=['S/2', 'B/2', 'L/2', 'XL/2'])
  parser.add_argument('--topologies', nargs='+', default=['v5e:2x2', 'v5p:2x2x1', 'v4:2x2x1'])
  parser.add_argument('--batches', nargs='+', type=int, default=[8, 32],
                      help='per-device batch sizes (two or more: the per-sample slope)')
  parser.add_argument('--remats', nargs='+', default=['none', 'full'])
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--smoke', action='store_true', help='S/2 on v5e:2x2, batches 1 and 2')
  args = parser.parse_args()
  if args.smoke:
    args.variants, args.topologies, args.batches, args.remats = ['S/2'], ['v5e:2x2'], [1, 2], [
        'none']
  rows = []
  for topology in args.topologies:
    devices = aot.topology_devices(topology)[3]
    for variant in args.variants:
      for remat in args.remats:
        for batch in args.batches:
          try:
            rows.append(compiled_row(variant, topology, devices, batch, remat))
          except aot.DoesNotFitError as e:  # XLA:TPU refused it outright
            rows.append(dict(variant=variant, topology=topology, devices=len(devices),
                             remat=remat, per_device_batch=batch, does_not_fit=str(e)[:200]))
          print(f'{variant} {topology} remat={remat} batch {batch}: done', file=sys.stderr)
  add_slopes([r for r in rows if 'compiled_temp_gib' in r])
  if args.json:
    print(json.dumps(rows))
    return
  print(f'{"variant":7s} {"topology":10s} {"remat":5s} {"b/dev":>5s} | {"formula GiB":>11s} '
        f'{"compiled GiB":>12s} {"ratio":>5s} | {"MiB/sample: formula":>19s} {"XLA":>6s}')
  for r in rows:
    head = f'{r["variant"]:7s} {r["topology"]:10s} {r["remat"]:5s} {r["per_device_batch"]:5d}'
    if 'does_not_fit' in r:
      print(f'{head} | XLA:TPU: does not fit')
      continue
    slope = r.get('compiled_per_sample_mib')
    print(f'{head} | {r["formula_total_gib"]:11.2f} {r["compiled_total_gib"]:12.2f} '
          f'{r["compiled_total_gib"] / r["formula_total_gib"]:5.2f} | '
          f'{r["formula_per_sample_mib"]:19.1f} {"" if slope is None else f"{slope:6.1f}"}')


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  main()
