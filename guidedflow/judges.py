"""Sample quality in one feature space, and the table of every space side by side.

`--mode=evaluate` measures samples in several feature spaces (`feature_networks.names`): a
recipe tuned against one judge can win that judge and not the others. In each space, against
the real held-out images' features:

* FD (Fréchet distance) and KID (kernel distance, unbiased: compare it across N) with its
  standard error, overall and per class; the worst class and its FD over the mean class FD;
* k-NN precision/recall and density/coverage; class accuracy where the network has logits.

`summary_table` lays out, per guidance setting and space, each number beside its same-N
real-image floor (real training images measured exactly as the samples are).
"""

import numpy as np

from guidedflow import evaluation

# Per-class KID: disjoint subsets of this size (a class has N / num_classes samples).
_CLASS_KID_SUBSET = 100


def measure(features, logits, labels, reference, *, num_classes, nearest_k):
  """Metrics of generated `features` (N, D) (intended classes `labels`) in one space.

  Args:
    features, logits: the network's outputs for the samples (`logits` None: no accuracy).
    labels: int (N,) intended classes.
    reference: the real images' `features`, `mu`, `sigma` and `labels` (None: no per-class).
  """
  mu, sigma = evaluation.feature_statistics(features)
  real = reference['features']
  metrics = {'fd': evaluation.frechet_distance(mu, sigma, reference['mu'], reference['sigma'])}
  metrics.update(evaluation.kernel_distance(real, features))
  if reference.get('labels') is not None:
    metrics.update(_per_class(features, labels, real, reference['labels'], num_classes))
  # k-NN metrics compare sets of equal size: a fixed random subset of the reference.
  if len(real) > len(features):
    rng = np.random.default_rng(0)
    real = real[np.sort(rng.choice(len(real), len(features), replace=False))]
  metrics.update(evaluation.precision_recall(real, features, k=nearest_k))
  metrics.update(evaluation.density_coverage(real, features, k=nearest_k))
  if logits is not None:
    metrics['accuracy'] = evaluation.classification_accuracy(logits, labels)
    per_class = evaluation.per_class_accuracy(logits, labels, num_classes)
    metrics['accuracy_per_class'] = [None if np.isnan(a) else round(float(a), 4)
                                     for a in per_class]
  return {key: (round(float(v), 6) if isinstance(v, (float, np.floating)) else v)
          for key, v in metrics.items()}


def _per_class(features, labels, real, real_labels, num_classes):
  """FD and KID of each class against the real images of that class; the worst class by FD."""
  fds, kids = [], []
  for c in range(num_classes):
    fake_c, real_c = features[labels == c], real[real_labels == c]
    if len(fake_c) > 3 and len(real_c) > 3:
      fds.append(round(evaluation.fid_from_features(real_c, fake_c), 4))
      kids.append(round(evaluation.kernel_distance(
          real_c, fake_c, subset_size=_CLASS_KID_SUBSET)['kid'], 6))
    else:
      fds.append(None)
      kids.append(None)
  out = {'fd_per_class': fds, 'kid_per_class': kids}
  present = [c for c, fd in enumerate(fds) if fd is not None]
  if present:
    worst = max(present, key=lambda c: fds[c])
    mean = float(np.mean([fds[c] for c in present]))
    out.update(worst_class=int(worst), worst_class_fd=fds[worst],
               worst_class_fd_ratio=round(fds[worst] / mean, 4) if mean > 0 else None,
               mean_class_fd=round(mean, 4))
  return out


_COLUMNS = (('fd', 'FD'), ('kid', 'KID×1e3'), ('worst_class', 'worst class'),
            ('worst_class_fd_ratio', 'worst ÷ mean class FD'), ('precision', 'precision'),
            ('recall', 'recall'), ('coverage', 'coverage'), ('accuracy', 'accuracy'))


def _cell(key, metrics, floor):
  value = metrics.get(key)
  if value is None:
    return '–'
  if key == 'kid':
    text = f'{value * 1e3:.3g} ± {metrics["kid_se"] * 1e3:.2g}'
    if floor is not None:
      text += f' (floor {floor["kid"] * 1e3:.2g} ± {floor["kid_se"] * 1e3:.2g})'
    return text
  if key == 'fd' and floor is not None and floor.get('fd'):
    return f'{value:.4g} ({value / floor["fd"]:.1f}× floor {floor["fd"]:.3g})'
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def spaces_of(metrics, primary):
  """{space name: metrics} of one measured row: the primary space's metrics are the row's own
  (top level), the others are under 'spaces'."""
  return {primary: metrics, **metrics.get('spaces', {})}


def summary_table(rows, floor, primary, *, class_names=None):
  """Markdown: one line per (setting, space), each FD and KID beside the same-N floor.

  Args:
    rows: measured rows (with `guidance_scale` etc. and the metrics of every space).
    floor: the same-N real-image row (`real_data_floor(...)['same_n']`) or None.
    primary: the name of the primary space.
    class_names: names of the class indices (None: the indices).
  """
  floors = spaces_of(floor, primary) if floor else {}
  lines = ['| w | method, steps | space | ' + ' | '.join(t for _, t in _COLUMNS) + ' |',
           '|' + '---|' * (3 + len(_COLUMNS))]
  for row in rows:
    setting = f'{row.get("method", "")} {row.get("num_steps", "")}'.strip()
    for space, metrics in spaces_of(row, primary).items():
      cells = []
      for key, _ in _COLUMNS:
        cell = _cell(key, metrics, floors.get(space))
        if key == 'worst_class' and class_names and metrics.get(key) is not None:
          cell = f'{class_names[metrics[key]]} (FD {metrics["worst_class_fd"]:.3g})'
        cells.append(cell)
      lines.append(f'| {row.get("guidance_scale", "–")} | {setting} | {space} | '
                   + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
