"""The PyTorch peer of `step_throughput.py`: SiT's own model code on the same workloads.

    python benchmarks/peer_sit.py --sit_dir PATH/TO/SiT [--cases W1,W2] [--dtypes f32,bf16]
        [--threads 2] [--steps 3] [--sample_steps 10] [--compile] [--json]

Runs in an environment with `torch` and `timm` (not guidedflow's: nothing here imports jax);
`--sit_dir` is a checkout of github.com/willisma/SiT (its `models.py` is imported as is, with
`learn_sigma=False` so that it predicts the 4 (or 1) channels guidedflow's DiT predicts).
Workloads as in `step_throughput.py`: W1 SiT-S/2 on 32×32×4, 1000 classes, train batch 32,
sample batch 16 (doubled for CFG); W2 a DiT-T/4 (width 256, depth 6, 4 heads) on 28×28×1,
10 classes, batch 128 / 64. The train step is SiT's: velocity MSE on the linear path, backward,
global-norm clip at 1, AdamW, and SiT's EMA update (one `mul_`/`add_` per parameter); sampling
is Euler with `forward_with_cfg` on the doubled batch (w = 2), `--sample_steps` steps, samples/s
reported for that many steps, as `step_throughput.py` does. bf16 is `torch.autocast` (oneDNN,
AMX where the CPU has it). Prints numbers only; compare with `step_throughput.py` run on the
same machine right before or after, as ratios of img/s (same model, same FLOPs).
"""

import argparse
import json
import math
import platform
import sys
import time

import torch

CASES = {
    # name: (model kwargs, image size, channels, classes, train batch, sample batch)
    'W1': (dict(depth=12, hidden_size=384, patch_size=2, num_heads=6), 32, 4, 1000, 32, 16),
    'W2': (dict(depth=6, hidden_size=256, patch_size=4, num_heads=4), 28, 1, 10, 128, 64),
}


def _time(fn, steps, rounds):
  fn()  # warm-up (and compile, with --compile)
  best = math.inf
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(steps):
      fn()
    best = min(best, (time.perf_counter() - start) / steps)
  return best


def _matmul_peak(dtype):
  a = torch.randn(2048, 2048, dtype=dtype)
  seconds = _time(lambda: a @ a, 5, 3)
  return 2 * 2048**3 / seconds / 1e9


def bench_case(models, name, dtype, args):
  kwargs, size, channels, classes, train_batch, sample_batch = CASES[name]
  torch.manual_seed(0)
  model = models.SiT(input_size=size, in_channels=channels, num_classes=classes,
                     learn_sigma=False, class_dropout_prob=0.1, **kwargs)
  ema = models.SiT(input_size=size, in_channels=channels, num_classes=classes,
                   learn_sigma=False, class_dropout_prob=0.1, **kwargs)
  ema.load_state_dict(model.state_dict())
  ema.requires_grad_(False)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
  forward = torch.compile(model) if args.compile else model
  autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16')
  x1 = torch.randn(train_batch, channels, size, size)
  y = torch.randint(0, classes, (train_batch,))

  def train_step():
    x0 = torch.randn_like(x1)
    t = torch.rand(train_batch)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    with autocast:
      pred = forward(xt, t, y)
    loss = ((pred.float() - (x1 - x0)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():  # SiT's train.py update_ema
      for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)

  model.train()
  train_s = _time(train_step, args.steps, args.rounds)

  model.eval()
  cfg = torch.compile(model.forward_with_cfg) if args.compile else model.forward_with_cfg
  z = torch.randn(sample_batch, channels, size, size)
  ys = torch.randint(0, classes, (sample_batch,))
  y_null = torch.full((sample_batch,), classes)

  @torch.no_grad()
  def sample():
    x = torch.cat([z, z])
    labels = torch.cat([ys, y_null])
    dt = 1.0 / args.sample_steps
    for i in range(args.sample_steps):
      t = torch.full((2 * sample_batch,), i * dt)
      with autocast:
        v = cfg(x, t, labels, 2.0)
      x = x + dt * v.float()
    return x

  sample_s = _time(sample, 1, args.rounds)
  return dict(case=name, dtype=dtype, train_img_s=train_batch / train_s,
              train_step_ms=1e3 * train_s, cfg_samples_s=sample_batch / sample_s,
              sample_steps=args.sample_steps, compiled=args.compile)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sit_dir', required=True, help='a checkout of willisma/SiT')
  parser.add_argument('--cases', default='W1,W2')
  parser.add_argument('--dtypes', default='f32,bf16')
  parser.add_argument('--threads', type=int, default=0, help='0: torch default')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--sample_steps', type=int, default=10)
  parser.add_argument('--compile', action='store_true', help='torch.compile the model')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  sys.path.insert(0, args.sit_dir)
  import models  # pylint: disable=g-import-not-at-top  # SiT's models.py
  rows = []
  peaks = dict(P32=_matmul_peak(torch.float32), P16=_matmul_peak(torch.bfloat16))
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, Python '
        f'{platform.python_version()}; P32 {peaks["P32"]:.0f}, P16 {peaks["P16"]:.0f} GFLOP/s')
  for name in args.cases.split(','):
    for dtype in args.dtypes.split(','):
      row = bench_case(models, name, dtype, args)
      rows.append(row)
      print(f'{name} {dtype:>4}: train {row["train_img_s"]:8.2f} img/s '
            f'({row["train_step_ms"]:.0f} ms/step)   CFG {row["cfg_samples_s"]:7.3f} samples/s '
            f'({args.sample_steps} steps)', flush=True)
  if args.json:
    print(json.dumps(dict(peaks=peaks, rows=rows)))


if __name__ == '__main__':
  main()
