"""The readers of the training batches: the hand-written loop and prefetch thread against grain.

    python benchmarks/input_pipeline.py [--steps 400] [--rounds 3] [--batch_sizes 32,256]
        [--cache_examples 20000] [--latent_shape 8,8,4] [--consumer_ms 0,2] [--json] [--smoke]

Every path produces the same host batches (numpy, `to_model`, before any device transfer): the
batch of step s is `batches.HostBatches`'s element s. Readers: the default's Fashion-MNIST
(in memory; the train split, or random uint8 images when it is absent) and a latent cache of
`--cache_examples` synthetic moments written to a temporary directory (memory-mapped npy
shards). Paths, in one process, interleaved over `--rounds` rounds (the median is printed):
  old-sync     the hand-written loop: `host_batch(s)` in the consumer's thread
  old-thread   the hand-written prefetch: one ThreadPoolExecutor thread, 2 steps ahead
  grain-sync   `MapDataset` → `to_iter_dataset(ReadOptions(num_threads=0))`
  grain-tT-bB  the same with T prefetch threads and a buffer of B batches
  grain-mpW    `mp_prefetch` with W worker processes (latent cache only; `--workers`)
`--consumer_ms` simulates a train step that releases the GIL (a sleep) after each batch; the
table gives, from the first batch on (the steady state), batches/s, images/s, the input time
the loop waits for per batch (wall time minus the consumer's), each path's throughput as a ratio
to old-sync of the same reader and consumer, and apart the time to the first batch (threads and
worker processes start then). Speed moves with the CPU (its model is printed) and with other load on the box.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import machine

import grain  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

from guidedflow import batches as batches_lib  # pylint: disable=g-import-not-at-top
from guidedflow import input_pipeline  # pylint: disable=g-import-not-at-top
from guidedflow import latent_cache  # pylint: disable=g-import-not-at-top


def fashion_mnist(smoke):
  try:
    if smoke:
      raise input_pipeline.DataError('smoke: synthetic images')
    images, labels = input_pipeline.load_fashion_mnist(None, 'train')
    name = 'fashion_mnist train'
  except input_pipeline.DataError:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000 if smoke else 60000, 28, 28), np.uint8)
    labels = rng.integers(0, 10, len(images))
    name = 'synthetic 28x28x1 uint8'
  return input_pipeline.ArrayDataset(images, labels, num_classes=10), name


def write_cache(directory, num_examples, latent_shape):
  """A latent cache of random moments as `latent_cache.write` lays it out (one shard)."""
  rng = np.random.default_rng(0)
  moments = rng.standard_normal((num_examples, 2) + latent_shape, np.float32)
  labels = rng.integers(0, 10, num_examples).astype(np.int32)
  moments_name, labels_name = latent_cache._shard_names(0, 1)  # pylint: disable=protected-access
  np.save(os.path.join(directory, moments_name), moments)
  np.save(os.path.join(directory, labels_name), labels)
  meta = {'dataset': 'synthetic', 'split': 'train', 'num_examples': num_examples,
          'latent_shape': list(latent_shape), 'image_shape': [28, 28, 1],
          'process_count': 1, 'dtype': 'float32'}
  with open(os.path.join(directory, latent_cache.META), 'w') as f:
    json.dump(meta, f)
  dataset = latent_cache.LatentCacheDataset(directory)
  dataset.num_classes = 10
  return dataset


def old_thread(host_batch, steps, prefetch=2):
  """The hand-written prefetch the iterator had before grain: one thread, `prefetch` ahead."""
  with concurrent.futures.ThreadPoolExecutor(1, 'batch_prefetch') as executor:
    pending = {}
    for step in range(steps):
      future = pending.pop(step, None)
      for ahead in range(step + 1, min(step + 1 + prefetch, steps)):
        if ahead not in pending:
          pending[ahead] = executor.submit(host_batch, ahead)
      yield future.result() if future is not None else host_batch(step)


def grain_stream(batches, steps, threads, buffer, workers=0):
  dataset = batches[:steps].to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
  if workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  iterator = iter(dataset)
  try:
    yield from iterator
  finally:
    iterator.close()


def paths(batches, workers):
  out = {'old-sync': lambda n: (batches[s] for s in range(n)),
         'old-thread': lambda n: old_thread(batches.__getitem__, n),
         'grain-sync': lambda n: grain_stream(batches, n, 0, 0)}
  for threads, buffer in ((1, 2), (2, 4)):
    out[f'grain-t{threads}-b{buffer}'] = (
        lambda n, t=threads, b=buffer: grain_stream(batches, n, t, b))
  for w in workers:
    out[f'grain-mp{w}'] = lambda n, w=w: grain_stream(batches, n, 1, 2, workers=w)
  return out


def timed(stream, steps, consumer_s):
  """(seconds to the first batch, seconds of the steps after it: the steady state)."""
  start = time.perf_counter()
  count, first = 0, None
  for batch in stream(steps):
    assert batch
    count += 1
    if first is None:
      first = time.perf_counter()
    if consumer_s:
      time.sleep(consumer_s)
  wall = time.perf_counter() - first
  assert count == steps, (count, steps)
  return first - start, wall


def measure(reader, dataset, batch_size, args, consumers, workers):
  batches = batches_lib.HostBatches(dataset, global_batch_size=batch_size, seed=0)
  streams = paths(batches, workers)
  rows = []
  for consumer_ms in consumers:
    consumer_s = consumer_ms / 1000
    steps = args.steps if not consumer_ms else max(args.steps // 4, 8)
    walls = {name: [] for name in streams}
    firsts = {name: [] for name in streams}
    for stream in streams.values():  # warm-up: page cache, permutations
      timed(stream, min(steps, 8), 0.0)
    for _ in range(args.rounds):
      for name, stream in streams.items():
        first, wall = timed(stream, steps, consumer_s)
        firsts[name].append(first)
        walls[name].append(wall)
    n = steps - 1  # timed from the first batch on
    base = n / statistics.median(walls['old-sync'])
    for name, times in walls.items():
      wall = statistics.median(times)
      rows.append({'reader': reader, 'batch_size': batch_size, 'consumer_ms': consumer_ms,
                   'path': name, 'batches_per_s': round(n / wall, 1),
                   'images_per_s': round(n * batch_size / wall),
                   'input_ms_per_batch': round(max(wall / n - consumer_s, 0.0) * 1e3, 4),
                   'first_batch_ms': round(statistics.median(firsts[name]) * 1e3, 2),
                   'ratio_to_old_sync': float(f'{n / wall / base:.3g}')})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batch_sizes', default='32,256')
  parser.add_argument('--cache_examples', type=int, default=20000)
  parser.add_argument('--latent_shape', default='8,8,4')
  parser.add_argument('--consumer_ms', default='0,2',
                      help='simulated train step after each batch (a sleep), comma-separated')
  parser.add_argument('--workers', default='1,2',
                      help='grain worker processes for the latent cache ("" = none)')
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--smoke', action='store_true', help='toy sizes (CI)')
  args = parser.parse_args()
  if args.smoke:
    args.steps, args.rounds, args.cache_examples, args.batch_sizes = 16, 1, 512, '8'
    args.consumer_ms, args.workers = '0', '1'
  if not flags.FLAGS.is_parsed():  # grain worker processes read absl flags
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.ERROR)  # the synthetic cache has no checksums file
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  consumers = [float(c) for c in args.consumer_ms.split(',')]
  workers = [int(w) for w in args.workers.split(',') if w]
  latent_shape = tuple(int(d) for d in args.latent_shape.split(','))
  rows = []
  fmnist, fmnist_name = fashion_mnist(args.smoke)
  with tempfile.TemporaryDirectory() as directory:
    cache = write_cache(directory, args.cache_examples, latent_shape)
    for batch_size in batch_sizes:
      rows += measure('fashion_mnist', fmnist, batch_size, args, consumers, [])
      rows += measure('latent_cache', cache, batch_size, args, consumers, workers)
  report = {'cpu': machine.cpu_description(), 'cpu_count': os.cpu_count(), 'grain': grain.__version__,
            'fashion_mnist': fmnist_name,
            'latent_cache': f'{args.cache_examples} x 2x{"x".join(map(str, latent_shape))} f32',
            'steps': args.steps, 'rounds': args.rounds, 'rows': rows}
  if args.json:
    print(json.dumps(report, indent=1))
    return
  print(f"CPU: {report['cpu']} ({report['cpu_count']} cores), grain {report['grain']}; "
        f"fashion_mnist: {fmnist_name}; latent cache: {report['latent_cache']}")
  print(f"{'reader':<14}{'batch':>6}{'step ms':>8}  {'path':<14}{'batches/s':>10}"
        f"{'img/s':>10}{'input ms/batch':>16}{'x old-sync':>11}{'first ms':>10}")
  for r in rows:
    print(f"{r['reader']:<14}{r['batch_size']:>6}{r['consumer_ms']:>8g}  {r['path']:<14}"
          f"{r['batches_per_s']:>10}{r['images_per_s']:>10}{r['input_ms_per_batch']:>16}"
          f"{r['ratio_to_old_sync']:>11}{r['first_batch_ms']:>10}")


if __name__ == '__main__':
  main()
