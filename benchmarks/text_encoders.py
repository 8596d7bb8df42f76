"""How fast the text encoders encode captions on this machine, at their real sizes (random
weights: the speed does not depend on them).

    python benchmarks/text_encoders.py [--encoders openai-vit-l-14,t5-v1_1-base] [--batch 64]

For each preset: parameters, compile seconds, captions/s and the matmul FLOP rate of the
forward pass (2 · parameters-in-matmuls · tokens, attention included), and the minutes the
Fashion-MNIST text cache (3,960 captions) takes at that rate. Prints the CPU's name. Presets:
`clip_text.CONFIGS` and `t5_encoder` presets ('test' sizes for a smoke run).
"""

import os
import sys
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import machine
from guidedflow import captions
from guidedflow import host_allocator
from guidedflow.models import clip_text
from guidedflow.models import t5_encoder
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('encoders', ['openai-vit-l-14', 't5-v1_1-base'], 'Presets to time.')
flags.DEFINE_integer('batch', 64, 'Captions per call.')
flags.DEFINE_integer('repeats', 3, 'Timed calls after the compile.')
flags.DEFINE_integer('max_length', 0, 'Tokens per caption (0: the preset\'s; Fashion-MNIST '
                     'captions fit in 24 CLIP tokens).')


def _build(name):
  if name in clip_text.CONFIGS:
    config = clip_text.get_config(name)
    model = clip_text.ClipTextEncoder(config, rngs=nnx.Rngs(0))
    return model, config.max_length, config.width, config.layers, lambda m, i, k: m(
        i, k).last_hidden_state
  config = t5_encoder.get_config(name)
  model = t5_encoder.T5Encoder(config, rngs=nnx.Rngs(0))
  return model, config.max_length, config.d_model, config.num_layers, lambda m, i, k: m(i, k)[0]


def main(argv):
  del argv
  host_allocator.skip_tpu_probe_without_tpu()
  print(f'CPU: {machine.cpu_description()}; jax {jax.__version__}, {jax.devices()[0].platform}')
  print('| encoder | parameters | tokens | compile s | captions/s | GFLOP/s | FMNIST cache (3,960) |')
  print('|---|---|---|---|---|---|---|')
  for name in FLAGS.encoders:
    model, length, width, layers, run = _build(name)
    length = min(length, FLAGS.max_length) if FLAGS.max_length else length
    graphdef, params = nnx.split(model)
    count = sum(np.size(x) for x in jax.tree.leaves(params))
    forward = jax.jit(lambda p, i, k, run=run, g=graphdef: run(nnx.merge(g, p), i, k))
    ids = jnp.ones((FLAGS.batch, length), jnp.int32)
    mask = jnp.ones((FLAGS.batch, length), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(forward(params, ids, mask))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(FLAGS.repeats):
      jax.block_until_ready(forward(params, ids, mask))
    per_call = (time.perf_counter() - t0) / FLAGS.repeats
    rate = FLAGS.batch / per_call
    # Matmul FLOPs: 2 · (weights outside the embedding tables) · tokens + attention's 4·L²·D.
    tokens = FLAGS.batch * length
    embedding = sum(np.size(x) for path, x in jax.tree_util.tree_leaves_with_path(params)
                    if 'embed' in jax.tree_util.keystr(path))
    flops = 2 * (count - embedding) * tokens + 4 * FLAGS.batch * length ** 2 * width * layers
    table = len(captions.caption_table())
    print(f'| {name} | {count / 1e6:.1f}M | {length} | {compile_s:.1f} | {rate:.1f} | '
          f'{flops / per_call / 1e9:.0f} | {table / rate / 60:.1f} min |')


if __name__ == '__main__':
  app.run(main)
