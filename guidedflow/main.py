"""Entry point: python -m guidedflow.main --config configs/x.py --workdir DIR [--mode=...]."""

import json
import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from guidedflow import checkpointing
from guidedflow import evaluate
from guidedflow import evaluation
from guidedflow import input_pipeline
from guidedflow import sharding
from guidedflow import train
from guidedflow import train_classifier
from guidedflow.models import inception

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/fashion_mnist.py or configs/fashion_mnist.py:unet.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and TensorBoard logs.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'evaluate'],
                  'train: train (resuming from --workdir); sample: write samples.npz + grid.png '
                  'from the latest EMA checkpoint; evaluate: print metrics as JSON.')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors whose message already says what is wrong and how to fix it: no traceback.
_USER_ERRORS = (train.ConfigError, train.TrainingError, input_pipeline.DataError,
                checkpointing.CheckpointMismatchError, train.CheckpointNotFoundError,
                train_classifier.ConfigError, train_classifier.TrainingError,
                train_classifier.FeatureNetworkNotFoundError,
                evaluation.ReferenceMismatchError, evaluate.EvaluationSetupError,
                inception.InceptionWeightsNotFoundError)


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax (dozens of lines per save) and JAX's backend probing
  ("Unable to initialize backend 'tpu'" on every machine without one); keeps warnings/errors."""

  def filter(self, record):
    if record.levelno >= pylogging.WARNING:
      return True
    return not ('/orbax/' in record.pathname or record.pathname.endswith('xla_bridge.py'))


def _run_classifier(config):
  """config.task='classifier': the feature network of the sample metrics."""
  if FLAGS.mode == 'train':
    print(json.dumps(train_classifier.train_and_evaluate(config, FLAGS.workdir)))
  elif FLAGS.mode == 'evaluate':
    print(json.dumps(train_classifier.evaluate(config, FLAGS.workdir), indent=2))
  else:
    raise train_classifier.ConfigError(
        f"--mode={FLAGS.mode} does not apply to config.task='classifier' (the feature network "
        'for the sample metrics): use --mode=train or --mode=evaluate.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  try:
    # Before anything touches a backend: every process must join first.
    mesh = config.get('mesh') or {}
    sharding.initialize_distributed(
        mesh.get('distributed', 'auto'), mesh.get('coordinator_address'),
        mesh.get('num_processes'), mesh.get('process_id'))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  logging.info('JAX %s, process %d/%d, %d devices (%d local): %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count(), jax.local_devices())
  try:
    if config.get('task', 'generate') == 'classifier':
      _run_classifier(config)
    elif FLAGS.mode == 'train':
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == 'sample':
      print(json.dumps(train.sample_and_save(config, FLAGS.workdir)))
    else:
      print(json.dumps(train.evaluate(config, FLAGS.workdir), indent=2))
  except _USER_ERRORS as e:
    logging.error('%s: %s', type(e).__name__, e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
