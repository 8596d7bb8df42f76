"""Sample quality against training wall-clock, in every feature space: one run's checkpoints.

    python benchmarks/quality_vs_time.py --config configs/fashion_mnist.py --workdir runs/fmnist \
        [--samples_per_class 100] [--guidance_scale 1.5] [--label NAME] [--out curves.json]

For each checkpoint the workdir keeps (train with `--config.checkpoint.max_to_keep=20` to keep
them all), samples `samples_per_class` images per class from its EMA weights and measures them
as `--mode=evaluate` does: FD and KID in every feature space (`eval.feature_network` and
`eval.extra_feature_networks`), recall, class accuracy, the worst class and the sharpness
ratios. KID's expectation does not depend on N, so curves at N = 1,000 compare with tables at
N = 5,000 (FD's do not: compare FD within one N). The wall-clock of a step is read off the run's
result.json (setup + compile + its share of the training and periodic time), so a curve says
what a run of that many minutes on that machine would have reached. Appends one JSON line per
checkpoint to `--out` (plot several runs with `--plot`). Prints numbers only; it asserts nothing.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from guidedflow import evaluate
from guidedflow import feature_networks
from guidedflow import host_allocator
from guidedflow import input_pipeline
from guidedflow import judges
from guidedflow import resume_config
from guidedflow import sampler as sampler_lib
from guidedflow import train_state
from guidedflow.tasks import registry
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config the run was trained with.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'The run.')
flags.DEFINE_integer('samples_per_class', 100, 'Samples per class and checkpoint.')
flags.DEFINE_float('guidance_scale', None, 'Default: config.sampling.guidance_scale.')
flags.DEFINE_string('label', None, 'Name of the run in the output (default: the workdir).')
flags.DEFINE_string('out', None, 'Append one JSON line per checkpoint here.')
flags.DEFINE_list('plot', None, 'Instead of measuring: plot these JSON-lines files to --figure.')
flags.DEFINE_string('figure', 'quality_vs_time.png', 'The figure of --plot.')
flags.DEFINE_enum('metric', 'fd', ['fd', 'kid'], 'What --plot draws: FD (compare curves of one N) '
                  'or KID with its standard error (comparable across N, noisier).')


def _minutes(result, step):
  """Wall-clock minutes of the run when it had trained `step` steps (its setup and compile, and
  its share of the training and periodic time)."""
  share = min(step / max(result['steps_this_run'], 1), 1.0)
  seconds = (result['setup_s'] + result['compile_s']
             + (result['train_s'] + result['periodic_s']) * share)
  return round(seconds / 60, 2)


def measure(config, workdir):
  registry.validate(config)
  result = json.loads(open(os.path.join(workdir, 'result.json')).read())
  eval_set = input_pipeline.create_dataset(config.input, config.input.eval_split)
  names = feature_networks.names(config)
  networks = [feature_networks.load(config, name) for name in names]
  builder, state, image_shape = sampler_lib.load(config, workdir)
  sampler = sampler_lib.Sampler.from_train_state(config, builder, state, image_shape)
  evaluator = evaluate.Evaluator(config, workdir, sampler, networks[0], eval_set,
                                 extra_networks=networks[1:])
  w = FLAGS.guidance_scale if FLAGS.guidance_scale is not None else config.sampling.guidance_scale
  with train_state.open_checkpointer(config, workdir, handle_sigterm=False) as ckpt:
    steps = sorted(ckpt.all_steps())
    for step in steps:
      resume_config.check(config, ckpt.restore_config(step), step, ckpt.directory)
      restored, _ = ckpt.restore(builder.abstract_state(), step=step)
      sampler.update(restored)
      row, _, _ = evaluator.evaluate(samples_per_class=FLAGS.samples_per_class, guidance_scale=w)
      minutes = _minutes(result, step)
      line = {'run': FLAGS.label or workdir, 'step': step, 'minutes': minutes, 'w': w,
              'num_samples': row['num_samples'],
              'sharpness': {k: v['ratio'] for k, v in row['sharpness'].items()}}
      for space, metrics in judges.spaces_of(row, names[0]).items():
        line[space] = {k: metrics.get(k) for k in ('fd', 'kid', 'kid_se', 'recall', 'accuracy',
                                                  'worst_class', 'worst_class_fd_ratio')}
      print(json.dumps(line), flush=True)
      if FLAGS.out:
        with open(FLAGS.out, 'a') as f:
          f.write(json.dumps(line) + '\n')


def plot(files, figure, metric='fd'):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lines = [json.loads(text) for path in files for text in open(path) if text.strip()]
  spaces = [k for k in lines[0] if isinstance(lines[0][k], dict) and 'kid' in lines[0][k]]
  scale, label = (1e3, 'KID × 1e3') if metric == 'kid' else (1.0, 'FD')
  fig, axes = plt.subplots(1, len(spaces), figsize=(4 * len(spaces), 3.4))
  for ax, space in zip(np.atleast_1d(axes), spaces):
    for run in dict.fromkeys(row['run'] for row in lines):
      points = sorted((row['minutes'], row[space][metric] * scale,
                       row[space]['kid_se'] * scale if metric == 'kid' else 0.0)
                      for row in lines if row['run'] == run)
      xs, ys, es = zip(*points)
      ax.errorbar(xs, ys, yerr=es if metric == 'kid' else None, marker='o', capsize=2, label=run)
    ax.set_title(space, fontsize=9)
    ax.set_xlabel('training wall-clock (min)')
    ax.set_ylabel(f'{label} (lower is better)')
    if metric == 'fd':
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(figure, dpi=110)
  print(f'wrote {figure}')


def main(argv):
  del argv
  if FLAGS.plot:
    plot(FLAGS.plot, FLAGS.figure, FLAGS.metric)
    return
  if not FLAGS.workdir or FLAGS.config is None:
    raise app.UsageError('--config and --workdir are required (or --plot FILES).')
  measure(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  app.run(main)
