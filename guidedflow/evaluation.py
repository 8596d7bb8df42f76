"""Sample-quality metrics on features: Fréchet and kernel distance, precision/recall, density/coverage.

Features are arrays `(N, D)` produced by a `FeatureNetwork` (implemented elsewhere: the
Fashion-MNIST classifier, Inception-v3). Nearest-neighbour metrics compare every pair of points,
so they run block by block under one `jax.jit` per block shape: memory is `O(block_size²)`
whatever `N` is, and the last block is padded (and masked) instead of compiled for its size.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Protocol

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import atomic
from guidedflow import errors


class FeatureNetwork(Protocol):
  """What the metrics need from a feature network.

  Attributes:
    name: identifies the network in reference-statistics metadata (e.g. 'inception_v3').

  Calling it on uint8 NHWC images `(N, H, W, C)` returns
  `dict(features=float32 (N, D), logits=float32 (N, K) or None)`.
  """

  name: str

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
    ...


def compute_features(network: FeatureNetwork, images: np.ndarray) -> dict[str, np.ndarray | None]:
  """Features (and logits) of non-empty uint8 NHWC `images`; the network batches them itself.

  Returns:
    `dict(features=float32 (N, D), logits=float32 (N, K) or None)`, in the order of `images`.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
    raise ValueError(f'expected non-empty uint8 NHWC images, got {images.dtype} {images.shape}')
  out = network(images)
  logits = out.get('logits')
  return dict(features=np.asarray(out['features'], np.float32),
              logits=None if logits is None else np.asarray(logits, np.float32))


# ---------------------------------------------------------------------------------------------
# Fréchet distance.
#
# Statistics and the D×D linear algebra run in float64 like pytorch-fid (float32 loses several
# digits of FD for Inception's D = 2048). `jax.enable_x64(True)` is a thread-local, scoped switch
# on both supported jax versions (0.10 and 0.12); jit caches key on it, so the float32 code
# elsewhere is unaffected.


