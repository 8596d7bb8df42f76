"""How fast the text encoders encode captions on this machine, at their real sizes (random
weights: the speed does not depend on them).

    python benchmarks/text_encoders.py [--encoders openai-vit-l-14,t5-v1_1-base] [--batch 64]
    python benchmarks/text_encoders.py --encoders openai-vit-l-14 --cache \
        --tokenizer=PATH/bpe_simple_vocab_16e6.txt.gz

For each preset: parameters, compile seconds, captions/s and the matmul FLOP rate of the
forward pass (2 · parameters-in-matmuls · tokens, attention included) at the full length, and
the minutes the Fashion-MNIST text cache (3,960 captions) would take at that rate. Prints the
CPU's name. Presets: `clip_text.CONFIGS` and `t5_encoder` presets ('test' sizes for a smoke run).

--cache writes the real cache instead (`text_cache.write`: batches sorted by caption length and
encoded at their longest caption's padded length), end to end, compiles included, with a CLIP
preset and the CLIP tokenizer `--tokenizer` names: a tokenizer folder, tokenizer.json, or
OpenCLIP's `bpe_simple_vocab_16e6.txt.gz` (OpenAI's CLIP vocabulary, which the open_clip_torch
wheel ships: `pip download --no-deps open_clip_torch`, then unzip it; converted here to
vocab.json + merges.txt the way OpenCLIP's SimpleTokenizer builds its vocabulary).
"""

import gzip
import json
import os
import sys
import tempfile
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
from guidedflow import text_cache
from guidedflow import text_encoders
from guidedflow.models import clip_text
from guidedflow.models import clip_tokenizer
from guidedflow.models import t5_encoder
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('encoders', ['openai-vit-l-14', 't5-v1_1-base'], 'Presets to time.')
flags.DEFINE_integer('batch', 64, 'Captions per call.')
flags.DEFINE_integer('repeats', 3, 'Timed calls after the compile.')
flags.DEFINE_integer('max_length', 0, 'Tokens per caption (0: the preset\'s; Fashion-MNIST '
                     'captions fit in 24 CLIP tokens).')
flags.DEFINE_bool('cache', False, 'Write the Fashion-MNIST text cache end to end (CLIP presets).')
flags.DEFINE_string('tokenizer', None, '--cache: a CLIP tokenizer folder, tokenizer.json, or '
                    'OpenCLIP\'s bpe_simple_vocab_16e6.txt.gz.')


def _bytes_to_unicode():
  """GPT-2's (and CLIP's) map of the 256 bytes to printable characters, in vocabulary order."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = list(printable), 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return [chr(c) for c in chars]


def _from_open_clip(bpe_gz, folder):
  """vocab.json + merges.txt in `folder` from OpenCLIP's BPE file (its SimpleTokenizer's
  vocabulary: the 256 byte symbols, the same with '</w>', the 48,894 merges, the two specials)."""
  lines = gzip.open(bpe_gz).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
  symbols = _bytes_to_unicode()
  vocab = symbols + [v + '</w>' for v in symbols] + [''.join(m.split()) for m in lines]
  vocab += [clip_tokenizer.BOS, clip_tokenizer.EOS]
  with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + '\n'.join(lines) + '\n')
  return folder


def _clip_tokenizer(path, max_length, workdir):
  if path.endswith('.gz'):
    path = _from_open_clip(path, workdir)
  tokenizer = clip_tokenizer.ClipTokenizer.from_files(path, max_length=max_length)
  ids, _ = tokenizer('a photo of a cat')  # OpenAI CLIP's ids, as its README prints them
  print(f'tokenizer {path}: "a photo of a cat" → {ids[0, :7].tolist()} '
        f'(OpenAI CLIP: [49406, 320, 1125, 539, 320, 2368, 49407])')
  return tokenizer


def _cache(name):
  """Writes the Fashion-MNIST caption table's cache with preset `name` (random weights)."""
  if name not in clip_text.CONFIGS or not FLAGS.tokenizer:
    raise app.UsageError('--cache needs a CLIP preset and --tokenizer (see the docstring).')
  config = clip_text.get_config(name)
  length = min(config.max_length, FLAGS.max_length or config.max_length)
  texts = captions.caption_table()
  with tempfile.TemporaryDirectory() as workdir:
    tokenizer = _clip_tokenizer(FLAGS.tokenizer, length, workdir)
    counts = tokenizer(texts)[1].sum(1)
    print(f'{len(texts)} captions: {counts.min()}–{counts.max()} tokens, mean {counts.mean():.1f}')
    encoder = text_encoders.FrozenEncoder(
        name, clip_text.ClipTextEncoder(config, rngs=nnx.Rngs(0)), tokenizer,
        text_encoders._clip_pool, max_length=length, width=config.width,  # pylint: disable=protected-access
        source='random', salt='')
    t0 = time.perf_counter()
    meta = text_cache.write(encoder, texts, os.path.join(workdir, 'cache'),
                            batch_size=FLAGS.batch)
    seconds = time.perf_counter() - t0
  print(f'| {name} | {length} | {meta["tokens_encoded_per_caption"]} | {seconds:.1f} s '
        f'({seconds / 60:.2f} min) | {len(texts) / seconds:.1f} |')


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
  if FLAGS.cache:
    print('| encoder | max_length | tokens encoded per caption | FMNIST cache, end to end | '
          'captions/s |\n|---|---|---|---|---|')
    for name in FLAGS.encoders:
      _cache(name)
    return
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
