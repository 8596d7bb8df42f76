"""More than one judge: KID, per-class numbers and the worst class, sharpness statistics, and the
two new feature spaces (a second classifier architecture, the label-free encoder)."""

import numpy as np
import pytest

from configs import fmnist_encoder
from configs import fmnist_gap_classifier
from guidedflow import evaluation
from guidedflow import feature_networks
from guidedflow import input_pipeline
from guidedflow import judges
from guidedflow import sharpness
from guidedflow import train


def _gaussian(n, d=16, shift=0.0, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)) + shift


def _mmd2_numpy(x, y):
  d = x.shape[1]
  kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
  m, n = len(x), len(y)
  return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
          - 2 * kxy.mean())


# ----------------------------------------------------------------------------- KID


def test_kid_is_the_mean_of_the_unbiased_mmd2_over_disjoint_subsets():
  real, fake = _gaussian(300, seed=1), _gaussian(250, shift=0.2, seed=2)
  out = evaluation.kernel_distance(real, fake, subset_size=100, seed=5)
  assert out['kid_subsets'] == 2 and out['kid_subset_size'] == 100
  rng = np.random.default_rng(5)  # the same shuffles as kernel_distance
  r = real[rng.permutation(300)[:200]].reshape(2, 100, -1)
  f = fake[rng.permutation(250)[:200]].reshape(2, 100, -1)
  values = [_mmd2_numpy(a, b) for a, b in zip(r, f)]
  assert out['kid'] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12)
  assert out['kid_se'] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2), rel=1e-9)


def test_kid_is_unbiased_where_fd_is_not():
  """Two sample sets of one distribution at N = 400 and N = 4,000 against the same reference:
  KID agrees within the errors; FD at the smaller N is far above FD at the larger one."""
  reference = _gaussian(4000, seed=10)
  small, large = _gaussian(400, shift=0.15, seed=11), _gaussian(4000, shift=0.15, seed=12)
  kid_small = evaluation.kernel_distance(reference, small, subset_size=200)
  kid_large = evaluation.kernel_distance(reference, large, subset_size=1000)
  error = np.hypot(kid_small['kid_se'], kid_large['kid_se'])
  assert abs(kid_small['kid'] - kid_large['kid']) < 3 * error
  assert kid_large['kid'] > 5 * kid_large['kid_se']  # the shift is seen
  fd_small = evaluation.fid_from_features(reference, small)
  fd_large = evaluation.fid_from_features(reference, large)
  assert fd_small > 1.5 * fd_large
  # Two sets of the reference's own distribution: KID consistent with 0.
  same = evaluation.kernel_distance(reference, _gaussian(600, seed=13), subset_size=200)
  assert abs(same['kid']) < 3 * same['kid_se']


# ----------------------------------------------------------------------------- per class


def test_per_class_numbers_find_the_class_that_differs():
  """Classes 0-3 are drawn from the reference's own class distributions, class 2 is shifted:
  it is the worst class in FD and KID, and the others are near their floor."""
  rng = np.random.default_rng(0)
  means = rng.normal(size=(4, 8)) * 3
  real_labels = np.repeat(np.arange(4), 300)
  real = means[real_labels] + rng.normal(size=(1200, 8))
  labels = np.repeat(np.arange(4), 200)
  fake = means[labels] + rng.normal(size=(800, 8))
  fake[labels == 2] += 1.0
  reference = {'features': real, 'labels': real_labels,
               **dict(zip(('mu', 'sigma'), evaluation.feature_statistics(real)))}
  out = judges.measure(fake, None, labels, reference, num_classes=4, nearest_k=3)
  assert out['worst_class'] == 2
  assert out['fd_per_class'][2] > 5 * max(out['fd_per_class'][c] for c in (0, 1, 3))
  assert out['kid_per_class'][2] == max(out['kid_per_class'])
  assert out['worst_class_fd_ratio'] == pytest.approx(
      out['fd_per_class'][2] / np.mean(out['fd_per_class']), rel=1e-3)
  assert 'accuracy' not in out  # no logits, no accuracy


def test_summary_table_puts_each_space_beside_its_floor():
  row = {'guidance_scale': 1.5, 'method': 'heun', 'num_steps': 10, 'fd': 10.0, 'kid': 2e-3,
         'kid_se': 1e-4, 'worst_class': 8, 'worst_class_fd': 30.0,
         'spaces': {'enc': {'fd': 40.0, 'kid': 5e-3, 'kid_se': 2e-4}}}
  floor = {'fd': 2.0, 'kid': 1e-5, 'kid_se': 1e-5, 'spaces': {'enc': {'fd': 4.0, 'kid': 0.0,
                                                                      'kid_se': 1e-5}}}
  table = judges.summary_table([row], floor, 'cls', class_names=[str(i) for i in range(10)])
  lines = table.splitlines()
  assert len(lines) == 4 and '| cls |' in lines[2] and '| enc |' in lines[3]
  assert '5.0× floor' in lines[2] and '10.0× floor' in lines[3]
  assert '8 (FD 30)' in lines[2]


