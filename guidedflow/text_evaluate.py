"""--mode=evaluate of a text model (Fashion-MNIST captions): how well samples follow their
prompts along w, and what following them costs in quality and diversity.

For each w of `eval.guidance_scales` (the same noise at every w), three prompt sets:

* **captions**: the captions of the first `eval.samples_per_class` × classes held-out images
  (`captions.CaptionedDataset`, epoch 0), one sample each, measured exactly as the
  class-conditional evaluation measures its samples (`evaluate.Evaluator.measure`: FD and KID in
  every feature space beside the same-N real-image floor, precision/recall, coverage, per class,
  sharpness); class accuracy is the feature classifier's accuracy on the prompted class;
* **compositions**: every class × attribute × level ("a dark sneaker", `captions.TEMPLATES[0]`),
  `eval.samples_per_composition` samples each; seen compositions and the held-out ones
  (`captions.HELD_OUT`, never in training) apart;
* **paraphrased**: the same compositions in templates never used in training
  (`captions.PARAPHRASES`).

**Attribute accuracy** is the share of (sample, asked attribute) pairs whose attribute, measured
by the function that made the captions (`captions.levels`, the prompted class's terciles), is at
the level the prompt asked for. A model that ignores the attribute scores about 1/3 (terciles);
the real images score 1 against their own captions by construction.

Files under <workdir>/eval/: text_sweep.json / .md / .png (attribute and class accuracy, FD and
recall along w), feature_spaces.md (every space, caption set), prompt_grid.png (a prompt per
row, a block of columns per w).
"""

import io
import json
import os
import time

from absl import logging
import numpy as np

from guidedflow import atomic
from guidedflow import captions
from guidedflow import evaluation
from guidedflow import judges
from guidedflow import images as images_lib

# Prompts of prompt_grid.png: a seen composition per attribute, then the held-out ones.
GRID_PROMPTS = ('a dark T-shirt', 'a light pair of trousers', 'a small dress', 'a large coat',
                'a narrow shirt', 'a wide sandal', 'a plain pullover', 'a patterned bag',
                'a dark sneaker', 'a patterned pullover', 'a narrow bag')


def compositions(num_classes=10):
  """[(label, attribute index, level 0 low / 1 high)]: every class × attribute × level."""
  return [(c, a, level) for c in range(num_classes) for a in range(len(captions.ATTRIBUTES))
          for level in (0, 1)]


def is_held_out(label, attribute, level):
  return (int(label), captions.ATTRIBUTES[attribute], 2 * int(level)) in captions.HELD_OUT


def attribute_accuracy(images, labels, requests):
  """Attribute accuracy of uint8 `images` prompted as class `labels` with `requests` (per
  sample, a list of (attribute index, level 0/1)): {'seen': per attribute and 'mean',
  'held_out': per held-out composition and 'mean'} (None where nothing was asked)."""
  measured = captions.levels(images, labels)
  hits = {}
  for i, parts in enumerate(requests):
    for a, level in parts:
      key = (int(labels[i]), a, level) if is_held_out(labels[i], a, level) else a
      hits.setdefault(key, []).append(measured[i, a] == 2 * level)
  seen = {name: _mean(hits.get(a)) for a, name in enumerate(captions.ATTRIBUTES)}
  seen['mean'] = _mean([h for k, v in hits.items() if not isinstance(k, tuple) for h in v])
  held = {_composition_name(*k): _mean(v) for k, v in sorted(hits.items(), key=str)
          if isinstance(k, tuple)}
  held['mean'] = _mean([h for k, v in hits.items() if isinstance(k, tuple) for h in v])
  return {'seen': seen, 'held_out': held}


def _mean(values):
  return None if not values else round(float(np.mean(values)), 4)


def _composition_name(label, attribute, level):
  return captions.render(label, [(attribute, level)], '{a}{noun}')


