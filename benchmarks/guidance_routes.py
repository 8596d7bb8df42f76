"""CFG, classifier guidance and both, side by side: one table and one fidelity–diversity figure.

    python benchmarks/guidance_routes.py \
        --sweep 'CFG=runs/fmnist/eval/guidance_sweep.json' \
        --sweep 'CG=runs/fmnist_unconditional/eval/guidance_sweep.json' \
        --sweep 'CFG+CG=runs/fmnist/eval_cg/guidance_sweep.json' \
        --out docs/fmnist_guidance_routes.png [--json]

Each --sweep is LABEL=PATH to a `guidance_sweep.json` that `--mode=evaluate` wrote (one route's
sweep of w or w_c). Prints a markdown table (one row per setting: w, w_c, NFE, classifier NFE,
FD, recall, precision, class accuracy, seconds per image, best FD of each route in bold) and
draws class accuracy (fidelity) against recall (diversity) and FD against accuracy, one curve
per route. Reads only the files; it samples nothing and asserts nothing.
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from guidedflow import errors
from guidedflow import host_allocator
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('sweep', [], 'LABEL=PATH of a guidance_sweep.json (repeat).')
flags.DEFINE_string('out', None, 'Figure path (PNG); none: no figure.')
flags.DEFINE_bool('json', False, 'Print the rows as JSON instead of a table.')


def read_sweeps(specs):
  """[(label, rows)] of LABEL=PATH specs; a UserError names a bad spec or file."""
  sweeps = []
  for spec in specs:
    label, sep, path = spec.rpartition('=')
    if not sep or not label or not path:
      raise errors.ConfigError(f'--sweep {spec!r} must be LABEL=PATH, e.g. '
                               'CFG=runs/fmnist/eval/guidance_sweep.json')
    try:
      with open(path) as f:
        rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise errors.ConfigError(f'--sweep {label}: cannot read {path} ({e}); write it with '
                               '--mode=evaluate and eval.guidance_scales or '
                               'eval.classifier_scales.') from e
    if not isinstance(rows, list) or not rows or 'fd' not in rows[0]:
      raise errors.ConfigError(f'--sweep {label}: {path} is not a guidance_sweep.json (a list '
                               'of rows with fd, recall, accuracy).')
    sweeps.append((label, rows))
  return sweeps


def table_rows(sweeps):
  """One dict per setting with the compared quantities; `best` marks each route's lowest FD."""
  out = []
  for label, rows in sweeps:
    best = min(range(len(rows)), key=lambda i: rows[i]['fd'])
    for i, r in enumerate(rows):
      images_per_s = r.get('images_per_s') or 0.0
      out.append({
          'route': label, 'w': r.get('guidance_scale', '–'),
          'w_c': r.get('classifier_scale', '–'), 'nfe': r['nfe'],
          'classifier_nfe': r.get('classifier_nfe', 0), 'fd': r['fd'], 'recall': r['recall'],
          'precision': r['precision'], 'accuracy': r['accuracy'],
          's_per_image': round(1.0 / images_per_s, 4) if images_per_s else None,
          'num_samples': r['num_samples'], 'best': i == best})
  return out


def markdown(rows):
  header = ('| route | w | w_c | NFE | classifier NFE | FD | recall | precision | accuracy | '
            's / image | N |')
  lines = [header, '|' + '---|' * (header.count('|') - 1)]
  for r in rows:
    fd = f'**{r["fd"]:.2f}**' if r['best'] else f'{r["fd"]:.2f}'
    s = '–' if r['s_per_image'] is None else f'{r["s_per_image"]:.3f}'
    lines.append(f'| {r["route"]} | {r["w"]} | {r["w_c"]} | {r["nfe"]} | {r["classifier_nfe"]} '
                 f'| {fd} | {r["recall"]:.3f} | {r["precision"]:.3f} | {r["accuracy"]:.3f} '
                 f'| {s} | {r["num_samples"]} |')
  return '\n'.join(lines)


def plot(path, sweeps):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for label, rows in sweeps:
    accuracy = [r['accuracy'] for r in rows]
    line, = left.plot(accuracy, [r['recall'] for r in rows], 'o-', label=label)
    right.plot(accuracy, [r['fd'] for r in rows], 'o-', color=line.get_color(), label=label)
    for r in rows:  # each point named by its scale(s)
      scale = '/'.join(f'{r[k]:g}' for k in ('guidance_scale', 'classifier_scale') if k in r)
      left.annotate(scale, (r['accuracy'], r['recall']), fontsize=7, xytext=(3, 3),
                    textcoords='offset points')
  left.set_ylabel('recall (diversity)')
  right.set_ylabel('FD (lower is better)')
  for ax in (left, right):
    ax.set_xlabel('class accuracy of the samples (fidelity)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle('Fidelity against diversity along each route\'s sweep (points: w, w_c, or w/w_c)',
               fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  try:
    sweeps = read_sweeps(FLAGS.sweep)
  except errors.UserError as e:
    sys.exit(f'error: {e}')
  if not sweeps:
    sys.exit('error: give at least one --sweep LABEL=PATH.')
  rows = table_rows(sweeps)
  print(json.dumps(rows, indent=1) if FLAGS.json else markdown(rows))
  if FLAGS.out:
    plot(FLAGS.out, sweeps)
    print(f'figure: {FLAGS.out}')


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  app.run(main)
