"""Tests for guidedflow.evaluation: Fréchet distance, k-NN metrics, accuracy, reference cache."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from guidedflow import evaluation
from guidedflow import feature_networks
from guidedflow import images as images_lib


def _random_covariance(rng, dim, scale=1.0):
  factor = rng.normal(size=(dim, dim)) * scale
  return factor @ factor.T + 0.1 * np.eye(dim)


def _rotated_covariance(rng, eigenvalues):
  rotation, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
  return (rotation * eigenvalues) @ rotation.T


def _pytorch_fid_trace_sqrt(sigma1, sigma2):
  """pytorch-fid's term: tr sqrtm(S1 S2) via scipy's general (non-symmetric) sqrtm."""
  return np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real


def _mixture(rng, modes, per_mode, dim=2, separation=20.0):
  """Equal numbers of points from unit Gaussians at well-separated corners of a square."""
  corners = separation * np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float64)
  centers = np.zeros((4, dim))
  centers[:, :2] = corners
  return np.concatenate([centers[m] + rng.normal(size=(per_mode, dim)) for m in modes])


# ----- Fréchet distance ------------------------------------------------------------------------


def test_feature_statistics_match_numpy_float64_unbiased():
  features = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32) * 3 + 5
  mu, sigma = evaluation.feature_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, np.mean(features.astype(np.float64), axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10)  # ddof=1


def test_identical_sets_have_zero_distance():
  features = np.random.default_rng(1).normal(size=(500, 16)) * 4 + 2
  mu, sigma = evaluation.feature_statistics(features)
  scale = np.trace(sigma)
  assert abs(evaluation.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * scale
  assert abs(evaluation.fid_from_features(features, features)) < 1e-9 * scale


def test_diagonal_covariances_match_closed_form():
  rng = np.random.default_rng(2)
  dim = 10
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  var1, var2 = rng.uniform(0.1, 4, dim), rng.uniform(0.1, 4, dim)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(var1) - np.sqrt(var2))**2)
  actual = evaluation.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  np.testing.assert_allclose(actual, expected, rtol=1e-8)


def test_non_commuting_covariances_match_pytorch_fid_formula():
  rng = np.random.default_rng(0)
  dim = 8
  # Anisotropic covariances with unrelated eigenbases: far from commuting.
  eigenvalues = np.geomspace(0.01, 100, dim)
  sigma1 = _rotated_covariance(rng, eigenvalues)
  sigma2 = _rotated_covariance(rng, eigenvalues[::-1])
  assert np.abs(sigma1 @ sigma2 - sigma2 @ sigma1).max() > 10.0
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  trace_sqrt = _pytorch_fid_trace_sqrt(sigma1, sigma2)
  expected = np.sum((mu1 - mu2)**2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
  actual = evaluation.frechet_distance(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(actual, expected, rtol=1e-8)
  # The case tells right from wrong: shortcuts that are exact only for commuting covariances
  # (elementwise sqrt of S1 S2, or S1^1/2 S2^1/2) are far from the truth here.
  base = expected + 2 * trace_sqrt
  wrong_elementwise = base - 2 * np.sum(np.sqrt(np.abs(sigma1 @ sigma2)))
  wrong_product = base - 2 * np.trace(scipy.linalg.sqrtm(sigma1) @ scipy.linalg.sqrtm(sigma2))
  for wrong in (wrong_elementwise, wrong_product.real):
    assert abs(wrong - expected) > 0.2 * expected


def test_distance_from_samples_approaches_closed_form():
  rng = np.random.default_rng(4)
  dim, num = 4, 50_000
  sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim, scale=0.5)
  mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
  expected = (np.sum((mu1 - mu2)**2) + np.trace(sigma1) + np.trace(sigma2)
              - 2 * _pytorch_fid_trace_sqrt(sigma1, sigma2))
  real = rng.multivariate_normal(mu1, sigma1, size=num)
  fake = rng.multivariate_normal(mu2, sigma2, size=num)
  # Sampling error of the plug-in estimate at N = 50k is < 1% of this FD (seeds 0-9 measured
  # at most 0.75%); 3% leaves margin while still catching formula errors.
  np.testing.assert_allclose(evaluation.fid_from_features(real, fake), expected, rtol=0.03)


def test_rank_deficient_covariances_give_finite_non_negative_distance():
  rng = np.random.default_rng(5)
  few_a = rng.normal(size=(10, 32))  # N < D: covariance rank 9 of 32
  few_b = rng.normal(size=(10, 32)) + 0.1
  many = rng.normal(size=(2000, 32))
  for real, fake in [(few_a, few_b), (few_a, many), (many, few_b)]:
    value = evaluation.fid_from_features(real, fake)
    assert np.isfinite(value) and value >= 0
  mu, sigma = evaluation.feature_statistics(few_a)
  assert evaluation.frechet_distance(mu, sigma, mu, sigma) < 1e-8 * np.trace(sigma)


# ----- precision / recall / density / coverage -------------------------------------------------


def _reference_prdc(real, fake, k):
  """Brute-force numpy float64 versions of the reference implementations (the papers' code)."""
  def sq_distances(a, b):
    return np.sum((a[:, None, :] - b[None, :, :])**2, axis=-1)
  real_radii = np.sort(sq_distances(real, real), axis=1)[:, k]
  fake_radii = np.sort(sq_distances(fake, fake), axis=1)[:, k]
  real_fake = sq_distances(real, fake)  # (N, M)
  return dict(precision=np.mean((real_fake <= real_radii[:, None]).any(axis=0)),
              recall=np.mean((real_fake <= fake_radii[None, :]).any(axis=1)),
              density=np.sum(real_fake < real_radii[:, None]) / (k * len(fake)),
              coverage=np.mean(real_fake.min(axis=1) < real_radii))


def test_knn_metrics_match_brute_force_reference():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(300, 8))
  fake = 1.2 * rng.normal(size=(250, 8)) + 0.3
  for k in (3, 5):
    expected = _reference_prdc(real, fake, k)
    actual = {**evaluation.precision_recall(real, fake, k=k, block_size=64),
              **evaluation.density_coverage(real, fake, k=k, block_size=64)}
    for name, value in expected.items():
      assert actual[name] == pytest.approx(value, abs=1e-12), (name, k)


