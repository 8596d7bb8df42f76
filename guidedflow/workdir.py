"""The workdir checked before anything is compiled, and file-system errors as one line.

`prepare(workdir, mode)` makes sure the workdir is a directory this process can write (a write
probe), so that a regular file, a path under /proc, a read-only mount or a missing directory
for sampling fails at start-up with the path and the problem, not after minutes of compiling,
training or sampling. `cleanup_if_unused` removes a workdir this run created when the run fails
before it saved a checkpoint (a typo in the config leaves nothing behind). `describe_os_error`
turns OSError (also a full disk or read-only file system met later, at save time) into one line.
"""

import errno
import os

from absl import logging
from etils import epath
import jax

from guidedflow import errors


# The folders a run writes inside its workdir: probed at start-up when an earlier run made them.
RUN_FOLDERS = ('checkpoints', 'samples', 'eval', 'tensorboard', 'latent_cache')


class WorkdirError(errors.UserError, OSError):
  """The workdir cannot be used; the message names the path, the problem and the fix."""


_FIXES = {
    errno.EROFS: 'the file system is mounted read-only: use a --workdir on a writable disk',
    errno.EACCES: 'permission denied: use a --workdir you can write, or fix its permissions',
    errno.EPERM: 'operation not permitted: use a --workdir you can write',
    errno.ENOSPC: 'the disk is full: free space on it or use a --workdir on another disk',
    errno.EDQUOT: 'the disk quota is exceeded: free space or use a --workdir on another disk',
    errno.ENOTDIR: 'a part of the path is a file, not a directory: choose another --workdir',
    errno.ENOENT: 'it cannot be created there (no such directory, or a pseudo file system such '
                  'as /proc): choose a --workdir on a real disk',
}


def is_disk_full(error):
  """Whether `error` or an error it was raised from is a full disk (ENOSPC, EDQUOT, or
  tensorstore's RESOURCE_EXHAUSTED 'No space left on device')."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if getattr(error, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(error) or "os_error_code='28'" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


_DISK_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def describe_os_error(error, what=None):
  """One line: the path, what went wrong and the fix. `what`: '--workdir' for the workdir
  itself (every fix applies); None for a file met later (only the disk's fixes)."""
  path = error.filename or '?'
  if what is None and error.errno not in _DISK_ERRNOS:
    fix = 'check that path'
  else:
    fix = _FIXES.get(error.errno, 'check the path and its disk')
  prefix = f'{what} {path}' if what else path
  return f'{prefix}: {error.strerror or error} ([Errno {error.errno}]); {fix}.'


def prepare(workdir, mode):
  """Checks (and for training creates) `workdir` before any compile; returns whether this call
  created it.

  Args:
    workdir: local path or gs://.
    mode: 'train', 'compile' or 'encode' (created if missing: they write a run's first files)
      or another mode of guidedflow.main (must exist: it holds the checkpoints to sample or
      evaluate; outputs are written into it, so it must be writable too).

  Raises:
    WorkdirError: not a directory, cannot be created, or not writable; one line with the fix.
    CheckpointNotFoundError: sample or evaluate on a workdir that does not exist.
  """
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'--workdir {workdir} is a file, not a directory: give a directory (it '
                       'is created when missing).')
  created = False
  if not path.exists():
    if mode not in ('train', 'compile', 'encode'):  # these write a run's first files
      raise errors.CheckpointNotFoundError(
          f'No checkpoint to {mode}: --workdir {workdir} does not exist. Train first: '
          f'python -m guidedflow.main --config <config> --workdir {workdir}')
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise WorkdirError(describe_os_error(_with_path(e, workdir), '--workdir')) from e
    created = True
  if jax.process_index() == 0:  # one probe per workdir (gs:// or a shared disk)
    _probe_writable(path, '--workdir')
    for sub in RUN_FOLDERS:  # a folder of an earlier run, e.g. a read-only checkpoints/ mount
      if (path / sub).is_dir():
        _probe_writable(path / sub, 'the run folder')
  return created


def _with_path(error, path):
  if not error.filename:
    error.filename = os.fspath(path)
  return error


def _probe_writable(path, what):
  probe = path / f'.write_probe.{os.getpid()}'
  try:
    probe.write_text('guidedflow checks that it can write here\n')
    probe.unlink()
  except OSError as e:
    e.filename = os.fspath(path)  # the folder, not the probe file's name
    raise WorkdirError(describe_os_error(e, what)) from e


def cleanup_if_unused(workdir):
  """Removes `workdir` (created by this run, which failed) when no checkpoint was saved in it:
  a run that stopped on a config or data error leaves no empty workdir behind."""
  path = epath.Path(workdir)
  checkpoints = path / 'checkpoints'
  if jax.process_index() != 0 or not path.is_dir():
    return
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    return
  try:
    path.rmtree()
  except OSError as e:
    logging.warning('Could not remove the unused workdir %s: %s', workdir, e)
