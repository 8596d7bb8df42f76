"""What the checkpoint integrity checks cost: the array checksums against the save and restore.

    python benchmarks/checkpoint_io.py [--config configs/fashion_mnist.py[:arg]] [--repeats 3]
        [--workdir DIR] [--json] [--smoke]

Builds the train state of the config (parameters, EMA and AdamW moments, as training saves it)
and measures, on this machine: the checksum pass (first call = compile + run, then the median
of `--repeats` runs), a synchronous orbax save with and without the checksums, and a restore
with verification. Printed: state size, each time in seconds, and the checksum pass as a
fraction of the save. `--smoke`: configs/tiny.py, one repeat (seconds; for CI).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guidedflow import checkpointing
from guidedflow import checksums
from guidedflow import host_allocator
from guidedflow import train_state
from guidedflow.cli import load_config


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(config, workdir, repeats):
  builder = train_state.builder(config, (28, 28, 1), train_state.make_mesh(config))
  state = builder.init_state()
  start = time.perf_counter()
  checksums.checksums(state)
  first = time.perf_counter() - start
  checksum_s = _timed(lambda: checksums.checksums(state), repeats)
  with checkpointing.Checkpointer(os.path.join(workdir, 'with'), handle_sigterm=False,
                                  max_to_keep=1) as ckpt:
    steps = iter(range(1, 10**6))
    save_s = _timed(lambda: ckpt.save(next(steps), state, data_state={}, force=True), repeats)
    restore_s = _timed(lambda: ckpt.restore(builder.abstract_state())[0], repeats)
  return {'state_mb': round(checkpointing.state_bytes(state) / 2**20, 2),
          'checksum_first_s': round(first, 4), 'checksum_s': round(checksum_s, 4),
          'save_s': round(save_s, 4), 'restore_verified_s': round(restore_s, 4),
          'checksum_fraction_of_save': round(checksum_s / save_s, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/fashion_mnist.py')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--smoke', action='store_true')
  args = parser.parse_args()
  if args.smoke:
    args.config, args.repeats = 'configs/tiny.py', 1
  config = load_config(args.config)
  workdir = args.workdir or tempfile.mkdtemp(prefix='checkpoint_io_')
  try:
    row = {'config': args.config, **measure(config, workdir, args.repeats)}
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  if args.json:
    print(json.dumps(row))
    return
  for key, value in row.items():
    print(f'{key:28s} {value}')


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  main()
