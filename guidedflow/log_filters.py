"""What the command line logs: libraries' chatter and their background threads' tracebacks
trimmed to the line that matters (the run's own error says what to do)."""

import errno
import logging as pylogging
import threading

from absl import logging


class QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax (dozens of lines per save) and JAX's backend probing
  ("Unable to initialize backend 'tpu'" on every machine without one); keeps warnings/errors."""

  def filter(self, record):
    if '/orbax/' in record.pathname and record.exc_info:
      # An error of orbax's writer threads (a full disk) reaches the save that waits on them,
      # which says what went wrong in one line: keep orbax's line, not its traceback.
      record.exc_info, record.exc_text = None, None
    if record.levelno >= pylogging.WARNING:
      return True
    return not ('/orbax/' in record.pathname or record.pathname.endswith('xla_bridge.py'))


def thread_error_hook(default):
  """threading.excepthook: a background writer (TensorBoard's event thread) that meets a full
  disk logs one line instead of a traceback; the run's next write stops it with one error."""

  def hook(args):
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC,
                                                                         errno.EDQUOT):
      logging.error('The background writer %s (%s) stopped: %s; what it would write after '
                    'this is lost.', type(args.thread).__module__,
                    getattr(args.thread, 'name', '?'), args.exc_value)
      return
    default(args)

  return hook


def install():
  """Adds `QuietLibraries` to absl's handler and `thread_error_hook` as threading.excepthook."""
  logging.get_absl_handler().addFilter(QuietLibraries())
  threading.excepthook = thread_error_hook(threading.excepthook)
