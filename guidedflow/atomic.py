"""Files written whole or not at all: into a temporary file beside the target, then renamed.

A full disk, a quota, a kill or a Ctrl-C during a write leaves the previous file intact (and no
half-written one under its name); the OSError raised names the real path, not the temporary's.
Local paths and gs:// alike (etils.epath; a rename within one folder).
"""

import contextlib
import os

from etils import epath


@contextlib.contextmanager
def open_write(path, mode='wb'):
  """`with open_write(path) as f:` writes `path` atomically (the folder is created)."""
  path = epath.Path(path)
  temporary = path.parent / f'.{path.name}.tmp{os.getpid()}'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary.open(mode) as f:
      yield f
    temporary.replace(path)
  except OSError as e:
    if e.filename is None or str(temporary) in str(e.filename):
      e.filename = os.fspath(path)
    raise
  finally:
    if temporary.exists():
      temporary.unlink()


def write_bytes(path, data):
  with open_write(path, 'wb') as f:
    f.write(data)


def write_text(path, text):
  with open_write(path, 'w') as f:
    f.write(text)
