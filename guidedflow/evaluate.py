"""--mode=evaluate: sample from a trained model, measure sample quality, sweep w and the steps.

The metrics themselves live in `evaluation.py`; this module runs them on a trained checkpoint:

* a feature network (`config.eval.feature_network`): the Fashion-MNIST classifier guidedflow
  trains itself (`configs/fmnist_classifier.py`) or Inception-v3 with user-provided weights;
* reference features of the real held-out split (and of `num_real_images` training images for
  the real-data floor), computed once and cached under `<workdir>/eval/`;
* samples per class from the EMA weights with the configured sampler, measured by Fréchet
  distance (FD, overall and per class), k-NN precision/recall, density/coverage and the class
  accuracy of the samples under the classifier.

`config.eval.guidance_scales` with several values runs a guidance sweep (table, figure, grid with
one column per w); `config.eval.num_steps` runs a steps sweep (quality against NFE) for each of
`config.eval.methods`. Everything lands in `<workdir>/eval/` next to the JSON printed by main.
"""

import io
import json
import os
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from guidedflow import atomic
from guidedflow import evaluation
from guidedflow import fashion_mnist
from guidedflow import feature_networks
from guidedflow import images as images_lib
from guidedflow import judges
from guidedflow import sharpness


def _real_images(dataset, num_images):
  """The first `num_images` images of a split as uint8 NHWC (deterministic), with labels."""
  num_images = min(num_images, dataset.num_examples)
  batch = dataset.get_batch(np.arange(num_images))
  return images_lib.to_uint8(batch['image']), np.asarray(batch['label'], np.int32)


def reference_features(config, network, dataset, workdir, num_images):
  """Features (+ logits, labels) of real images of `dataset`, cached in <workdir>/eval/."""
  num_images = min(num_images, dataset.num_examples)
  meta = {'dataset': config.input.dataset, 'split': dataset.split,
          'feature_network': network.name, 'num_images': int(num_images),
          'feature_fingerprint': feature_networks.fingerprint(network, dataset.image_shape)}
  path = os.path.join(workdir, 'eval', f'reference_{dataset.split}_{network.name}_'
                      f'{num_images}.npz')
  if dataset.split == config.input.eval_split and config.eval.reference_path:
    path = config.eval.reference_path
  if not epath.Path(path).exists():
    t0 = time.time()
    images, labels = _real_images(dataset, num_images)
    out = evaluation.compute_features(network, images)
    pixels = evaluation.pixel_statistics(images)
    if jax.process_index() == 0:
      evaluation.save_reference(path, features=out['features'], logits=out['logits'],
                                labels=labels, meta={**meta, 'pixels': pixels})
    logging.info('Reference features of %d %s images (%s) computed in %.1f s -> %s.',
                 num_images, dataset.split, network.name, time.time() - t0, path)
    return {'features': out['features'], 'logits': out['logits'], 'labels': labels,
            'path': path, 'pixels': pixels, **_stats(out['features'])}
  ref = evaluation.load_reference(path, expect_meta=meta)
  ref = dict(ref)
  ref['path'] = path
  # References cached before pixel statistics existed: compute them from the images.
  ref['pixels'] = (ref['meta'].get('pixels') or
                   evaluation.pixel_statistics(_real_images(dataset, num_images)[0]))
  if 'mu' not in ref:
    ref.update(_stats(ref['features']))
  return ref


def _stats(features):
  mu, sigma = evaluation.feature_statistics(features)
  return {'mu': mu, 'sigma': sigma}


# ----------------------------------------------------------------------------- measuring


