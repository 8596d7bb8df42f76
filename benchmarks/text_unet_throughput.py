"""Train steps/s of the text U-Net against the class-conditional default U-Net, in one process.

    python benchmarks/text_unet_throughput.py [--batch 32] [--rounds 5] [--steps 10]
        [--variants levels=-2,-1;levels=-1;heads=1] [--smoke]

Issue 48's target: the text U-Net trains at ≥ 0.7× the class-conditional default's img/s. Each
row is one jitted train step (forward + backward + Adam, parameters and optimizer state donated)
of configs/fashion_mnist.py's U-Net on 28×28×1 images, a velocity-MSE loss on random data:
  * class: the default, int labels;
  * text: the same U-Net with text_dim=128 (the trained byte-level encoder's width), cached
    features of L=24 tokens (`{'hidden', 'mask', 'pooled'}`, 8–24 real tokens a row), one row
    per `--variants` entry (levels = model.unet_text_attention_levels, heads =
    model.unet_text_heads);
  * text+encoder: the first text variant behind `TextTransformer(width 128, depth 3)` trained in
    the same step (the offline default: the encoder's own cost too), on (B, 64) byte tokens
    (config.text.tokenizer_kind='bytes'; 8–24 real a row) and on (B, 16) word tokens of the
    Fashion-MNIST caption vocabulary ('words': 53 ids; 3–14 real a row).
Rows run interleaved, `--rounds` rounds of `--steps` steps each, so that a shared machine's load
falls on all of them alike; the table gives the median round (and the best) and the ratio of
each row's img/s to the class row's. Prints the CPU's name; asserts nothing about speed.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# The repository root, so that `configs` imports when run as `python benchmarks/...`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import machine
from configs import fashion_mnist
from guidedflow import captions
from guidedflow import host_allocator
from guidedflow.models import factory
from guidedflow.models import layers
from guidedflow.models import text_transformer
# pylint: enable=g-import-not-at-top,wrong-import-position

TEXT_DIM, TEXT_TOKENS = 128, 24
# tokenizer kind → (L, fewest and most real tokens a row: Fashion-MNIST captions with bos and eos)
ENCODER_TOKENS = {'bytes': (64, 8, 24), 'words': (16, 3, 14)}


def parse_variant(text):
  """'levels=-2,-1' / 'heads=1' / 'levels=-1 heads=2' → config.model overrides."""
  overrides = {}
  for item in text.split():
    key, _, value = item.partition('=')
    if key == 'levels':
      overrides['unet_text_attention_levels'] = tuple(int(v) for v in value.split(','))
    elif key == 'heads':
      overrides['unet_text_heads'] = int(value)
    else:
      raise ValueError(f'unknown variant setting {item!r}: levels=... or heads=...')
  return overrides


def _config(smoke, overrides=None):
  config = fashion_mnist.get_config('unet')
  if smoke:
    config.model.unet_channels, config.model.unet_num_residual_layers = (8, 16, 32), 1
  config.model.update(overrides or {})
  return config


def _text_batch(key, batch, length):
  """Cached text features of `length` tokens, 8..length of them real."""
  k1, k2, k3 = jax.random.split(key, 3)
  real = jax.random.randint(k3, (batch, 1), min(8, length), length + 1)
  mask = (jnp.arange(length)[None] < real).astype(jnp.int32)
  return {'hidden': jax.random.normal(k1, (batch, length, TEXT_DIM)), 'mask': mask,
          'pooled': jax.random.normal(k2, (batch, TEXT_DIM))}


def _token_batch(key, batch, kind, vocab_size):
  """Token ids of `kind` ('bytes' | 'words') below `vocab_size` and a mask of its real tokens
  (`ENCODER_TOKENS`) in rows of its length."""
  length, fewest, most = ENCODER_TOKENS[kind]
  k1, k2 = jax.random.split(key)
  real = jax.random.randint(k2, (batch, 1), fewest, most + 1)
  mask = (jnp.arange(length)[None] < real).astype(jnp.int32)
  ids = jnp.where(mask > 0, jax.random.randint(k1, (batch, length), 3, vocab_size), 0)
  return {'tokens': ids, 'mask': mask}


class WithEncoder(nnx.Module):
  """A text U-Net behind a trained TextTransformer: (x, t, {'tokens', 'mask'}) → prediction."""

  def __init__(self, backbone, encoder):
    self.backbone, self.encoder = backbone, encoder

  def __call__(self, x, t, y):
    features = self.encoder(y['tokens'], y['mask'])
    return self.backbone(x, t, dict(features, mask=y['mask']))


def make_step(model, batch, condition):
  """(jitted step(params, opt_state, key) → (params, opt_state, loss), params, opt_state)."""
  graphdef, params = nnx.split(model)
  tx = optax.adam(1e-4)
  opt_state = tx.init(nnx.state(model, nnx.Param))

  def loss_fn(params, key):
    kx, kz, kt = jax.random.split(key, 3)
    data = jax.random.normal(kx, (batch, 28, 28, 1))
    noise = jax.random.normal(kz, data.shape)
    t = jax.random.uniform(kt, (batch,))
    x_t = t[:, None, None, None] * data + (1 - t[:, None, None, None]) * noise
    prediction = nnx.merge(graphdef, params)(x_t, t, condition)
    return jnp.mean((prediction - (data - noise)) ** 2)

  def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), params, opt_state


def build_rows(args):
  """[(name, parameter count, model, condition)] of the compared train steps."""
  image_shape, key = (28, 28, 1), jax.random.key(0)
  config = _config(args.smoke)
  rows = [('class', factory.constructor(config, image_shape)(),
           jax.random.randint(key, (args.batch,), 0, config.input.num_classes + 1))]
  text = _text_batch(key, args.batch, TEXT_TOKENS)
  for variant in args.variants:
    variant_config = _config(args.smoke, parse_variant(variant))
    rows.append((f'text {variant}',
                 factory.constructor(variant_config, image_shape, text_dim=TEXT_DIM)(), text))
  words = text_transformer.vocabulary(captions.caption_table())
  for kind in ENCODER_TOKENS:
    length = ENCODER_TOKENS[kind][0]
    tokenizer = text_transformer.tokenizer(kind, length, words)
    encoder = text_transformer.TextTransformer(
        width=TEXT_DIM, depth=1 if args.smoke else 3, max_length=length,
        vocab_size=tokenizer.vocab_size, rngs=nnx.Rngs(1))
    backbone = factory.constructor(_config(args.smoke, parse_variant(args.variants[0])),
                                   image_shape, text_dim=TEXT_DIM)()
    rows.append((f'text {args.variants[0]} + encoder, {length} {kind}',
                 WithEncoder(backbone, encoder),
                 _token_batch(key, args.batch, kind, tokenizer.vocab_size)))
  return [(name, layers.param_count(model), model, cond) for name, model, cond in rows]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10, help='steps per round')
  parser.add_argument('--variants', default='levels=-2,-1',
                      help="';'-separated text U-Net settings, e.g. 'levels=-2,-1;levels=-1;"
                      "heads=1'")
  parser.add_argument('--smoke', action='store_true', help='tiny widths, 1 encoder block')
  args = parser.parse_args()
  args.variants = [v.strip() for v in args.variants.split(';') if v.strip()]
  host_allocator.skip_tpu_probe_without_tpu()
  allocator = host_allocator.keep_freed_memory()
  print(f'CPU: {machine.cpu_description()}; jax {jax.__version__}, {jax.devices()[0].platform}; {allocator}')
  print(f'batch {args.batch}, 28x28x1; text width {TEXT_DIM}, {TEXT_TOKENS} cached tokens, '
        f'encoder on 64 byte or 16 word tokens; {args.rounds} rounds of {args.steps} steps')
  steps, times = [], {}
  for name, count, model, cond in build_rows(args):
    step, params, opt_state = make_step(model, args.batch, cond)
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, jax.random.key(0))
    jax.block_until_ready(loss)
    steps.append([name, count, time.perf_counter() - t0, step, params, opt_state])
    times[name] = []
  for r in range(args.rounds):
    for entry in steps:
      name, _, _, step, params, opt_state = entry
      t0 = time.perf_counter()
      for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, jax.random.key(r * args.steps + i))
      jax.block_until_ready(loss)
      times[name].append((time.perf_counter() - t0) / args.steps)
      entry[4], entry[5] = params, opt_state
      if not np.isfinite(float(loss)):
        raise FloatingPointError(f'{name}: loss {float(loss)}')
  base = statistics.median(times['class'])
  print('| model | parameters | compile s | ms/step (median) | ms/step (best) | steps/s | img/s '
        '| × class |')
  print('|---|---|---|---|---|---|---|---|')
  for name, count, compile_s, *_ in steps:
    median = statistics.median(times[name])
    print(f'| {name} | {count:,} | {compile_s:.1f} | {1e3 * median:.1f} | '
          f'{1e3 * min(times[name]):.1f} | {1 / median:.2f} | {args.batch / median:.0f} | '
          f'{base / median:.2f} |')


if __name__ == '__main__':
  main()