class PromptSets:
  """The prompts of the three sets (module docstring) and what each asks for."""

  def __init__(self, eval_pixels, num_captions, per_composition):
    data = captions.CaptionedDataset(eval_pixels, hold_out=False)
    ids = data.get_batch(np.arange(min(num_captions, data.num_examples)))['caption']
    table = captions.caption_table()
    parsed = [captions.parse(i) for i in ids]
    self.captions = ([table[i] for i in ids], np.array([p[0] for p in parsed], np.int32),
                     [p[3] for p in parsed])
    comps = [c for c in compositions() for _ in range(per_composition)]
    labels = np.array([c for c, _, _ in comps], np.int32)
    requests = [[(a, level)] for _, a, level in comps]
    template = captions.TEMPLATES[0]
    self.compositions = ([captions.render(c, r, template) for c, r in zip(labels, requests)],
                         labels, requests)
    paraphrases = captions.PARAPHRASES
    self.paraphrased = ([captions.render(c, r, paraphrases[i % len(paraphrases)])
                         for i, (c, r) in enumerate(zip(labels, requests))], labels, requests)


def _class_accuracy(network, images, labels):
  logits = evaluation.compute_features(network, images)['logits']
  return None if logits is None else round(evaluation.classification_accuracy(logits, labels), 4)


def measure_w(evaluator, generate, sets, w):
  """One row: the three sets sampled at w and measured."""
  t0 = time.time()
  texts, labels, requests = sets.captions
  images = generate(texts, w)
  row = {'guidance_scale': float(w), 'num_samples': int(len(labels))}
  row.update(evaluator.measure(images, labels))
  row['attributes'] = attribute_accuracy(images, labels, requests)
  for name in ('compositions', 'paraphrased'):
    texts, labels, requests = getattr(sets, name)
    images = generate(texts, w)
    row[name] = {'num_samples': int(len(labels)),
                 'accuracy': _class_accuracy(evaluator.network, images, labels),
                 'attributes': attribute_accuracy(images, labels, requests)}
  row['seconds'] = round(time.time() - t0, 1)
  return row


# (title, path into a row): the columns of text_sweep.md.
_COLUMNS = (('w', ('guidance_scale',)), ('FD', ('fd',)), ('recall', ('recall',)),
            ('coverage', ('coverage',)), ('class acc.', ('accuracy',)),
            ('caption attr. acc.', ('attributes', 'seen', 'mean')),
            ('prompt class acc.', ('compositions', 'accuracy')),
            *((f'{name}', ('compositions', 'attributes', 'seen', name))
              for name in captions.ATTRIBUTES),
            ('seen', ('compositions', 'attributes', 'seen', 'mean')),
            ('held-out', ('compositions', 'attributes', 'held_out', 'mean')),
            ('paraphr. class acc.', ('paraphrased', 'accuracy')),
            ('paraphr. seen', ('paraphrased', 'attributes', 'seen', 'mean')),
            ('paraphr. held-out', ('paraphrased', 'attributes', 'held_out', 'mean')))


def _get(row, path):
  for key in path:
    row = row.get(key) if isinstance(row, dict) else None
  return row


