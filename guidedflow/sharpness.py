"""How sharp images are, measured on the pixels: the statistics a blurry sample set fails.

Feature-space distances can forgive soft samples: a classifier needs the silhouette of a bag, not
its crisp outline. Two pixel statistics, each compared with real images of the same class
(`compare`), catch what they forgive:

* `high_frequency_share`: of each image's power spectrum (DC removed), the share at spatial
  frequencies of at least `cutoff` cycles per pixel (radius in the 2-D frequency plane; 0.5 is
  Nyquist), averaged over images. Blur moves power from high to low frequencies; residual noise
  moves it the other way, so "within x % of real" needs both directions.
* `edge_gradient`: the mean gradient magnitude (central differences, values in [0, 1] per pixel)
  on each object's edge, the pixels of the object mask (value > `threshold`) that touch the
  background or the image border, averaged over images. A soft outline spreads the same step over
  more pixels and has a smaller gradient on the edge.

Both are numpy functions of uint8 NHWC images (colour images are averaged over channels first).
"""

import numpy as np

CUTOFF = 0.25  # cycles per pixel: the upper half of the frequency band, up to Nyquist (0.5)
THRESHOLD = 0.2  # object mask: pixels brighter than this (in [0, 1]), above faint background noise
NAMES = ('high_frequency_share', 'edge_gradient')


def _gray(images):
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
    raise ValueError(f'expected non-empty uint8 NHWC images, got {images.dtype} {images.shape}')
  return images.astype(np.float64).mean(axis=-1) / 255.0  # (N, H, W)


def high_frequency_share(images, *, cutoff=CUTOFF):
  """Per image: power at frequency radius ≥ `cutoff` / all power but DC. Returns (N,)."""
  x = _gray(images)
  x = x - x.mean(axis=(1, 2), keepdims=True)  # no DC
  power = np.abs(np.fft.fft2(x)) ** 2  # (N, H, W)
  fy = np.fft.fftfreq(x.shape[1])[:, None]
  fx = np.fft.fftfreq(x.shape[2])[None, :]
  high = np.sqrt(fy ** 2 + fx ** 2) >= cutoff
  total = power.sum(axis=(1, 2))
  return np.where(total > 0, (power * high).sum(axis=(1, 2)) / np.maximum(total, 1e-30), 0.0)


def edge_gradient(images, *, threshold=THRESHOLD):
  """Per image: mean gradient magnitude on the object mask's edge pixels (NaN: no object)."""
  x = _gray(images)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode='edge')
  gy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
  gx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2
  magnitude = np.sqrt(gx ** 2 + gy ** 2)
  mask = x > threshold
  # Eroded mask: a pixel whose 4 neighbours are all inside (outside the image counts as outside).
  m = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=False)
  interior = (m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2]
              & m[:, 1:-1, 2:])
  edge = mask & ~interior
  count = edge.sum(axis=(1, 2))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(count > 0, (magnitude * edge).sum(axis=(1, 2)) / count, np.nan)


def statistics(images):
  """{name: mean over images} of both statistics."""
  return {'high_frequency_share': float(np.mean(high_frequency_share(images))),
          'edge_gradient': float(np.nanmean(edge_gradient(images)))}


def compare(images, labels, real_images, real_labels, num_classes):
  """Both statistics of `images` against `real_images`, class by class.

  Returns:
    {name: {'fake': class-balanced mean, 'real': the same of the real images, 'ratio':
    fake / real, 'ratio_per_class': [fake / real of each class] (None where a class has no
    images), 'worst_class': the class whose ratio is farthest from 1}}.
  """
  labels, real_labels = np.asarray(labels), np.asarray(real_labels)
  out = {}
  per_image = {'high_frequency_share': high_frequency_share, 'edge_gradient': edge_gradient}
  for name, fn in per_image.items():
    fake_values, real_values = fn(images), fn(real_images)
    fake_means, real_means = [], []
    for c in range(num_classes):
      f, r = fake_values[labels == c], real_values[real_labels == c]
      ok = len(f) and len(r) and np.isfinite(f).any() and np.isfinite(r).any()
      fake_means.append(float(np.nanmean(f)) if ok else None)
      real_means.append(float(np.nanmean(r)) if ok else None)
    ratios = [None if f is None else f / r for f, r in zip(fake_means, real_means)]
    present = [i for i, r in enumerate(ratios) if r is not None]
    if not present:
      raise ValueError('sharpness.compare: no class has both generated and real images.')
    fake_mean = float(np.mean([fake_means[i] for i in present]))
    real_mean = float(np.mean([real_means[i] for i in present]))
    out[name] = {'fake': round(fake_mean, 5), 'real': round(real_mean, 5),
                 'ratio': round(fake_mean / real_mean, 4),
                 'ratio_per_class': [None if r is None else round(r, 4) for r in ratios],
                 'worst_class': int(max(present, key=lambda i: abs(np.log(ratios[i]))))}
  return out
