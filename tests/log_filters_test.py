"""The command line's log trimming: orbax's writer-thread tracebacks become their one line, and a
background writer that meets a full disk logs one line instead of a traceback (reproduced on a
small tmpfs: orbax's two tracebacks at a checkpoint, tensorboardX's at the final grid)."""

import errno
import logging
import sys
import threading

from guidedflow import log_filters


def _record(pathname, level, exc_info=None):
  return logging.LogRecord('absl', level, pathname, 1, 'raised: %s', ('x',), exc_info)


def test_orbax_errors_keep_their_line_without_the_traceback():
  try:
    raise OSError(errno.ENOSPC, 'No space left on device')
  except OSError:
    exc_info = sys.exc_info()
  quiet = log_filters.QuietLibraries()
  record = _record('/v/site-packages/orbax/checkpoint/_src/futures/future.py', logging.ERROR,
                   exc_info)
  assert quiet.filter(record) and record.exc_info is None
  formatted = logging.Formatter().format(record)
  assert formatted == 'raised: x' and 'Traceback' not in formatted
  ours = _record('/repo/guidedflow/train.py', logging.ERROR, exc_info)  # ours keep theirs
  assert quiet.filter(ours) and ours.exc_info is exc_info
  assert not quiet.filter(_record('/v/orbax/checkpoint/x.py', logging.INFO))
  assert not quiet.filter(_record('/v/jax/_src/xla_bridge.py', logging.INFO))
  assert quiet.filter(_record('/v/orbax/checkpoint/x.py', logging.WARNING))


def test_a_thread_that_meets_a_full_disk_logs_one_line(caplog):
  passed_on = []
  hook = log_filters.thread_error_hook(passed_on.append)

  def run(error):
    thread = threading.Thread(target=lambda: None, name='writer')
    hook(threading.ExceptHookArgs((type(error), error, None, thread)))

  with caplog.at_level(logging.ERROR):
    run(OSError(errno.ENOSPC, 'No space left on device'))
  assert not passed_on
  assert any('writer' in r.getMessage() and 'No space left' in r.getMessage()
             for r in caplog.records)
  run(OSError(errno.EACCES, 'Permission denied'))  # anything else: the default hook
  run(ValueError('bug'))
  assert [type(args.exc_value) for args in passed_on] == [PermissionError, ValueError]
