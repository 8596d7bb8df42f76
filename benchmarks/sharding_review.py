"""What XLA:TPU does with guidedflow's sharding: the train step compiled for a TPU topology on
this CPU (`--mode=compile`'s path, libtpu needed, nothing runs) for data, FSDP and FSDP ×
tensor meshes, with the DiT's activation sharding constraints off and on.

    python benchmarks/sharding_review.py [--topology v5e:2x2] [--variant T/4]
        [--image_shape 28,28,1] [--num_classes 10] [--batch_size 256]
        [--meshes data fsdp fsdp_tensor] [--dtype bfloat16] [--json] [--smoke]

Per mesh and setting it prints the per-device argument and temporary bytes, the collectives of
one step (count and MB per device, loop bodies × their trip counts; XLA:TPU's reduce-scatter
fusions counted as reduce-scatters) and the three that move the most bytes.

'constraints off' is XLA's sharding propagation alone: under FSDP it follows the weights'
'embed'-sharded layout into the activations, all-gathers the global batch and all-reduces
(B, N, 4D) partial sums (issue 18, part 4). 'on' pins the activations to the batch split
(`models.layers.constrain`), which training uses.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default as default_config
from guidedflow import aot
from guidedflow import host_allocator
from guidedflow.models import layers
from guidedflow.tasks import registry
# pylint: enable=g-import-not-at-top,wrong-import-position

MESHES = {'data': lambda n: (n, 1, 1), 'fsdp': lambda n: (1, n, 1),
          'fsdp_tensor': lambda n: (1, n // 2, 2)}
MIB, GIB = 2**20, 2**30


def compile_one(args, mesh, devices, constrain):
  config = default_config.get_config()
  config.model.variant = args.variant
  config.model.dtype = args.dtype
  config.input.num_classes = args.num_classes
  config.train.batch_size = args.batch_size
  config.mesh.shape = MESHES[mesh](len(devices))
  config.mesh.min_shard_size = args.min_shard_size
  layers.CONSTRAIN_ACTIVATIONS = constrain
  try:
    figures = aot.compile_train_step(registry.get_task(config), config, args.image_shape, devices)
  finally:
    layers.CONSTRAIN_ACTIVATIONS = True
  return dict(mesh=mesh, mesh_shape=figures['mesh'], constraints=constrain,
              argument_gib=figures['argument_bytes'] / GIB, temp_gib=figures['temp_bytes'] / GIB,
              collectives={op: {'count': c['count'], 'mb': c['bytes'] / MIB}
                           for op, c in sorted(figures['collectives'].items())},
              total_mb=sum(c['bytes'] for c in figures['collectives'].values()) / MIB,
              largest=figures['largest_collectives'], compile_s=figures['compile_s'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--topology', default='v5e:2x2')
  parser.add_argument('--variant', default='T/4')
  parser.add_argument('--image_shape', default='28,28,1')
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--min_shard_size', type=int, default=0)
  parser.add_argument('--meshes', nargs='+', default=list(MESHES), choices=list(MESHES))
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--smoke', action='store_true', help='test/4 at batch 16, one mesh')
  args = parser.parse_args()
  if args.smoke:
    args.variant, args.batch_size, args.meshes = 'test/4', 16, ['fsdp']
  args.image_shape = tuple(int(d) for d in args.image_shape.split(','))
  _, topology, _, devices = aot.topology_devices(args.topology)
  rows = [compile_one(args, mesh, devices, constrain)
          for mesh in args.meshes for constrain in (False, True)]
  report = dict(topology=args.topology, ici_topology=topology, variant=args.variant,
                image_shape=args.image_shape, batch_size=args.batch_size, dtype=args.dtype,
                rows=rows)
  if args.json:
    print(json.dumps(report))
    return
  print(f'DiT-{args.variant} on {args.image_shape}, global batch {args.batch_size}, '
        f'{args.dtype}, {args.topology} ({topology}, {len(devices)} devices); per device:')
  print(f'{"mesh":12s} {"constraints":11s} {"args GiB":>8s} {"temp GiB":>8s} '
        f'{"comm MB":>8s}  collectives (count, MB)')
  for r in rows:
    ops = ', '.join(f'{op} ×{c["count"]} {c["mb"]:.1f}' for op, c in r['collectives'].items())
    print(f'{r["mesh"]:12s} {"on" if r["constraints"] else "off":11s} {r["argument_gib"]:8.3f} '
          f'{r["temp_gib"]:8.3f} {r["total_mb"]:8.1f}  {ops}')
    print(f'{"":34s} largest: {"; ".join(r["largest"])}')


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  main()
