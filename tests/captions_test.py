"""Fashion-MNIST captions: the attributes' closed forms on drawn shapes, the documented terciles
reproduced from the train split, captions true to their image, drawn per example and epoch."""

import numpy as np
import pytest

from guidedflow import captions
from guidedflow import input_pipeline


@pytest.fixture(scope='module')
def train():
  return input_pipeline.load_fashion_mnist(None, 'train')


def test_attributes_of_drawn_shapes():
  image = np.zeros((2, 28, 28), np.uint8)
  image[0, 4:24, 10:20] = 153  # a 20 × 10 block at 0.6
  image[1, 4:24, 10:20] = 204  # the same block with a vertical stripe pattern
  image[1, 4:24, 10:20:2] = 102
  values = captions.measure(image)
  np.testing.assert_allclose(values['brightness'], [0.6, (0.8 + 0.4) / 2], rtol=1e-6)
  np.testing.assert_allclose(values['size'], [200 / 784] * 2, rtol=1e-6)
  uniform_std = np.sqrt((10 ** 2 - 1) / 12)  # columns 10..19, equal mass
  assert values['width'][0] == pytest.approx(uniform_std, rel=1e-5)
  assert values['texture'][0] == 0.0
  # 20 rows × 9 horizontal neighbours differ by 0.4; 19 × 10 vertical ones do not.
  assert values['texture'][1] == pytest.approx(20 * 9 * 0.4 ** 2 / (20 * 9 + 19 * 10), rel=1e-5)


def test_the_documented_terciles_are_the_train_splits(train):
  images, labels = train
  np.testing.assert_allclose(captions.fit_terciles(images, labels), captions.TERCILES,
                             rtol=2e-6)
  levels = captions.levels(images, labels)
  for c in range(10):
    fractions = np.bincount(levels[labels == c].ravel().astype(int), minlength=3) / (
        4 * (labels == c).sum())
    np.testing.assert_allclose(fractions, 1 / 3, atol=0.02)
  held = captions.held_out(labels, levels)
  assert held.sum() == pytest.approx(3 * 6000 / 3, rel=0.02)  # a third of three classes
  assert not held[labels == 0].any()


def test_every_caption_is_once_in_the_table_and_reads_well():
  table = captions.caption_table()
  assert len(table) == len(set(table)) == 10 * 3 * len(captions.TEMPLATES) * captions.NUM_PHRASES
  assert table[captions.caption_id(2, 0, 0, 0)] == 'a pullover'
  assert 'a picture of an ankle boot that is dark and wide' in table
  assert 'an ankle boot' in table and 'a dark ankle boot' in table
  assert 'a photo of a pair of dark pants' in table and 'pants, dark' in table
  assert 'pullover, patterned' in table and 'a photo of a small light sandal' in table
  assert 'a dark wide pullover' in table and 'a photo of a light small sandal' not in table


def test_captions_are_true_to_their_image_and_drawn_per_epoch(train):
  images, labels = train
  indices = np.arange(0, 60000, 7)[:2000]
  levels = captions.levels(images[indices], labels[indices])
  table = captions.caption_table()
  first = captions.draw(3, np.zeros(len(indices), int), indices, labels[indices], levels)
  for caption_id, label, row in zip(first, labels[indices], levels):
    text = table[caption_id]
    assert any(name in text for name in captions.SYNONYMS[label]), text
    words = set(text.replace(',', '').split())
    for a, name in enumerate(captions.ATTRIBUTES):
      for level, word in zip((0, 2), captions.LEVEL_WORDS[name]):
        if word in words:
          assert row[a] == level, (text, row)
  # A function of (seed, epoch, index) alone: any order, any batch.
  order = np.random.default_rng(0).permutation(len(indices))
  again = captions.draw(3, np.zeros(len(indices), int), indices[order], labels[indices][order],
                        levels[order])
  np.testing.assert_array_equal(again, first[order])
  later = captions.draw(3, np.ones(len(indices), int), indices, labels[indices], levels)
  other_seed = captions.draw(4, np.zeros(len(indices), int), indices, labels[indices], levels)
  assert 0.6 < np.mean(later != first) and 0.6 < np.mean(other_seed != first)
  phrases = first % captions.NUM_PHRASES
  assert np.mean(phrases == 0) == pytest.approx(0.2 + 0.8 * np.mean(
      (levels == 1).all(1)), abs=0.03)


def test_a_captioned_stream_holds_out_its_compositions_and_resumes_exactly(train):
  from guidedflow import batches  # pylint: disable=g-import-not-at-top
  images, labels = train
  base = input_pipeline.ArrayDataset(images[:600], labels[:600], num_classes=10, split='train')
  data = captions.CaptionedDataset(base, hold_out=True)
  kept_levels = captions.levels(images[:600][data._keep], labels[:600][data._keep])  # pylint: disable=protected-access
  assert data.num_held_out > 0 and not captions.held_out(labels[:600][data._keep],
                                                         kept_levels).any()
  kwargs = dict(global_batch_size=64, seed=5)
  straight = batches.BatchIterator(data, **kwargs)
  stream = [jax_batch for _, jax_batch in zip(range(12), straight)]  # 12 × 64 > 1 epoch
  resumed = batches.BatchIterator(data, **kwargs)
  resumed.set_state(dict(straight.get_state(), step=7))
  for step in range(7, 12):
    again = next(resumed)
    for key in ('caption', 'label', 'image'):
      np.testing.assert_array_equal(np.asarray(again[key]), np.asarray(stream[step][key]))
  # An example's caption is redrawn each epoch, and says its class.
  first = straight.batches.host_batch(0)
  table = captions.caption_table()
  assert all(any(n in table[c] for n in captions.SYNONYMS[y])
             for c, y in zip(first['caption'], first['label']))
  index = straight.global_indices(0)[0]
  epochs = [data.get_batch([index], epochs=np.array([e]), seed=5)['caption'][0]
            for e in range(8)]
  assert len(set(epochs)) > 2


def test_parse_inverts_caption_id_and_paraphrases_are_never_training_captions():
  table = captions.caption_table()
  for i in range(len(table)):
    label, synonym, template, parts = captions.parse(i)
    assert captions.render(label, parts, captions.TEMPLATES[template], synonym) == table[i]
  paraphrased = {captions.render(c, [(a, level)], t) for c in range(10) for a in range(4)
                 for level in (0, 1) for t in captions.PARAPHRASES}
  assert len(paraphrased) == 2 * 80 and not paraphrased & set(table)
  assert 'this is a sneaker that is dark' in paraphrased