def test_identical_sets_have_full_precision_recall_coverage():
  features = np.random.default_rng(7).normal(size=(400, 16)) * 10 + 100
  pr = evaluation.precision_recall(features, features, block_size=128)
  dc = evaluation.density_coverage(features, features, block_size=128)
  assert pr == dict(precision=1.0, recall=1.0)
  assert dc['coverage'] == 1.0
  # Each point lies inside its own ball and its k-1 nearer neighbours' open balls, not in the
  # ball of the neighbour that defines the radius: density is exactly k/k.
  assert dc['density'] == pytest.approx(1.0)


def test_disjoint_sets_have_zero_precision_recall():
  rng = np.random.default_rng(8)
  real = rng.normal(size=(300, 8))
  fake = rng.normal(size=(300, 8)) + 50.0
  assert evaluation.precision_recall(real, fake) == dict(precision=0.0, recall=0.0)
  assert evaluation.density_coverage(real, fake) == dict(density=0.0, coverage=0.0)


def test_mode_dropping_halves_recall_and_coverage_but_not_precision():
  rng = np.random.default_rng(9)
  # 2-D modes: k-NN balls then cover a mode almost completely (same-distribution recall ~0.97),
  # which isolates the effect of the two dropped modes.
  real = _mixture(rng, modes=[0, 1, 2, 3], per_mode=500)
  fake = _mixture(rng, modes=[0, 1], per_mode=1000)
  pr = evaluation.precision_recall(real, fake, block_size=512)
  dc = evaluation.density_coverage(real, fake, block_size=512)
  # The dropped modes are 20 sigma away: at most half of the real points can be reached.
  assert 0.45 <= pr['recall'] <= 0.5
  assert 0.45 <= dc['coverage'] <= 0.5
  assert pr['precision'] >= 0.93
  assert dc['density'] == pytest.approx(1.0, abs=0.1)