# ----------------------------------------------------------------------------- sharpness


def _blur(images, sigma):
  """Gaussian blur of uint8 NHWC images (separable, reflect padding)."""
  if not sigma:
    return images
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  x = images.astype(np.float64)
  for axis in (1, 2):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode='reflect')
    x = sum(w * np.take(padded, np.arange(i, i + images.shape[axis]), axis=axis)
            for i, w in enumerate(taps))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def fmnist():
  train_images, train_labels = input_pipeline.load_fashion_mnist(None, 'train')
  test_images, test_labels = input_pipeline.load_fashion_mnist(None, 'test')
  return train_images[:1000], train_labels[:1000], test_images[:1000], test_labels[:1000]


def test_sharpness_of_real_images_matches_and_blur_lowers_it(fmnist):
  train_images, train_labels, test_images, test_labels = fmnist
  same = sharpness.compare(train_images, train_labels, test_images, test_labels, 10)
  for name in sharpness.NAMES:
    assert same[name]['ratio'] == pytest.approx(1.0, abs=0.08), (name, same[name])
  previous = {name: same[name]['ratio'] for name in sharpness.NAMES}
  for sigma in (0.7, 1.4):
    blurred = sharpness.compare(_blur(train_images, sigma), train_labels, test_images,
                                test_labels, 10)
    for name in sharpness.NAMES:
      assert blurred[name]['ratio'] < previous[name] - 0.05, (name, sigma, blurred[name])
      previous[name] = blurred[name]['ratio']
  # Noise in the background raises the high-frequency share above real.
  noisy = np.clip(train_images.astype(int) + np.random.default_rng(0).integers(
      0, 80, train_images.shape), 0, 255).astype(np.uint8)
  assert sharpness.compare(noisy, train_labels, test_images, test_labels, 10)[
      'high_frequency_share']['ratio'] > 1.2


def test_edge_gradient_of_a_constructed_step():
  """A bright square on black: the edge pixels' mean gradient is half the step (central
  differences across a one-pixel step), in any position."""
  image = np.zeros((1, 12, 12, 1), np.uint8)
  image[0, 3:9, 3:9] = 255
  assert sharpness.edge_gradient(image)[0] == pytest.approx(
      np.mean([0.5] * 16 + [np.sqrt(0.5)] * 4), rel=1e-6)  # 16 sides 0.5, 4 corners √(1/4 + 1/4)
  assert np.isnan(sharpness.edge_gradient(np.zeros((1, 8, 8, 1), np.uint8))[0])


# ----------------------------------------------------------------------------- the new spaces


@pytest.fixture(scope='module')
def spaces(tmp_path_factory):
  """Tiny versions of the two new feature networks, trained through the loop and loaded by the
  evaluation's loaders."""
  root = tmp_path_factory.mktemp('spaces')
  gap = fmnist_gap_classifier.get_config()
  gap.model.channels, gap.model.feature_dim = (8, 16), 32
  encoder = fmnist_encoder.get_config()
  encoder.model.channels, encoder.model.norm_groups = (8, 8, 8), 4
  encoder.eval.num_latent_examples = encoder.eval.num_quality_examples = 64
  encoder.eval.batch_size = 64
  for config in (gap, encoder):
    config.input.num_train_examples = 1000
    config.eval.num_examples = 256
    config.train.num_steps, config.train.batch_size = 30, 32
    config.train.log_every_steps, config.checkpoint.every_steps = 10, 30
    config.optim.warmup_steps = 5
  train.train_and_evaluate(gap, str(root / 'gap'))
  train.train_and_evaluate(encoder, str(root / 'encoder'))
  return [feature_networks.load_classifier(str(root / 'gap'), name='fmnist_gap_classifier'),
          feature_networks.load_encoder(str(root / 'encoder'))]


def test_new_spaces_load_and_see_blur_grow(spaces, fmnist):
  test_images = fmnist[2]
  gap, encoder = spaces
  assert gap.name == 'fmnist_gap_classifier' and gap.meta['arch'] == 'gap'
  assert encoder.name == 'fmnist_encoder'
  out = encoder(test_images[:3])
  assert out['features'].shape == (3, 7 * 7 * 8) and out['logits'] is None
  for network in spaces:  # a blurred copy of the real set drifts away from it as σ grows
    real = network(test_images)['features']
    fds, kids = [], []
    for sigma in (0.6, 1.2, 2.0):
      fake = network(_blur(test_images, sigma))['features']
      fds.append(evaluation.fid_from_features(real, fake))
      kids.append(evaluation.kernel_distance(real, fake, subset_size=250)['kid'])
    assert fds[0] < fds[1] < fds[2], (network.name, fds)
    assert kids[0] < kids[1] < kids[2], (network.name, kids)