def markdown_table(rows):
  """text_sweep.md: a line per w (the composition set's attribute accuracy per attribute)."""
  lines = ['| ' + ' | '.join(t for t, _ in _COLUMNS) + ' |', '|' + '---|' * len(_COLUMNS)]
  for row in rows:
    cells = [_get(row, path) for _, path in _COLUMNS]
    lines.append('| ' + ' | '.join('–' if c is None else f'{c:.4g}' for c in cells) + ' |')
  held = sorted({k for r in rows for k in r['compositions']['attributes']['held_out']} - {'mean'})
  if held:
    lines += ['', '| w | ' + ' | '.join(f'held-out "{k}"' for k in held) + ' |',
              '|' + '---|' * (1 + len(held))]
    for row in rows:
      values = [row['compositions']['attributes']['held_out'].get(k) for k in held]
      lines.append(f'| {row["guidance_scale"]:.4g} | '
                   + ' | '.join('–' if v is None else f'{v:.4g}' for v in values) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(path, rows, floor_fd):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ws = [r['guidance_scale'] for r in rows]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  for title, path_ in (('seen (attr.)', ('compositions', 'attributes', 'seen', 'mean')),
                       ('held-out (attr.)', ('compositions', 'attributes', 'held_out', 'mean')),
                       ('paraphrased (attr.)', ('paraphrased', 'attributes', 'seen', 'mean')),
                       ('class accuracy', ('accuracy',))):
    values = [_get(r, path_) for r in rows]
    left.plot(ws, [np.nan if v is None else v for v in values], 'o-', label=title)
  left.axhline(1 / 3, color='gray', ls=':', lw=1, label='chance (terciles)')
  left.set_ylim(0, 1.02)
  left.set_ylabel('accuracy')
  for key in ('recall', 'coverage'):
    right.plot(ws, [r.get(key, np.nan) for r in rows], 'o-', label=key)
  right.set_ylim(0, 1.02)
  right.set_ylabel('diversity (caption set)')
  fd_axis = right.twinx()
  fd_axis.plot(ws, [r['fd'] for r in rows], 's--', color='k', label='FD')
  if floor_fd:
    fd_axis.axhline(floor_fd, color='k', ls=':', lw=1, label='FD same-N floor')
  fd_axis.set_ylabel('FD (lower is better)')
  for ax in (left, right):
    ax.set_xlabel('guidance scale w')
    ax.grid(alpha=0.3)
  left.legend(fontsize=7)
  right.legend(fontsize=7, loc='lower left')
  fd_axis.legend(fontsize=7, loc='lower right')
  fig.suptitle('Prompt adherence vs diversity along w', fontsize=10)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  atomic.write_bytes(path, buffer.getvalue())


def run(config, workdir, evaluator, generate, prompt_grid, eval_pixels, *, class_names=None,
        is_writer=True):
  """The sweep along `eval.guidance_scales` (module docstring); returns the JSON-able result.

  Args:
    evaluator: an `evaluate.Evaluator` of the model's sampler (feature spaces, real images).
    generate: (prompts, w) -> uint8 images, one per prompt, the same noise for every w.
    prompt_grid: (prompts, scales) -> a labelled uint8 grid image.
    eval_pixels: the eval split's pixel dataset (labels, images) the captions are drawn for.
  """
  ecfg = config.eval
  num_classes = evaluator.sampler.num_classes
  sets = PromptSets(eval_pixels, ecfg.samples_per_class * num_classes,
                    ecfg.samples_per_composition)
  scales = tuple(ecfg.guidance_scales or (config.sampling.guidance_scale,))
  out_dir = os.path.join(workdir, 'eval')
  result = {'feature_network': evaluator.network.name,
            'real_data': evaluator.real_data_floor(len(sets.captions[1]))}
  rows = []
  for w in scales:
    rows.append(measure_w(evaluator, generate, sets, w))
    logging.info('w=%g: %s', w, json.dumps(_summary(rows[-1])))
  result['text_sweep'] = rows
  floor = result['real_data'].get('same_n')
  table = markdown_table(rows)
  spaces = judges.summary_table(rows, floor, evaluator.network.name, class_names=class_names)
  logging.info('Prompt adherence along w:\n%s\nEvery feature space (caption set):\n%s', table,
               spaces)
  if is_writer:
    atomic.write_text(os.path.join(out_dir, 'text_sweep.json'), json.dumps(rows, indent=2))
    atomic.write_text(os.path.join(out_dir, 'text_sweep.md'), table)
    atomic.write_text(os.path.join(out_dir, 'feature_spaces.md'), spaces)
    _plot(os.path.join(out_dir, 'text_sweep.png'), rows, floor and floor.get('fd'))
    images_lib.save_png(os.path.join(out_dir, 'prompt_grid.png'),
                        prompt_grid(list(GRID_PROMPTS), scales))
    atomic.write_text(os.path.join(out_dir, 'evaluate.json'), json.dumps(result, indent=2))
  return result


def _summary(row):
  return {'fd': row['fd'], 'accuracy': row.get('accuracy'), 'recall': row.get('recall'),
          'attributes_seen': _get(row, ('compositions', 'attributes', 'seen', 'mean')),
          'attributes_held_out': _get(row, ('compositions', 'attributes', 'held_out', 'mean')),
          'paraphrased_seen': _get(row, ('paraphrased', 'attributes', 'seen', 'mean')),
          'seconds': row['seconds']}

