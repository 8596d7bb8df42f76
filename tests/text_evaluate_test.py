"""--mode=evaluate of a text model: attribute accuracy by the function that made the captions,
the caption set aligned with its real images, and the sweep end to end on a tiny text model."""

import json
import os

import numpy as np
import pytest

from guidedflow import captions
from guidedflow import evaluate
from guidedflow import feature_networks
from guidedflow import input_pipeline
from guidedflow import text_evaluate
from guidedflow import train
from guidedflow.tasks import registry
from tests import evaluate_test

pytestmark = pytest.mark.xdist_group('text_generator')

NUM_REAL = 200


@pytest.fixture(scope='module')
def test_split():
  return input_pipeline.create_dataset(_config().input, 'test')


def _config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.text.encoder = 'trained'
  config.text.encoder_width, config.text.encoder_depth = 32, 1
  config.text.max_length = 40
  config.eval.num_batches = 1
  config.eval.feature_network = 'fmnist_classifier'  # replaced by PixelFeatures
  config.eval.num_real_images = NUM_REAL
  config.eval.samples_per_class = 2
  config.eval.samples_per_composition = 1
  config.eval.guidance_scales = (1.0, 3.0)
  return config


def test_attribute_accuracy_of_real_images_against_their_own_and_the_opposite_levels(
    test_split):
  batch = test_split.get_batch(np.arange(600))
  images, labels = evaluate.images_lib.to_uint8(batch['image']), batch['label']
  levels = captions.levels(images, labels)
  a = captions.ATTRIBUTES.index('brightness')
  pick = np.nonzero(levels[:, a] != 1)[0]
  own = [[(a, int(levels[i, a] == 2))] for i in pick]
  out = text_evaluate.attribute_accuracy(images[pick], labels[pick], own)
  assert out['seen']['brightness'] == 1.0 and out['seen']['size'] is None
  assert out['held_out']['dark sneaker'] == 1.0  # (7, brightness, low) is held out
  assert out['held_out']['mean'] == 1.0 and out['seen']['mean'] == 1.0
  opposite = [[(a, 1 - level)] for [(a, level)] in own]
  out = text_evaluate.attribute_accuracy(images[pick], labels[pick], opposite)
  assert out['seen']['mean'] == 0.0 and out['held_out']['mean'] == 0.0
  assert 'light sneaker' not in out['held_out']  # seen: under 'seen'


def test_the_caption_set_is_its_real_images_captions(test_split):
  """Real images "sampled" for the captions of themselves: every asked attribute is met."""
  sets = text_evaluate.PromptSets(test_split, 300, per_composition=2)
  texts, labels, requests = sets.captions
  real = evaluate.images_lib.to_uint8(test_split.get_batch(np.arange(300))['image'])
  np.testing.assert_array_equal(labels, test_split.get_batch(np.arange(300))['label'])
  table = captions.caption_table()
  assert all(t in table for t in texts) and sum(map(len, requests)) > 200
  out = text_evaluate.attribute_accuracy(real, labels, requests)
  assert out['seen']['mean'] == 1.0 and out['held_out']['mean'] in (1.0, None)
  assert len(sets.compositions[0]) == len(sets.paraphrased[0]) == 2 * 80
  assert sets.compositions[0][:2] == ['a dark T-shirt'] * 2
  assert not set(sets.paraphrased[0]) & set(table)


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory, test_split):
  workdir = str(tmp_path_factory.mktemp('text_evaluate'))
  config = _config()
  train.train_and_evaluate(config, workdir)
  batch = test_split.get_batch(np.arange(NUM_REAL))
  network = evaluate_test.PixelFeatures()  # pixels' random projection, nearest-centroid logits
  network.fit(evaluate.images_lib.to_uint8(batch['image']), batch['label'])
  patch = pytest.MonkeyPatch()
  patch.setattr(feature_networks, 'load', lambda config, name=None: network)
  try:
    result = registry.get_task(config, workdir).evaluate(workdir)
  finally:
    patch.undo()
  return workdir, result


def test_evaluate_sweeps_w_and_writes_tables_figure_and_grid(evaluated):
  workdir, result = evaluated
  rows = result['text_sweep']
  assert [r['guidance_scale'] for r in rows] == [1.0, 3.0]
  assert np.isfinite(result['loss_ema'])
  for row in rows:
    assert row['num_samples'] == 20 and np.isfinite(row['fd']) and 0 <= row['accuracy'] <= 1
    assert row['compositions']['num_samples'] == row['paraphrased']['num_samples'] == 80
    seen = row['compositions']['attributes']['seen']
    assert set(seen) == {*captions.ATTRIBUTES, 'mean'}
    assert all(0 <= v <= 1 for v in seen.values())
    held = row['compositions']['attributes']['held_out']
    assert set(held) == {'dark sneaker', 'patterned pullover', 'narrow bag', 'mean'}
  assert rows[0]['fd'] != rows[1]['fd']  # w reaches the samples
  for name in ('text_sweep.md', 'text_sweep.png', 'feature_spaces.md', 'prompt_grid.png',
               'text_sweep.json', 'evaluate.json'):
    assert os.path.exists(os.path.join(workdir, 'eval', name)), name
  with open(os.path.join(workdir, 'eval', 'text_sweep.md')) as f:
    table = f.read()
  assert table.count('\n| 1 |') == 2 and 'held-out "dark sneaker"' in table
  with open(os.path.join(workdir, 'eval', 'evaluate.json')) as f:
    assert json.load(f)['real_data']['same_n']['num_samples'] == 20
