"""--mode=evaluate plumbing: reference cache, metrics of real images, sweeps and their files.

The feature network here is a fixed random projection of the pixels with a nearest-centroid
classifier on top (fitted on the reference images), so these tests do not depend on a trained
classifier; `classifier_test.py` covers the real one and `evaluation_test.py` the metrics.
"""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from guidedflow import errors
from guidedflow import evaluate
from guidedflow import evaluation
from guidedflow import feature_networks
from guidedflow import images as images_lib
from guidedflow import input_pipeline
from guidedflow import run_context
from guidedflow import sampler as sampler_lib
from guidedflow import train
from guidedflow.tasks import registry

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a trained tiny
# run) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('evaluate')

NUM_REAL = 200


class PixelFeatures:
  """Random projection of the pixels (16-d) + nearest-centroid logits."""

  def __init__(self, name='pixels'):
    self.name = name
    self.projection = np.random.default_rng(0).normal(size=(28 * 28, 16)).astype(np.float32)
    self.centroids = None
    self.calls = 0

  def _features(self, images):
    return (images.reshape(len(images), -1).astype(np.float32) / 255.0) @ self.projection

  def fit(self, images, labels):
    features = self._features(images)
    self.centroids = np.stack([features[labels == c].mean(0) for c in range(10)])

  def __call__(self, images):
    self.calls += 1
    features = self._features(images)
    logits = -((features[:, None, :] - self.centroids[None]) ** 2).sum(-1)
    return {'features': features, 'logits': logits.astype(np.float32)}


def _config(**eval_overrides):
  config = tiny.get_config()
  config.eval.feature_network = 'fmnist_classifier'  # replaced by PixelFeatures below
  config.eval.num_real_images = NUM_REAL
  config.eval.samples_per_class = 2
  config.eval.grid_rows_per_class = 1
  for key, value in eval_overrides.items():
    setattr(config.eval, key, value)
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny checkpoint (2 steps), its eval split and Sampler, and the pixel feature network."""
  workdir = str(tmp_path_factory.mktemp('evaluate'))
  config = tiny.get_config()
  config.train.num_steps = 2
  train.train_and_evaluate(config, workdir)
  sampler = sampler_lib.Sampler.from_workdir(config, workdir)
  eval_set = input_pipeline.create_dataset(config.input, 'test')
  network = PixelFeatures()
  real, labels = evaluate._real_images(eval_set, NUM_REAL)  # pylint: disable=protected-access
  network.fit(real, labels)
  return workdir, eval_set, sampler, network


@pytest.fixture
def network(trained, monkeypatch):
  net = trained[3]
  monkeypatch.setattr(feature_networks, 'load', lambda config, name=None: net)
  return net


def test_real_images_measure_as_perfect_samples(trained, network, tmp_path):
  _, eval_set, sampler, _ = trained
  evaluator = evaluate.Evaluator(_config(), str(tmp_path), sampler, network, eval_set)
  real, labels = evaluate._real_images(eval_set, NUM_REAL)  # pylint: disable=protected-access
  metrics = evaluator.measure(real, labels)
  assert metrics['fd'] < 1e-6
  assert metrics['precision'] == 1.0 and metrics['recall'] == 1.0
  assert metrics['coverage'] == 1.0
  assert max(fd for fd in metrics['fd_per_class'] if fd is not None) < 1e-6
  floor = evaluator.real_data_floor()
  # Pixel statistics of real images against themselves: identical, and they are the data's.
  for key in ('pixel_mean', 'pixel_std', 'black_fraction', 'white_fraction'):
    assert metrics[key] == pytest.approx(floor['pixels'][key], abs=1e-5)
  assert metrics['black_fraction'] == pytest.approx(float(np.mean(real == 0)), abs=1e-5)
  # The samples' accuracy is the classifier's accuracy on the real images: the same number.
  assert metrics['accuracy'] == pytest.approx(floor['accuracy'], abs=1e-6)
  counts = np.bincount(labels, minlength=10)
  assert np.dot(metrics['accuracy_per_class'], counts) / counts.sum() == pytest.approx(
      metrics['accuracy'], abs=1e-3)  # per-class accuracies, rounded to 4 digits
  assert floor['accuracy'] > 0.4  # nearest centroid on pixels is well above chance (0.1)
  shuffled = evaluator.measure(real, np.random.default_rng(1).permutation(labels))
  assert shuffled['accuracy'] < floor['accuracy'] - 0.2
  assert shuffled['fd'] < 1e-6  # FD ignores the labels; per-class FD does not
  assert max(shuffled['fd_per_class']) > 10 * max(1e-9, max(metrics['fd_per_class']))


def test_reference_is_cached_and_checked(trained, network, tmp_path):
  _, eval_set, sampler, _ = trained
  config = _config()
  calls = network.calls
  evaluate.Evaluator(config, str(tmp_path), sampler, network, eval_set)
  first = network.calls - calls
  assert first > 1  # the fingerprint probe + the reference images
  evaluate.Evaluator(config, str(tmp_path), sampler, network, eval_set)
  assert network.calls - calls == first + 1  # second time: only the probe; loaded from eval/
  path = os.path.join(tmp_path, 'eval', f'reference_test_pixels_{NUM_REAL}.npz')
  assert os.path.exists(path)
  other = PixelFeatures(name='inception_v3')
  other.centroids = network.centroids
  config = _config(reference_path=path)
  with pytest.raises(evaluation.ReferenceMismatchError, match='feature_network'):
    evaluate.reference_features(config, other, eval_set, str(tmp_path), NUM_REAL)
  # Same name, other weights (a retrained classifier): the fingerprint differs.
  retrained = PixelFeatures()
  retrained.projection, retrained.centroids = retrained.projection * 1.5, network.centroids
  with pytest.raises(evaluation.ReferenceMismatchError, match='feature_fingerprint'):
    evaluate.reference_features(config, retrained, eval_set, str(tmp_path), NUM_REAL)


def _count_model_rows(sampler, monkeypatch):
  """Patches the sampler's model to record the rows of every evaluation it runs."""
  rows = []
  original = sampler.builder.merge

  def counting_merge(params):
    model = original(params)

    def model_fn(x, t, y):
      jax.debug.callback(lambda times: rows.append(len(times)), t)
      return model(x, t, y)

    return model_fn

  monkeypatch.setattr(sampler.builder, 'merge', counting_merge)
  monkeypatch.setattr(sampler, '_compiled', {})  # compile afresh with the counting model
  return rows