class Evaluator:
  """Samples with a `Sampler` and measures the samples in one or more feature spaces against
  the cached features of real images, and by their sharpness against the real images."""

  def __init__(self, config, workdir, sampler, network, eval_dataset, train_dataset=None,
               extra_networks=()):
    self.config = config
    self.sampler = sampler
    self.network = network
    self.extra_networks = tuple(n for n in extra_networks if n.name != network.name)
    self.reference = reference_features(config, self.network, eval_dataset, workdir,
                                        config.eval.num_real_images)
    self.extra_references = {
        n.name: reference_features(config, n, eval_dataset, workdir,
                                   config.eval.num_real_images) for n in self.extra_networks}
    self.real_images, self.real_labels = _real_images(eval_dataset, config.eval.num_real_images)
    self.train_dataset = train_dataset
    self.workdir = workdir

  def real_data_floor(self, num_samples=None):
    """FD of `num_real_images` training images vs the held-out reference; real accuracy.

    With `num_samples`, also `same_n`: the first `num_samples` training images measured exactly
    as samples are (FD, KID, precision/recall, accuracy, pixel and sharpness statistics, in
    every space, at the samples' N — FD is biased upwards at small N, so this is the floor a
    sample set of that size can reach).
    """
    result = {'accuracy': None, 'fd': None}
    ref = self.reference
    if ref.get('logits') is not None and ref.get('labels') is not None:
      result['accuracy'] = evaluation.classification_accuracy(ref['logits'], ref['labels'])
    if self.train_dataset is not None:
      result['fd'] = self._train_fd(self.network, ref)
      for network in self.extra_networks:
        result.setdefault('spaces', {})[network.name] = {
            'fd': self._train_fd(network, self.extra_references[network.name])}
      result['num_train_images'] = min(self.config.eval.num_real_images,
                                       self.train_dataset.num_examples)
    result['num_eval_images'] = int(ref['features'].shape[0])
    result['pixels'] = {k: round(v, 5) for k, v in ref['pixels'].items()}
    if self.train_dataset is not None and num_samples:
      images, labels = _real_images(self.train_dataset, num_samples)
      same_n = self.measure(images, labels)
      result['same_n'] = {'num_samples': int(len(labels)), **same_n}
    return result

  def _train_fd(self, network, ref):
    train_ref = reference_features(self.config, network, self.train_dataset, self.workdir,
                                   self.config.eval.num_real_images)
    return evaluation.frechet_distance(train_ref['mu'], train_ref['sigma'], ref['mu'],
                                       ref['sigma'])

  def generate(self, samples_per_class, guidance_scale, *, classifier_scale=None, method=None,
               num_steps=None, seed=None):
    """uint8 samples, balanced over classes, with the same noise for every w and w_c (same
    seed); w_c (None: `sampling.classifier_scale`) applies with classifier guidance only."""
    config = self.config.sampling
    num_classes = self.sampler.num_classes
    labels = np.tile(np.arange(num_classes, dtype=np.int32), samples_per_class)
    num, batch = len(labels), min(config.batch_size, len(labels))
    key = jax.random.PRNGKey(config.seed if seed is None else seed)
    t0 = time.time()
    images, nfe, first_call_s = self.sampler.sample_images(
        key, labels, float(guidance_scale), batch_size=config.batch_size, method=method,
        num_steps=num_steps, classifier_scale=classifier_scale)
    seconds = time.time() - t0
    steady = seconds - first_call_s  # throughput without the first call (it includes the compile)
    if num > batch and steady > 0:
      images_per_s = (num - batch) / steady
    else:
      images_per_s = num / max(seconds, 1e-9)
    timing = {'nfe': nfe, 'sample_seconds': round(seconds, 2),
              'images_per_s': round(images_per_s, 2)}
    if self.sampler.guidance != 'cfg':
      timing['classifier_nfe'] = self.sampler.classifier_nfe
    return images, labels, timing

  def measure(self, images, labels):
    """Metrics of uint8 `images` with intended class `labels`: the primary space's at the top
    level, every other space's under 'spaces', pixel and sharpness statistics."""
    num_classes = self.sampler.num_classes
    kw = dict(num_classes=num_classes, nearest_k=self.config.eval.nearest_k)
    out = evaluation.compute_features(self.network, images)
    metrics = judges.measure(out['features'], out['logits'], labels, self.reference, **kw)
    for network in self.extra_networks:
      out = evaluation.compute_features(network, images)
      metrics.setdefault('spaces', {})[network.name] = judges.measure(
          out['features'], out['logits'], labels, self.extra_references[network.name], **kw)
    metrics.update({k: round(float(v), 5)
                    for k, v in evaluation.pixel_statistics(images).items()})
    metrics['sharpness'] = sharpness.compare(images, labels, self.real_images, self.real_labels,
                                             num_classes)
    return metrics

  def evaluate(self, *, samples_per_class, guidance_scale, classifier_scale=None, method=None,
               num_steps=None):
    """Samples and measures one sampler setting; returns (row dict, uint8 images, labels)."""
    sconfig = self.config.sampling
    images, labels, timing = self.generate(samples_per_class, guidance_scale,
                                           classifier_scale=classifier_scale, method=method,
                                           num_steps=num_steps)
    row = {'guidance': self.sampler.guidance}
    if self.sampler.guidance != 'classifier':
      row['guidance_scale'] = float(guidance_scale)
      if self.sampler.guidance_method.name != 'cfg':  # e.g. 'cfg_pp', whose w is λ
        row['guidance_method'] = self.sampler.guidance_method.name
    if self.sampler.guidance != 'cfg':
      row['classifier_scale'] = float(
          self.config.sampling.classifier_scale if classifier_scale is None
          else classifier_scale)
    row.update({
        'method': method or sconfig.method,
        'num_steps': int(num_steps or sconfig.num_steps), 'sigma_schedule': sconfig.sigma_schedule,
        'sigma': float(sconfig.sigma),
        'guidance_interval': (list(sconfig.guidance_interval)
                              if sconfig.guidance_interval is not None else None),
        'seed': int(sconfig.seed), 'num_samples': int(len(labels)), **timing,
    })
    row.update(self.measure(images, labels))
    return row, images, labels


