"""Entry point: python -m guidedflow.main --config configs/x.py --workdir DIR [--mode=...]."""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from guidedflow import aot
from guidedflow import checkpointing
from guidedflow import cli
from guidedflow import errors
from guidedflow import host_allocator
from guidedflow import log_filters
from guidedflow import schema
from guidedflow import sharding
from guidedflow import stop_signals
from guidedflow.tasks import registry
from guidedflow import train
from guidedflow import workdir as workdir_lib
from guidedflow import workdir_lock

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/fashion_mnist.py or configs/fashion_mnist.py:unet.',
    lock_config=False)  # tasks.registry.prepare completes it, then locks it
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, samples and TensorBoard logs.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'evaluate', 'encode', 'compile'],
                  'train: train (resuming from --workdir); sample: write samples.npz + grid.png '
                  'from the latest EMA checkpoint; evaluate: print metrics as JSON; encode: '
                  'write the latent cache of a latent generator (training writes it too); '
                  'compile: compile the train step for config.compile.topology (a TPU) and '
                  'report per-device memory, FLOPs and collectives.')
flags.mark_flags_as_required(['config', 'workdir'])


def _start_backend():
  """Starts JAX's backend; one line and status 1 when JAX_PLATFORMS names one that is not here
  (JAX raises an AssertionError or a RuntimeError, with a traceback, from its first use)."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:
    platforms = os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms
    detail = (str(e).splitlines() or ['no such device or plugin'])[0]
    print(f'error: JAX cannot start the backend JAX_PLATFORMS={platforms!r} names on this '
          f'machine ({detail}); unset JAX_PLATFORMS to use what it has, or install that '
          "backend (e.g. pip install 'jax[cuda12]' on an NVIDIA GPU host).", file=sys.stderr)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_allocator.skip_tpu_probe_without_tpu()
  log_filters.install()
  config = cli.get_config()
  try:
    allocator = host_allocator.keep_freed_memory()  # before JAX starts XLA's threads
    # Before anything touches a backend: every process must join first.
    mesh = schema.complete(config).mesh
    sharding.initialize_distributed(mesh.distributed, mesh.coordinator_address,
                                    mesh.num_processes, mesh.process_id)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  _start_backend()
  logging.info('%s', allocator)
  logging.info('JAX %s, process %d/%d, %d devices (%d local): %s', jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count(), jax.local_devices())
  created = False
  try:
    registry.prepare(config)  # before the workdir is touched
    created = workdir_lib.prepare(FLAGS.workdir, FLAGS.mode)
    if FLAGS.mode != 'train':  # training saves on them (stop_signals.StopSignals)
      stop_signals.exit_on_signals(f'--mode={FLAGS.mode}')
    if FLAGS.mode == 'train':
      with workdir_lock.WorkdirLock(FLAGS.workdir, 'training'):
        _, result = train.train_and_evaluate(config, FLAGS.workdir)
      print(json.dumps(result))
      if result.get('stop_signal'):
        sys.exit(result['exit_status'])
    elif FLAGS.mode == 'compile':
      print(json.dumps(aot.run(config, FLAGS.workdir)))
    else:
      task = registry.get_task(config, FLAGS.workdir)
      result = getattr(task, FLAGS.mode)(FLAGS.workdir)
      print(json.dumps(result, indent=2 if FLAGS.mode == 'evaluate' else None))
  except (errors.UserError, OSError) as e:  # the message says what is wrong and how to fix it
    if not isinstance(e, errors.UserError) and not e.errno:
      raise  # not a file-system error with a cause we can name: keep the traceback
    if created and not isinstance(e, (errors.TrainingError, checkpointing.DiskFullError,
                                      workdir_lock.WorkdirLockedError)):
      workdir_lib.cleanup_if_unused(FLAGS.workdir)  # failed before training: leave nothing
    message = str(e) if isinstance(e, errors.UserError) else workdir_lib.describe_os_error(e)
    logging.error('%s: %s', type(e).__name__, message)
    print(f'error: {message}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and exits 130)
    if created:
      workdir_lib.cleanup_if_unused(FLAGS.workdir)
    print(f'error: interrupted (Ctrl-C) during --mode={FLAGS.mode}; every checkpoint saved '
          'before is kept.', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