def test_guidance_and_steps_sweeps_write_tables_figures_and_grid(trained, network, tmp_path,
                                                                 monkeypatch):
  _, eval_set, sampler, _ = trained
  config = _config(guidance_scales=(1.0, 3.0), num_steps=(1, 2), methods=('euler', 'heun'))
  train_set = input_pipeline.create_dataset(config.input, 'train')
  rows = _count_model_rows(sampler, monkeypatch)
  result = evaluate.run(config, str(tmp_path), sampler, network, eval_set, train_set)
  jax.effects_barrier()
  out = os.path.join(tmp_path, 'eval')

  sweep = result['guidance_sweep']
  assert [r['guidance_scale'] for r in sweep] == [1.0, 3.0]
  for r in sweep:
    assert r['num_samples'] == 20 and r['method'] == config.sampling.method
    assert 0 <= r['precision'] <= 1 and 0 <= r['recall'] <= 1 and np.isfinite(r['fd'])
    assert len(r['fd_per_class']) == 10
  assert json.load(open(os.path.join(out, 'guidance_sweep.json'))) == sweep
  table = open(os.path.join(out, 'guidance_sweep.md')).read().splitlines()
  # Header, rule, one row per w and the same-N real-data row.
  assert table[0].startswith('| w |') and len(table) == 2 + len(sweep) + 1
  assert table[-1].startswith('| real train images |')
  figure = Image.open(os.path.join(out, 'guidance_sweep.png'))
  assert figure.size[0] > 400 and figure.size[1] > 200
  grid = np.asarray(Image.open(os.path.join(out, 'guidance_grid.png')))
  assert grid.shape[:2] == (2 * (10 * (28 + 1) + 1), 2 * (2 * (28 + 1) + 1))  # 10 rows, 2 w

  # Steps sweep at w = 2: NFE counts the CFG doubling (Euler 2N, Heun 2(2N − 1)).
  nfe = {(r['method'], r['num_steps']): r['nfe'] for r in result['steps_sweep']}
  assert nfe == {('euler', 1): 2, ('euler', 2): 4, ('heun', 1): 2, ('heun', 2): 6}
  # The guidance sweep's w = 1 runs the single batch (Heun 2 steps: 3 evaluations), w = 3 the
  # doubled one; every row's NFE is what the model was run on (one batch of 20 per row).
  assert [r['nfe'] for r in sweep] == [3, 6]
  assert sum(rows) == sum(r['nfe'] * r['num_samples'] for r in sweep + result['steps_sweep'])
  assert os.path.exists(os.path.join(out, 'steps_sweep.png'))
  assert json.load(open(os.path.join(out, 'evaluate.json')))['step'] == 2
  floor = result['real_data']
  assert floor['num_train_images'] == NUM_REAL and floor['fd'] > 0
  # The same-N floor: as many real training images as samples per w, measured as samples.
  same_n = floor['same_n']
  assert same_n['num_samples'] == sweep[0]['num_samples']
  assert same_n['fd'] > 0 and 0.0 <= same_n['black_fraction'] <= 1.0
  # Every metric of the samples is in the floor too (the worst class needs >= 4 samples per
  # class, which 2 per class do not reach: the floor's 20 unbalanced real images may).
  worst = {'worst_class', 'worst_class_fd', 'worst_class_fd_ratio', 'mean_class_fd'}
  assert set(sweep[0]) >= set(same_n) - {'num_samples'} - worst
  assert set(same_n['sharpness']) == set(sweep[0]['sharpness']) == {'high_frequency_share',
                                                                   'edge_gradient'}
  assert 'kid' in sweep[0] and 'kid_se' in same_n
  assert os.path.exists(os.path.join(out, 'feature_spaces.md'))


