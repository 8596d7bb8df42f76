"""Fashion-MNIST captions: what they say, what they cost.

    python benchmarks/captions.py [--out docs/fmnist_captions.png] [--batch_size 32]

Prints the per-class tercile thresholds (`captions.TERCILES`, recomputed from the train split),
the share of each attribute level, the held-out compositions and their example counts, the size
of the caption table, and the cost of captioning a training batch: measuring the attributes of
the whole train split once (seconds) and drawing one batch's captions (µs per batch, and as a
share of the default model's measured step time when --step_ms is given). With --out, writes a
grid of train images beside the captions one epoch draws for them, two per class.
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from guidedflow import captions
from guidedflow import fashion_mnist
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'PNG of images beside their captions; none: no figure.')
flags.DEFINE_integer('batch_size', 32, 'Batch whose captions are drawn (the default: 32).')
flags.DEFINE_integer('repeats', 200, 'Batches timed.')
flags.DEFINE_float('step_ms', 0.0, "The default model's train step (ms) to compare with.")
flags.DEFINE_string('data_dir', None, 'Fashion-MNIST directory (default: the Debian one).')


def _grid(images, texts, path, per_row=2, scale=3):
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  font = ImageFont.load_default(size=15)
  cell_w, cell_h = 28 * scale + 390, 28 * scale + 8
  rows = -(-len(images) // per_row)
  canvas = Image.new('L', (per_row * cell_w, rows * cell_h), 255)
  draw = ImageDraw.Draw(canvas)
  for i, (image, text) in enumerate(zip(images, texts)):
    x, y = (i % per_row) * cell_w, (i // per_row) * cell_h
    canvas.paste(Image.fromarray(image[..., 0]).resize((28 * scale, 28 * scale),
                                                       Image.NEAREST), (x + 4, y + 4))
    draw.text((x + 28 * scale + 12, y + 28 * scale // 2 - 8), text, fill=0, font=font)
  canvas.save(path)


def main(argv):
  del argv
  images, labels = fashion_mnist.load_fashion_mnist(FLAGS.data_dir, 'train')
  t0 = time.perf_counter()
  levels = captions.levels(images, labels)
  measure_s = time.perf_counter() - t0
  terciles = captions.fit_terciles(images, labels)
  print('| class | ' + ' | '.join(captions.ATTRIBUTES) + ' |')
  print('|---' * (1 + len(captions.ATTRIBUTES)) + '|')
  for c, names in enumerate(captions.SYNONYMS):
    cells = [f'{lo:.4g} / {hi:.4g}' for lo, hi in terciles[c]]
    print(f'| {names[0]} | ' + ' | '.join(cells) + ' |')
  print('max |recomputed - documented| / documented:',
        f'{np.max(np.abs(terciles - captions.TERCILES) / captions.TERCILES):.2e}')
  for c, name, level in captions.HELD_OUT:
    count = int(((labels == c) & (levels[:, captions.ATTRIBUTES.index(name)] == level)).sum())
    print(f'held out: {captions.LEVEL_WORDS[name][level // 2]} {captions.SYNONYMS[c][0]} '
          f'({name} level {level}): {count} train images')
  print(f'caption table: {len(captions.caption_table())} captions; held out from training: '
        f'{int(captions.held_out(labels, levels).sum())} of {len(labels)} images')
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, len(labels), FLAGS.batch_size) for _ in range(FLAGS.repeats)]
  t0 = time.perf_counter()
  for step, index in enumerate(batches):
    captions.draw(0, np.full(len(index), step // 100), index, labels[index], levels[index])
  per_batch_us = (time.perf_counter() - t0) / FLAGS.repeats * 1e6
  print(f'attributes of the {len(labels)} train images: {measure_s:.2f} s (once per run); '
        f'captions of a batch of {FLAGS.batch_size}: {per_batch_us:.0f} µs')
  if FLAGS.step_ms:
    print(f'  = {per_batch_us / 1e3 / FLAGS.step_ms:.2%} of a {FLAGS.step_ms:g} ms train step')
  if FLAGS.out:
    picks = np.concatenate([np.nonzero(labels == c)[0][:2] for c in range(10)])
    ids = captions.draw(0, np.zeros(len(picks), int), picks, labels[picks], levels[picks])
    table = captions.caption_table()
    _grid(images[picks], [table[i] for i in ids], FLAGS.out)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
