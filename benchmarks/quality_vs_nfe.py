"""Quality against NFE: the steps sweep of an existing checkpoint, per sampler.

    python benchmarks/quality_vs_nfe.py --config configs/fashion_mnist.py:cfg --workdir runs/fmnist \
        [--steps 5,10,20,50,100] [--methods euler,heun,euler_maruyama] [--samples_per_class 100] \
        [--sigma 0.5 --sigma_schedule decreasing] [--guidance_scale 2] [--json]

Samples `samples_per_class` images per class from the EMA weights for every (method, steps) and
measures FD, precision/recall, density/coverage and class accuracy with the configured feature
network (`--config.eval.*`, as `--mode=evaluate`). Also writes <workdir>/eval/steps_sweep.{json,md,png}.
Prints numbers only; it asserts nothing.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

# The repository root: the config files import `configs` (run as `python benchmarks/...`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from guidedflow import evaluate
from guidedflow import feature_networks
from guidedflow import host_allocator
from guidedflow import input_pipeline
from guidedflow import sampler as sampler_lib
from guidedflow.tasks import registry
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config the checkpoint was trained with.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir with the checkpoint.')
flags.DEFINE_list('steps', ['5', '10', '20', '50'], 'Sampler steps to sweep.')
flags.DEFINE_list('methods', ['euler', 'heun', 'euler_maruyama'], 'Samplers to sweep.')
flags.DEFINE_integer('samples_per_class', None, 'Default: config.eval.samples_per_class.')
flags.DEFINE_float('guidance_scale', None, 'Default: config.sampling.guidance_scale.')
flags.DEFINE_float('sigma', None, 'euler_maruyama σ; default: config.sampling.sigma, or 0.5 '
                   'if that is 0.')
flags.DEFINE_string('sigma_schedule', None, 'Default: config.sampling.sigma_schedule.')
flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config = FLAGS.config
  config.eval.num_steps = tuple(int(s) for s in FLAGS.steps)
  config.eval.methods = tuple(FLAGS.methods)
  if FLAGS.samples_per_class:
    config.eval.samples_per_class = FLAGS.samples_per_class
  if FLAGS.guidance_scale is not None:
    config.sampling.guidance_scale = FLAGS.guidance_scale
  if FLAGS.sigma is not None:
    config.sampling.sigma = FLAGS.sigma
  elif not config.sampling.sigma:
    config.sampling.sigma = 0.5
  if FLAGS.sigma_schedule:
    config.sampling.sigma_schedule = FLAGS.sigma_schedule
  if config.eval.feature_network == 'none':
    raise app.UsageError('quality_vs_nfe needs a feature network: set '
                         '--config.eval.feature_network=fmnist_classifier (or inception_v3).')
  registry.validate(config)
  sampler = sampler_lib.Sampler.from_workdir(config, FLAGS.workdir)
  eval_set = input_pipeline.create_dataset(config.input, config.input.eval_split)
  result = evaluate.run(config, FLAGS.workdir, sampler, feature_networks.load(config), eval_set,
                        None, guidance=False)
  rows = result['steps_sweep']
  if FLAGS.json:
    print(json.dumps(dict(step=result['step'], feature_network=result['feature_network'],
                          guidance_scale=config.sampling.guidance_scale,
                          sigma=config.sampling.sigma,
                          sigma_schedule=config.sampling.sigma_schedule, rows=rows), indent=1))
    return
  print(f"checkpoint step {result['step']}  w = {config.sampling.guidance_scale}  "
        f"{config.eval.samples_per_class} samples/class  features {result['feature_network']}  "
        f"EM sigma {config.sampling.sigma} ({config.sampling.sigma_schedule})")
  print(evaluate.markdown_table(rows))


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  app.run(main)
