"""One run per workdir: a lock file taken atomically before a run writes anything.

`<workdir>/.lock` holds the holder's host, PID and start time; it is created with O_EXCL (one
of two simultaneous runs wins) and removed on every exit path of the run that took it. A second
run on a locked workdir fails with one line naming the holder. A lock left by a process that is
gone on this host (killed with SIGKILL, a crashed machine's reboot) is reclaimed with a log line;
one held on another host is not (the message says how to clear it). Multi-process runs take it
on process 0 and every process learns the outcome (a broadcast), so all of them stop together.
A gs:// workdir has no atomic create: it is not locked (logged).
"""

import json
import os
import socket
import time

from absl import logging
import jax
import numpy as np

from guidedflow import errors

LOCK_NAME = '.lock'


class WorkdirLockedError(errors.UserError):
  """Another run holds the workdir; the message names it and what to do."""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds <workdir>/.lock for the run (see the module docstring)."""

  def __init__(self, workdir, what):
    self.workdir, self.what = os.fspath(workdir), what
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.held = False

  def __enter__(self):
    message = ''
    if jax.process_index() == 0:
      message = self._acquire()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      failed = multihost_utils.broadcast_one_to_all(np.int32(bool(message)))
      if int(failed) and not message:
        message = f'process 0 could not lock --workdir {self.workdir} (see its log)'
    if message:
      raise WorkdirLockedError(message)
    return self

  def __exit__(self, *exc):
    if self.held:
      try:
        os.unlink(self.path)
      except OSError as e:
        logging.warning('Could not remove the workdir lock %s: %s', self.path, e)
      self.held = False
    return False

  def _acquire(self):
    """Takes the lock; returns '' or the one-line reason it is held by another run."""
    if self.workdir.startswith('gs://'):
      logging.warning('%s is on GCS: it is not locked against a second run.', self.workdir)
      return ''
    for _ in range(2):  # a stale lock is removed once, then taken
      mine = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
              'what': self.what}
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None or not self._stale(holder):
          return self._describe(holder)
        logging.warning('Reclaiming the lock of --workdir %s: its run (PID %s on %s) is gone.',
                        self.workdir, holder.get('pid'), holder.get('host'))
        try:
          os.unlink(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(mine, f)
      self.held = True
      return ''
    return self._describe(self._holder())

  def _holder(self):
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # being written, or unreadable: treated as held

  @staticmethod
  def _stale(holder):
    return holder.get('host') == socket.gethostname() and not _alive(int(holder.get('pid', -1)))

  def _describe(self, holder):
    if holder is None:
      who = 'another run'
    else:
      started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
      who = (f"the {holder.get('what', 'run')} of PID {holder.get('pid')} on host "
             f"{holder.get('host')}, started {started}")
    return (f'--workdir {self.workdir} is in use by {who} ({self.path}): wait for it to end, '
            'use another --workdir, or delete that file if the run is gone.')