def test_bad_eval_config_is_refused():
  config = _config(methods=('rk4',))
  with pytest.raises(errors.ConfigError, match='eval.methods'):
    registry.validate(config)
  config = _config(num_steps=(0,))
  with pytest.raises(errors.ConfigError, match='eval.num_steps'):
    registry.validate(config)
  config = _config()
  config.input.space = 'latents'  # latents without an autoencoder to decode them
  with pytest.raises(errors.ConfigError, match='exactly one autoencoder'):
    registry.validate(config)


def test_periodic_sample_metrics_reach_tensorboard(network, tmp_path, monkeypatch):
  logged = {}

  class RecordingWriter:
    def __init__(self, logdir):
      del logdir

    def scalars(self, step, values):
      logged.setdefault(step, {}).update(values)

    def image(self, step, name, image):
      pass

    def close(self):
      pass

  monkeypatch.setattr(run_context, 'Writer', RecordingWriter)
  config = _config()
  config.train.num_steps = 2
  config.eval.every_steps = 1
  config.eval.periodic_samples_per_class = 2
  train.train_and_evaluate(config, str(tmp_path))
  for step in (1, 2):
    assert {'eval/loss_ema', 'eval/fd', 'eval/precision', 'eval/recall',
            'eval/accuracy', 'eval/black_fraction'} <= set(logged[step]), logged[step]
    assert np.isfinite(logged[step]['eval/fd'])


def test_periodic_eval_without_feature_network_keeps_training(tmp_path, monkeypatch):
  config = _config(classifier_workdir=str(tmp_path / 'no_classifier'))
  config.train.num_steps = 2
  config.eval.every_steps = 1
  state, _ = train.train_and_evaluate(config, str(tmp_path / 'run'))  # warns once, trains on
  assert int(state['step']) == 2


def test_float_dataset_round_trips_with_one_convention(trained, network, tmp_path):
  """A dataset of float images in [−1, 1] (what latents look like): the train batch is those
  floats, the reference images and features are those of the uint8 images they came from, and
  samples (uint8 files) and data share the mapping."""
  _, eval_set, sampler, _ = trained
  uint8 = eval_set.get_batch(np.arange(NUM_REAL))
  floats = input_pipeline.ArrayDataset(images_lib.to_model(uint8['image']), uint8['label'],
                                       num_classes=10, name='float', split='test')
  assert float(floats.images.min()) == -1.0 and float(floats.images.max()) == 1.0
  batch = input_pipeline.BatchIterator(floats, global_batch_size=8, seed=0).host_batch(0)
  indices = input_pipeline.BatchIterator(floats, global_batch_size=8, seed=0).global_indices(0)
  np.testing.assert_array_equal(batch['image'], floats.images[indices])  # no second scaling
  real, _ = evaluate._real_images(floats, NUM_REAL)  # pylint: disable=protected-access
  np.testing.assert_array_equal(real, uint8['image'])
  config = _config()
  from_floats = evaluate.reference_features(config, network, floats, str(tmp_path), NUM_REAL)
  from_uint8 = evaluate.reference_features(config, network, eval_set, str(tmp_path / 'u'),
                                           NUM_REAL)
  np.testing.assert_array_equal(from_floats['features'], from_uint8['features'])
  key = jax.random.fold_in(jax.random.PRNGKey(0), 0)  # sample_images' key of its batch 0
  samples, _ = sampler.sample(key, np.arange(4, dtype=np.int32), 1.0)
  files = sampler.sample_images(jax.random.PRNGKey(0), np.arange(4, dtype=np.int32), 1.0,
                                batch_size=4)[0]
  np.testing.assert_array_equal(files, images_lib.to_uint8(np.asarray(samples)))
  np.testing.assert_array_equal(images_lib.to_uint8(images_lib.to_model(real)), real)


def test_sweep_tables_say_which_method_reads_w():
  """A CFG++ row's w is λ: the table names the method beside it; plain CFG rows keep w alone."""
  cfg_pp = evaluate.markdown_table([
      {'guidance_scale': 0.4, 'guidance_method': 'cfg_pp', 'guidance': 'cfg', 'fd': 4.29}])
  assert cfg_pp.splitlines()[0] == '| w | w of | guidance | FD |'
  assert cfg_pp.splitlines()[2] == '| 0.4 | cfg_pp | cfg | 4.29 |'
  cfg = evaluate.markdown_table([{'guidance_scale': 1.5, 'guidance': 'cfg', 'fd': 6.43}])
  assert cfg.splitlines()[0] == '| w | guidance | FD |'
