"""Sampling img/s of a trained text model with its condition encoded once per sampling call
(the Sampler's way) against encoded at every model evaluation (before), in one process.

    python benchmarks/text_sampling.py --config configs/fashion_mnist_text.py \\
        --workdir runs/fmnist_text [--prompts 200] [--rounds 3] [--w 2]

The trained byte-level encoder of configs/fashion_mnist_text.py sits inside the model; a Heun
sampler of 10 steps evaluates the model 19 times (38 rows with CFG), and without the encode-once
path the encoder ran at every one of them. Both rows sample the same prompts with the same noise
(the samples agree to float tolerance: printed); rounds run interleaved so that a shared
machine's load falls on both. Prints the CPU's name; asserts nothing about speed.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import machine
from guidedflow import host_allocator
from guidedflow import sampler as sampler_lib
from guidedflow.models import text_conditioning
from guidedflow.tasks import registry


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--prompts', type=int, default=200)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--w', type=float, default=2.0)
  args = parser.parse_args()
  host_allocator.skip_tpu_probe_without_tpu()
  host_allocator.keep_freed_memory()
  spec = importlib.util.spec_from_file_location('config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  registry.validate(config)
  task = registry.get_task(config, args.workdir)
  prompts = [('a dark T-shirt', 'a bag', 'a photo of a wide sandal')[i % 3]
             for i in range(args.prompts)]
  once = text_conditioning.encode_condition
  samplers = {'encoded once per call': (sampler_lib.Sampler.from_workdir(config, args.workdir),
                                        once),
              'encoded at every evaluation': (
                  sampler_lib.Sampler.from_workdir(config, args.workdir), lambda model, y: y)}
  key = jax.random.PRNGKey(0)
  times, outputs = {name: [] for name in samplers}, {}
  for name, (sampler, encode) in samplers.items():  # compile both first
    text_conditioning.encode_condition = encode
    outputs[name] = task.sample_prompts(sampler, prompts, args.w, key)[0]
  for _ in range(args.rounds):
    for name, (sampler, encode) in samplers.items():
      text_conditioning.encode_condition = encode
      t0 = time.perf_counter()
      task.sample_prompts(sampler, prompts, args.w, key)
      times[name].append(time.perf_counter() - t0)
  text_conditioning.encode_condition = once
  print(f'{machine.cpu_description()}; jax {jax.__version__}; {args.prompts} prompts at w = {args.w}, '
        f'{config.sampling.method} {config.sampling.num_steps} steps, batch '
        f'{config.sampling.batch_size}, {args.rounds} rounds')
  base = None
  for name, values in times.items():
    rate = args.prompts / statistics.median(values)
    base = base or rate
    print(f'  {name:30s} {rate:8.1f} img/s (best {args.prompts / min(values):.1f})  '
          f'{rate / base:.2f}× the first row')
  a, b = outputs.values()
  print(f'  largest sample difference: {np.abs(a.astype(int) - b.astype(int)).max()} / 255')


if __name__ == '__main__':
  main()