def test_same_distribution_has_unit_density_and_high_coverage():
  rng = np.random.default_rng(10)
  real, fake = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8))
  dc = evaluation.density_coverage(real, fake, k=5, block_size=256)
  # E[density] = 1 (Naeem et al.); the std at N = M = 1000 is ~0.02.
  assert dc['density'] == pytest.approx(1.0, abs=0.08)
  # E[coverage] = 1 - 2^-k ≈ 0.969 for equal sample sizes (Naeem et al.).
  assert dc['coverage'] == pytest.approx(1 - 2**-5, abs=0.03)


def test_results_do_not_depend_on_block_size_and_do_not_recompile(monkeypatch):
  rng = np.random.default_rng(11)
  real = rng.normal(size=(300, 8))
  fake = 1.1 * rng.normal(size=(257, 8))
  results = {}
  for block_size in (100, 64, 1024):  # divides 300, divides neither, one padded block
    results[block_size] = {**evaluation.precision_recall(real, fake, block_size=block_size),
                           **evaluation.density_coverage(real, fake, block_size=block_size)}
  assert results[100] == results[64] == results[1024]
  # One trace per block shape: neither a repeated call nor another N compiles again.
  traced = jax.jit(chex.assert_max_traces(evaluation._block_pass.__wrapped__, n=1),
                   static_argnames=('num_neighbours',))
  monkeypatch.setattr(evaluation, '_block_pass', traced)
  for num_real in (300, 300, 211):
    evaluation.precision_recall(real[:num_real], fake, block_size=64)


def test_too_few_points_for_k_is_an_error():
  with pytest.raises(ValueError, match='more than 3 points'):
    evaluation.precision_recall(np.zeros((3, 4)), np.ones((10, 4)), k=3)


# ----- classification accuracy -----------------------------------------------------------------


def test_accuracy_perfect_and_chance():
  rng = np.random.default_rng(12)
  num_classes, num = 10, 5000
  labels = rng.integers(0, num_classes, num)
  logits = np.eye(num_classes)[labels] * 3 + rng.uniform(-1, 1, (num, num_classes))  # margin > 0
  assert evaluation.classification_accuracy(logits, labels) == 1.0
  assert evaluation.classification_accuracy(labels, labels) == 1.0  # predictions accepted
  np.testing.assert_array_equal(evaluation.per_class_accuracy(logits, labels, num_classes),
                                np.ones(num_classes))
  shuffled = rng.permutation(labels)
  # Binomial std at p = 0.1, N = 5000 is 0.0042; allow 4 std.
  assert evaluation.classification_accuracy(logits, shuffled) == pytest.approx(0.1, abs=0.017)


def test_per_class_accuracy_counts_each_class_and_marks_empty_ones():
  predictions = np.array([0, 0, 1, 1, 1, 2])
  labels = np.array([0, 1, 1, 1, 2, 2])
  accuracy = evaluation.per_class_accuracy(predictions, labels, num_classes=4)
  np.testing.assert_allclose(accuracy[:3], [1.0, 2 / 3, 0.5])
  assert np.isnan(accuracy[3])


# ----- feature extraction and reference cache --------------------------------------------------


class _MeanPixel(nnx.Module):
  """Features (m, −m) · scale of the mean pixel m; logits 2 m."""

  def __init__(self):
    self.scale = nnx.Param(jnp.ones(()))