@jax.jit
def _moments(features):
  mu = jnp.mean(features, axis=0)
  centered = features - mu
  sigma = jnp.matmul(centered.T, centered, precision='highest') / (features.shape[0] - 1)
  return mu, sigma


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(mu (D,), sigma (D, D))` in float64; unbiased covariance (ddof=1) like np.cov."""
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'need features of shape (N >= 2, D), got {features.shape}')
  with jax.enable_x64(True):
    mu, sigma = _moments(jnp.asarray(features, jnp.float64))
    return np.asarray(mu), np.asarray(sigma)


@jax.jit
def _frechet(mu1, sigma1, mu2, sigma2):
  # Symmetrise: covariances from data are symmetric only up to rounding, and eigh assumes it.
  sigma1 = (sigma1 + sigma1.T) / 2
  sigma2 = (sigma2 + sigma2.T) / 2
  eigenvalues, eigenvectors = jnp.linalg.eigh(sigma1)
  # PSD matrices have eigenvalues >= 0; rounding makes tiny negative ones for rank-deficient
  # covariances (N < D), and their square roots would be NaN.
  sqrt_sigma1 = (eigenvectors * jnp.sqrt(jnp.clip(eigenvalues, 0))) @ eigenvectors.T
  inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  inner_eigenvalues = jnp.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = jnp.sum(jnp.sqrt(jnp.clip(inner_eigenvalues, 0)))
  diff = mu1 - mu2
  return diff @ diff + jnp.trace(sigma1) + jnp.trace(sigma2) - 2 * trace_sqrt


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  `‖mu1 − mu2‖² + tr(S1 + S2 − 2 (S1^½ S2 S1^½)^½)`. This equals pytorch-fid's
  `tr(S1 + S2 − 2 sqrtm(S1 S2))`: `S1 S2` and `S1^½ S2 S1^½` have the same eigenvalues, so the
  traces of their square roots agree. The symmetric PSD form needs only `eigh`, which is stable
  where `sqrtm` of the non-symmetric product is not (near-singular covariances), and needs no
  "discard the imaginary part" fix-up.

  Returns:
    The distance as a Python float (>= 0; rounding below zero is clipped).
  """
  with jax.enable_x64(True):
    value = _frechet(*(jnp.asarray(a, jnp.float64) for a in (mu1, sigma1, mu2, sigma2)))
    return max(float(value), 0.0)


def fid_from_features(real, fake) -> float:
  """Fréchet distance between the Gaussians fitted to two feature sets."""
  return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


# ---------------------------------------------------------------------------------------------
# Kernel distance (KID, Bińkowski et al. 2018): the unbiased estimate of the squared MMD with the
# cubic polynomial kernel k(a, b) = (a·b / D + 1)³. Unlike FD its expectation does not depend on
# the number of samples, so values measured at different N compare directly; a matched set has
# expected value 0 (single estimates scatter around it and can be negative).


@jax.jit
def _mmd2_unbiased(x, y):
  d = x.shape[1]
  k_xx = (jnp.matmul(x, x.T, precision='highest') / d + 1) ** 3
  k_yy = (jnp.matmul(y, y.T, precision='highest') / d + 1) ** 3
  k_xy = (jnp.matmul(x, y.T, precision='highest') / d + 1) ** 3
  m, n = x.shape[0], y.shape[0]
  return ((jnp.sum(k_xx) - jnp.trace(k_xx)) / (m * (m - 1))
          + (jnp.sum(k_yy) - jnp.trace(k_yy)) / (n * (n - 1))
          - 2 * jnp.mean(k_xy))


def kernel_distance(real_features, fake_features, *, subset_size: int = 1000,
                    seed: int = 0) -> dict[str, float]:
  """KID of two feature sets, with its standard error.

  Both sets are shuffled (fixed `seed`) and cut into disjoint subsets of `subset_size` (less
  when a set is small: each set gives at least 2 subsets); the unbiased MMD² of the i-th real
  and i-th fake subset is an independent, unbiased estimate, so their mean is the KID and their
  standard deviation / √(number of subsets) its standard error. Disjoint subsets, unlike the
  overlapping ones of torch-fidelity and clean-fid, make that error honest.

  Returns:
    `dict(kid=..., kid_se=..., kid_subsets=count, kid_subset_size=size)`.
  """
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'need (N, D) and (M, D) features, got {real.shape} and {fake.shape}')
  smaller = min(len(real), len(fake))
  if smaller < 4:
    raise ValueError(f'KID needs at least 4 points per set, got {len(real)} and {len(fake)}')
  size = int(min(subset_size, smaller // 2))
  count = smaller // size
  rng = np.random.default_rng(seed)
  real = real[rng.permutation(len(real))[:count * size]].reshape(count, size, -1)
  fake = fake[rng.permutation(len(fake))[:count * size]].reshape(count, size, -1)
  with jax.enable_x64(True):
    values = np.array([float(_mmd2_unbiased(jnp.asarray(r), jnp.asarray(f)))
                       for r, f in zip(real, fake)])
  return {'kid': float(values.mean()), 'kid_se': float(values.std(ddof=1) / np.sqrt(count)),
          'kid_subsets': int(count), 'kid_subset_size': size}


# ---------------------------------------------------------------------------------------------
# k-nearest-neighbour metrics. Distances are squared Euclidean throughout (monotone in the
# distance, so every comparison gives the same answer without a sqrt).


@functools.partial(jax.jit, static_argnames=('num_neighbours',))
def _block_pass(rows, cols, row_valid, col_valid, row_sq_radii, col_sq_radii, knn, *,
                num_neighbours):
  """Everything the metrics need from one (row block, column block) pair.

  One function serves every pass so that a pair of points gets bitwise the same distance in the
  radius pass and in the comparison passes (one compiled program, same inputs): otherwise a
  point sitting exactly on a ball's boundary — e.g. identical real and fake sets — could flip.
  """
  # ‖a‖² + ‖b‖² − 2 a·b; 'highest' keeps GPUs/TPUs from computing a·b in TF32/bf16.
  sq = (jnp.sum(rows * rows, axis=1)[:, None] + jnp.sum(cols * cols, axis=1)[None, :]
        - 2 * jnp.matmul(rows, cols.T, precision='highest'))
  sq = jnp.maximum(sq, 0.0)  # (B, C); cancellation can dip just below zero.
  pair_valid = row_valid[:, None] & col_valid[None, :]
  # Running (k+1) smallest distances per row; the smallest is the point itself (distance 0).
  candidates = jnp.concatenate([knn, jnp.where(col_valid[None, :], sq, jnp.inf)], axis=1)
  knn = -jax.lax.top_k(-candidates, num_neighbours + 1)[0]
  in_col_ball = pair_valid & (sq <= col_sq_radii[None, :])
  in_col_ball_open = pair_valid & (sq < col_sq_radii[None, :])
  in_row_ball = pair_valid & (sq <= row_sq_radii[:, None])
  return dict(knn=knn,
              rows_in_col_balls=jnp.sum(in_col_ball, axis=1),
              rows_in_col_balls_open=jnp.sum(in_col_ball_open, axis=1),
              cols_in_row_balls=jnp.sum(in_row_ball, axis=0),
              col_min=jnp.min(jnp.where(pair_valid, sq, jnp.inf), axis=0))


def _blocks(values, block_size):
  """Splits `values` (N, ...) into device blocks of `block_size` rows, zero-padding the last."""
  num = len(values)
  padded = np.zeros((-(-num // block_size) * block_size,) + values.shape[1:], values.dtype)
  padded[:num] = values
  return [jnp.asarray(padded[i:i + block_size]) for i in range(0, len(padded), block_size)]


def _all_pairs(rows, cols, row_sq_radii, col_sq_radii, *, k, block_size):
  """Runs `_block_pass` over all block pairs; returns per-row and per-column results (numpy)."""
  row_blocks, col_blocks = _blocks(rows, block_size), _blocks(cols, block_size)
  row_valid = _blocks(np.ones(len(rows), bool), block_size)
  col_valid = _blocks(np.ones(len(cols), bool), block_size)
  row_radii = _blocks(row_sq_radii.astype(np.float32), block_size)
  col_radii = _blocks(col_sq_radii.astype(np.float32), block_size)
  per_row = {'knn': [], 'rows_in_col_balls': [], 'rows_in_col_balls_open': []}
  col_min = [jnp.full((block_size,), jnp.inf) for _ in col_blocks]
  cols_in_row_balls = [jnp.zeros((block_size,), jnp.int32) for _ in col_blocks]
  for i, row_block in enumerate(row_blocks):
    knn = jnp.full((block_size, k + 1), jnp.inf, jnp.float32)
    counts = counts_open = 0
    for j, col_block in enumerate(col_blocks):
      out = _block_pass(row_block, col_block, row_valid[i], col_valid[j], row_radii[i],
                        col_radii[j], knn, num_neighbours=k)
      knn = out['knn']
      counts = counts + out['rows_in_col_balls']
      counts_open = counts_open + out['rows_in_col_balls_open']
      cols_in_row_balls[j] = cols_in_row_balls[j] + out['cols_in_row_balls']
      col_min[j] = jnp.minimum(col_min[j], out['col_min'])
    per_row['knn'].append(knn)
    per_row['rows_in_col_balls'].append(counts)
    per_row['rows_in_col_balls_open'].append(counts_open)
  result = {name: np.concatenate(parts)[:len(rows)] for name, parts in per_row.items()}
  result['cols_in_row_balls'] = np.concatenate(cols_in_row_balls)[:len(cols)]
  result['col_min'] = np.concatenate(col_min)[:len(cols)]
  return result


def _prepare(real_features, fake_features, k):
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'need (N, D) and (M, D) features, got {real.shape} and {fake.shape}')
  if min(len(real), len(fake)) <= k:
    raise ValueError(f'k={k} nearest neighbours need more than {k} points per set, got '
                     f'{len(real)} real and {len(fake)} fake')
  # Translation doesn't change distances, but centring shrinks ‖a‖² + ‖b‖² and with it the
  # float32 cancellation error in ‖a‖² + ‖b‖² − 2 a·b (Inception features are far from 0).
  center = real.mean(axis=0)
  return (real - center).astype(np.float32), (fake - center).astype(np.float32)


def _sq_radii(points, k, block_size):
  """Squared distance from each point to its k-th nearest neighbour in its own set (not itself)."""
  zeros = np.zeros(len(points), np.float32)
  return _all_pairs(points, points, zeros, zeros, k=k, block_size=block_size)['knn'][:, k]


def precision_recall(real_features, fake_features, *, k: int = 3,
                     block_size: int = 1024) -> dict[str, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  Each set's manifold is the union of closed balls around its points, with radius the distance
  to the point's k-th nearest neighbour in the same set. Precision is the fraction of fake points
  inside the real manifold; recall the fraction of real points inside the fake manifold. Same
  conventions as the authors' and StyleGAN2-ADA's code (k-th neighbour excludes the point
  itself, `distance <= radius`).
  """
  real, fake = _prepare(real_features, fake_features, k)
  real_radii = _sq_radii(real, k, block_size)
  fake_radii = _sq_radii(fake, k, block_size)
  out = _all_pairs(fake, real, fake_radii, real_radii, k=k, block_size=block_size)
  return dict(precision=float(np.mean(out['rows_in_col_balls'] > 0)),
              recall=float(np.mean(out['cols_in_row_balls'] > 0)))


def density_coverage(real_features, fake_features, *, k: int = 5,
                     block_size: int = 1024) -> dict[str, float]:
  """Density and coverage (Naeem et al. 2020), with the conventions of their `prdc` package.

  Density: mean over fake points of how many real k-NN balls contain them, divided by k
  (≈ 1 when fake and real follow the same distribution, > 1 when fakes crowd around real modes).
  Coverage: fraction of real points whose k-NN ball contains at least one fake point. Balls are
  open (`distance < radius`), as in `prdc`.
  """
  real, fake = _prepare(real_features, fake_features, k)
  real_radii = _sq_radii(real, k, block_size)
  unused = np.zeros(len(fake), np.float32)
  out = _all_pairs(fake, real, unused, real_radii, k=k, block_size=block_size)
  return dict(density=float(np.sum(out['rows_in_col_balls_open']) / (k * len(fake))),
              coverage=float(np.mean(out['col_min'] < real_radii)))


# ---------------------------------------------------------------------------------------------
# Classification accuracy of generated images under the feature network's classifier head.


def _predictions(logits_or_predictions) -> np.ndarray:
  values = np.asarray(logits_or_predictions)
  return values.argmax(axis=-1) if values.ndim == 2 else values.astype(np.int64)


def classification_accuracy(logits, labels) -> float:
  """Fraction of `labels` matched; `logits` is (N, K) logits or (N,) integer predictions."""
  return float(np.mean(_predictions(logits) == np.asarray(labels)))


def per_class_accuracy(logits, labels, num_classes: int) -> np.ndarray:
  """Accuracy for each class (float64 (num_classes,)); NaN for classes with no examples."""
  labels = np.asarray(labels).astype(np.int64)
  correct = np.bincount(labels, weights=_predictions(logits) == labels, minlength=num_classes)
  total = np.bincount(labels, minlength=num_classes)
  with np.errstate(invalid='ignore', divide='ignore'):
    return correct / total


# ---------------------------------------------------------------------------------------------
# Reference statistics cache: real-data features are computed once and reused by every run.


def pixel_statistics(images: np.ndarray) -> dict[str, float]:
  """What a user sees before any feature metric: pixel mean and std (in [0, 1]) of uint8
  `images`, and the fraction of values that are exactly 0 (black) and exactly 255 (white).

  Counted per value (per channel for colour images). Real Fashion-MNIST is about half exactly
  black; samples with residual noise in the background are not, whatever their FD says.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f'pixel_statistics takes uint8 images, got {images.dtype}.')
  if images.size == 0:
    raise ValueError('pixel_statistics got no images.')
  values = images.astype(np.float64) / 255.0
  return {'pixel_mean': float(values.mean()), 'pixel_std': float(values.std()),
          'black_fraction': float(np.mean(images == 0)),
          'white_fraction': float(np.mean(images == 255))}


class ReferenceMismatchError(errors.UserError, ValueError):
  """The cached reference statistics were computed for another dataset, split or network."""


def save_reference(path: str, *, features, logits=None, labels=None,
                   meta: Mapping[str, Any]) -> None:
  """Writes mu, sigma, features (float32), optional logits/labels and JSON `meta` to an .npz.

  `meta` should name the dataset, split and feature network; `num_images` is added from the
  features. The file is written under a temporary name and renamed, so an interrupted run
  never leaves a truncated cache behind.
  """
  features = np.asarray(features, np.float32)
  mu, sigma = feature_statistics(features)
  meta = {**meta, 'num_images': int(len(features))}
  arrays = dict(mu=mu, sigma=sigma, features=features, meta=np.array(json.dumps(meta)))
  if logits is not None:
    arrays['logits'] = np.asarray(logits, np.float32)
  if labels is not None:
    arrays['labels'] = np.asarray(labels, np.int32)
  with atomic.open_write(path) as f:  # local or gs://; readers never see a half-written file
    np.savez(f, **arrays)


def load_reference(path: str, *, expect_meta: Mapping[str, Any]) -> dict[str, Any]:
  """Loads `save_reference`'s file; checks that `meta` agrees with `expect_meta` on its keys.

  Returns:
    dict with `mu`, `sigma`, `features`, `meta` and, where saved, `logits` and `labels`.

  Raises:
    FileNotFoundError: nothing at `path` (the caller computes and saves the statistics).
    ReferenceMismatchError: the file was made for other data, naming the fields that differ.
  """
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'no reference statistics at {path}')
  fix = ('delete the file or point eval.reference_path elsewhere — it is recomputed on the '
         'next evaluate run')
  with epath.Path(path).open('rb') as f, np.load(f) as data:
    loaded = {name: data[name] for name in data.files}
  if 'meta' not in loaded:
    raise ReferenceMismatchError(f'{path} is not a reference-statistics file (no meta); {fix}')
  meta = json.loads(str(loaded.pop('meta')))
  # JSON round trip so that e.g. tuples in `expect_meta` compare equal to the stored lists.
  expected = json.loads(json.dumps(dict(expect_meta)))
  differing = [key for key in expected if meta.get(key, '<missing>') != expected[key]]
  if differing:
    found = ', '.join(f'{key}={meta.get(key, "<missing>")!r}' for key in differing)
    wanted = ', '.join(f'{key}={expected[key]!r}' for key in differing)
    raise ReferenceMismatchError(
        f'reference statistics in {path} were computed for {found}, expected {wanted}; {fix}')
  return dict(loaded, meta=meta)