# ----------------------------------------------------------------------------- sweeps + files


_COLUMNS = (('guidance_scale', 'w'), ('guidance_method', 'w of'), ('classifier_scale', 'w_c'),
            ('guidance', 'guidance'),
            ('method', 'method'), ('num_steps', 'steps'), ('nfe', 'NFE'),
            ('classifier_nfe', 'classifier NFE'), ('fd', 'FD'), ('precision', 'precision'),
            ('recall', 'recall'), ('density', 'density'), ('coverage', 'coverage'),
            ('accuracy', 'accuracy'),
            ('black_fraction', 'black px'), ('pixel_std', 'pixel std'),
            ('num_samples', 'N'), ('images_per_s', 'img/s'))


def markdown_table(rows):
  """A markdown table of sweep rows (the columns every row has)."""
  columns = [(key, title) for key, title in _COLUMNS if all(key in r for r in rows)]
  lines = ['| ' + ' | '.join(title for _, title in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  for r in rows:
    cells = []
    for key, _ in columns:
      value = r[key]
      cells.append(f'{value:.4g}' if isinstance(value, float) else str(value))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(path, rows, x_key, x_label, title, group_key=None, log_x=False):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = {}
  for r in rows:
    groups.setdefault(r[group_key] if group_key else '', []).append(r)
  right = [k for k in ('accuracy', 'precision', 'recall', 'coverage') if k in rows[0]]
  fig, axes = plt.subplots(1, 1 + bool(right), figsize=(10 if right else 5, 3.6))
  axes = np.atleast_1d(axes)
  for name, group in groups.items():
    xs = [r[x_key] for r in group]
    axes[0].plot(xs, [r['fd'] for r in group], 'o-', label=f'FD {name}'.strip())
    for k in right:
      axes[1].plot(xs, [r[k] for r in group], 'o-', label=f'{k} {name}'.strip())
  axes[0].set_ylabel('FD (lower is better)')
  for ax in axes:
    ax.set_xlabel(x_label)
    if log_x:
      ax.set_xscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if right:
    axes[1].set_ylim(0, 1.02)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  atomic.write_bytes(path, buffer.getvalue())


def _write(path, text):
  if jax.process_index() == 0:
    atomic.write_text(path, text)


def run(config, workdir, sampler, network, eval_dataset, train_dataset, *, guidance=True,
        extra_networks=()):
  """Evaluation for --mode=evaluate of `sampler`'s weights with the feature `network` (and
  `extra_networks`, more feature spaces); returns the JSON-able result (also written to files
  under <workdir>/eval/: feature_spaces.md is every space side by side).

  `guidance=False` skips the guidance part (single w or sweep) and runs only the steps sweep.
  """
  evaluator = Evaluator(config, workdir, sampler, network, eval_dataset, train_dataset,
                        extra_networks)
  num_classes = sampler.num_classes
  out_dir = os.path.join(workdir, 'eval')
  per_class = config.eval.samples_per_class
  settings, x_key, x_label = guidance_settings(config, sampler.guidance)
  result = {'step': sampler.step, 'feature_network': evaluator.network.name,
            'reference': evaluator.reference['path'],
            'samples_per_class': per_class,
            'real_data': evaluator.real_data_floor(per_class * num_classes)}
  logging.info('Real data: %s', json.dumps(result['real_data']))

  rows, grid_columns = [], []
  for w, w_c in (settings if guidance else ()):
    row, images, labels = evaluator.evaluate(samples_per_class=per_class, guidance_scale=w,
                                             classifier_scale=w_c)
    logging.info('%s w=%g w_c=%s: %s', sampler.guidance, w, w_c, json.dumps(_summary(row)))
    rows.append(row)
    _worst_class_figure(out_dir, f'worst_class_w{w:g}', row, images, labels, evaluator)
    grid_columns.append(first_per_class(images, labels, num_classes,
                                         config.eval.grid_rows_per_class))
  if len(rows) == 1:
    result.update(rows[0])
  elif rows:
    result['guidance_sweep'] = rows
    _write_sweep(out_dir, 'guidance_sweep', rows, _real_row(result['real_data'], x_key),
                 x_key, x_label,
                 f'{config.input.dataset}: quality vs {x_label.split()[-1]} ({sampler.guidance}, '
                 f'{rows[0]["method"]}, {rows[0]["num_steps"]} steps, '
                 f'{rows[0]["num_samples"]} samples)')
    if jax.process_index() == 0:
      images_lib.save_png(os.path.join(out_dir, 'guidance_grid.png'),
                          _column_grid(grid_columns), upscale=2)

  if config.eval.num_steps:
    step_rows = []
    for method in tuple(config.eval.methods or (config.sampling.method,)):
      if method == 'euler_maruyama' and not config.sampling.sigma:
        logging.warning('euler_maruyama with config.sampling.sigma=0 is the Euler ODE sampler; '
                        'set --config.sampling.sigma (and sigma_schedule) for an SDE.')
      for num_steps in config.eval.num_steps:
        row, images, labels = evaluator.evaluate(samples_per_class=per_class,
                                                 guidance_scale=config.sampling.guidance_scale,
                                       method=method, num_steps=int(num_steps))
        logging.info('%s %d steps: %s', method, num_steps, json.dumps(_summary(row)))
        step_rows.append(row)
        _worst_class_figure(out_dir, f'worst_class_{method}{num_steps}', row, images,
                            labels, evaluator)
    result['steps_sweep'] = step_rows
    _write_sweep(out_dir, 'steps_sweep', step_rows, [], 'nfe', 'NFE per sample',
                 f'{config.input.dataset}: quality vs NFE (w = {config.sampling.guidance_scale})',
                 group_key='method', log_x=True)

  measured = rows + result.get('steps_sweep', [])
  if measured:
    table = judges.summary_table(measured, result['real_data'].get('same_n'), network.name,
                                 class_names=_class_names(config, num_classes))
    _write(os.path.join(out_dir, 'feature_spaces.md'), table)
    logging.info('Every feature space (FD and KID beside their same-N floor):\n%s', table)
  _write(os.path.join(out_dir, 'evaluate.json'), json.dumps(result, indent=2))
  return result


def _class_names(config, num_classes):
  if config.input.dataset == 'fashion_mnist' and num_classes == 10:
    return fashion_mnist.CLASS_NAMES
  return None


def _pad_to(images, count):
  """`images` followed by black ones up to `count`."""
  return np.concatenate([images, np.zeros((count - len(images),) + images.shape[1:], images.dtype)])

def _worst_class_figure(out_dir, name, row, images, labels, evaluator, count=40):
  """<out_dir>/<name>.png: `count` samples of the row's worst class (by FD in the primary
  space) on the left, as many real held-out images of that class on the right; and
  <name>_class<c>.png for a class that is worst in another space."""
  if jax.process_index() != 0:
    return
  spaces = judges.spaces_of(row, evaluator.network.name)
  worst = [m['worst_class'] for m in spaces.values() if m.get('worst_class') is not None]
  for i, c in enumerate(dict.fromkeys(worst)):
    fake = images[labels == c][:count]
    real = evaluator.real_images[evaluator.real_labels == c][:len(fake)]
    if not len(fake) or len(real) < len(fake):
      continue
    cols = 8
    rows = -(-len(fake) // cols)
    left = images_lib.make_grid(_pad_to(fake, rows * cols), rows=rows, cols=cols)
    right = images_lib.make_grid(_pad_to(real, rows * cols), rows=rows, cols=cols)
    gap = np.full((left.shape[0], 8) + left.shape[2:], 255, np.uint8)
    images_lib.save_png(os.path.join(out_dir, f'{name}.png' if not i else f'{name}_class{c}.png'),
                        np.concatenate([left, gap, right], axis=1), upscale=2)


def _write_sweep(out_dir, name, rows, extra_rows, x_key, x_label, title, **plot_kwargs):
  """<name>.json (rows), <name>.md (rows + extra_rows, e.g. the same-N real row), <name>.png."""
  _write(os.path.join(out_dir, f'{name}.json'), json.dumps(rows, indent=2))
  _write(os.path.join(out_dir, f'{name}.md'), markdown_table(rows + extra_rows))
  if jax.process_index() == 0:
    _plot(os.path.join(out_dir, f'{name}.png'), rows, x_key, x_label, title, **plot_kwargs)
  logging.info('%s:\n%s', name, markdown_table(rows))


def _summary(row):
  """A row without its per-class lists and other spaces, for the log."""
  return {k: v for k, v in row.items()
          if not k.endswith('_per_class') and k not in ('spaces', 'sharpness')}


def _real_row(real_data, x_key='guidance_scale'):
  """The same-N real-data floor as a table row (empty when there is none)."""
  if 'same_n' not in real_data:
    return []
  return [{'guidance': '–', 'guidance_scale': '–', 'classifier_scale': '–', 'method': '–',
           'num_steps': '–', 'nfe': '–', 'classifier_nfe': '–', 'images_per_s': '–',
           **real_data['same_n'], x_key: 'real train images'}]


def guidance_settings(config, guidance):
  """The (w, w_c) pairs --mode=evaluate measures, the swept key and its axis label.

  'cfg': `eval.guidance_scales` (w_c unused); 'classifier': `eval.classifier_scales` (w unused);
  'cfg+classifier': every pair of the two lists. A list left None is the `sampling` value.
  """
  scales = tuple(config.eval.guidance_scales or (config.sampling.guidance_scale,))
  if guidance == 'cfg':
    return [(float(w), None) for w in scales], 'guidance_scale', 'guidance scale w'
  classifier_scales = tuple(config.eval.classifier_scales
                            or (config.sampling.classifier_scale,))
  if guidance == 'classifier':
    scales = (1.0,)
  settings = [(float(w), float(w_c)) for w in scales for w_c in classifier_scales]
  if len(classifier_scales) > 1 or len(scales) == 1:
    return settings, 'classifier_scale', 'classifier scale w_c'
  return settings, 'guidance_scale', 'guidance scale w'


def first_per_class(images, labels, num_classes, rows_per_class):
  """(num_classes * rows_per_class) images: the first samples of each class, class-major."""
  picked = [images[labels == c][:rows_per_class] for c in range(num_classes)]
  return np.concatenate(picked)


def _column_grid(columns):
  """Grid with one column per guidance scale; rows are samples (class-major)."""
  stacked = np.stack(columns, axis=1)  # (rows, w, H, W, C)
  rows, cols = stacked.shape[:2]
  return images_lib.make_grid(stacked.reshape((-1,) + stacked.shape[2:]), rows=rows, cols=cols)