@pytest.mark.parametrize('with_logits', [True, False])
def test_feature_network_runner_pads_compiles_once_and_concatenates(with_logits):
  """The one padded-batch runner: 1050 images in batches of 500 (the last one padded) give the
  features of each image alone, with one compile of the network."""
  images = np.random.default_rng(13).integers(0, 256, (1050, 4, 4, 1), dtype=np.uint8)

  def apply(model, x):
    mean = x.mean(axis=(1, 2, 3))
    features = jnp.stack([mean, -mean], axis=1) * model.scale[...]
    return features, (2 * mean[:, None] if with_logits else None)

  network = feature_networks.FeatureNetwork('mean', _MeanPixel(), apply,
                                            preprocess=images_lib.to_model, batch_size=500,
                                            meta={})
  out = evaluation.compute_features(network, images)
  assert network.num_traces == 1
  expected = images_lib.to_model(images).reshape(1050, -1).mean(axis=1)
  np.testing.assert_allclose(out['features'][:, 0], expected, rtol=1e-6, atol=1e-6)
  assert out['features'].shape == (1050, 2) and out['features'].dtype == np.float32
  if with_logits:
    np.testing.assert_allclose(out['logits'][:, 0], 2 * expected, rtol=1e-6, atol=1e-6)
  else:
    assert out['logits'] is None
  alone = network(images[-1:])['features']  # one image, padded to 500: the same features
  np.testing.assert_array_equal(alone[0], out['features'][-1])


def test_reference_round_trip(tmp_path):
  rng = np.random.default_rng(14)
  features = rng.normal(size=(200, 6)).astype(np.float32)
  labels = rng.integers(0, 10, 200)
  meta = dict(dataset='fashion_mnist', split='test', feature_network='fmnist_classifier')
  path = str(tmp_path / 'cache' / 'reference.npz')
  evaluation.save_reference(path, features=features, labels=labels, meta=meta)
  loaded = evaluation.load_reference(path, expect_meta=meta)
  mu, sigma = evaluation.feature_statistics(features)
  np.testing.assert_array_equal(loaded['mu'], mu)
  np.testing.assert_array_equal(loaded['sigma'], sigma)
  np.testing.assert_array_equal(loaded['features'], features)
  np.testing.assert_array_equal(loaded['labels'], labels)
  assert loaded['features'].dtype == np.float32 and 'logits' not in loaded
  assert loaded['meta'] == dict(meta, num_images=200)
  assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == ['reference.npz']


def test_reference_mismatch_and_missing_file_errors(tmp_path):
  path = str(tmp_path / 'reference.npz')
  evaluation.save_reference(path, features=np.zeros((4, 3)), logits=np.ones((4, 10)),
                            meta=dict(dataset='mnist', split='test',
                                      feature_network='inception_v3'))
  expect = dict(dataset='fashion_mnist', split='test', feature_network='fmnist_classifier')
  with pytest.raises(evaluation.ReferenceMismatchError) as error:
    evaluation.load_reference(path, expect_meta=expect)
  message = str(error.value)
  for text in (path, "dataset='mnist'", "feature_network='inception_v3'",
               "dataset='fashion_mnist'", "feature_network='fmnist_classifier'",
               'eval.reference_path'):
    assert text in message
  assert 'split' not in message  # only the differing fields are named
  assert isinstance(error.value, ValueError)
  with pytest.raises(evaluation.ReferenceMismatchError, match='num_images=4'):
    evaluation.load_reference(path, expect_meta=dict(num_images=10_000))
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    evaluation.load_reference(str(tmp_path / 'missing.npz'), expect_meta=expect)


# ---- Pixel statistics -------------------------------------------------------------------------


def test_pixel_statistics_closed_forms():
  black = np.zeros((5, 4, 4, 1), np.uint8)
  assert evaluation.pixel_statistics(black) == {
      'pixel_mean': 0.0, 'pixel_std': 0.0, 'black_fraction': 1.0, 'white_fraction': 0.0}
  # Half the values 0, half 255: mean 1/2, std 1/2, black = white = 1/2.
  half = np.concatenate([black, np.full_like(black, 255)])
  stats = evaluation.pixel_statistics(half)
  assert stats == pytest.approx({'pixel_mean': 0.5, 'pixel_std': 0.5, 'black_fraction': 0.5,
                                 'white_fraction': 0.5})
  # A background of 1 (one grey level above black) is not black: the statistic is exact.
  nearly = np.ones((3, 2, 2, 3), np.uint8)
  assert evaluation.pixel_statistics(nearly)['black_fraction'] == 0.0
  assert evaluation.pixel_statistics(nearly)['pixel_mean'] == pytest.approx(1 / 255)
  with pytest.raises(TypeError, match='uint8'):
    evaluation.pixel_statistics(half.astype(np.float32))
