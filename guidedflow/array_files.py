"""Arrays written once as `.npy` files and read many times by memory map: the files of the
latent cache and the text cache.

Writing (`open_rows`, `finish`): each array is a memory-mapped `<name>.tmp` filled row by row
(RAM does not grow with it) whose blocks are reserved up front (`posix_fallocate`: a full disk
is an OSError at the start, not a SIGBUS at the first write into a page past its end); `finish`
flushes, renames each into place and writes a checksums file (size and CRC-32 of each,
`checksums.file_record`). A cache writes its own meta.json after that, last: a cache with one
is complete.

Reading (`verify`, `load`, `read_json`): every file is checked against its checksums when the
cache is opened; a truncated, replaced or changed file, or JSON that does not parse, is a
`DataError` of one line naming the file and the fix. A cache written before checksums is read
unverified, with a warning.
"""

import json
import os
import time

from absl import logging
from etils import epath
import numpy as np

from guidedflow import atomic
from guidedflow import checksums
from guidedflow import errors


def damaged(what, directory, name, why):
  """The one-line error of a damaged file `name` of the `what` ('latent cache', ...)."""
  return errors.DataError(
      f'the {what} file {epath.Path(directory) / name} is damaged: {why}. Delete {directory} '
      'and run the same command again (or --mode=encode with this config) to encode it again.')


def differences(meta, expected, keys):
  """'key saved (this config: wanted)' for each of `keys` where a cache's meta.json and what
  the config asks for differ (a cache of other contents is refused, never overwritten)."""
  return [f'{key} {meta.get(key)!r} (this config: {expected[key]!r})' for key in keys
          if meta.get(key) != expected[key]]


def open_rows(directory, name, shape, dtype):
  """A writable memory map of a new `<directory>/<name>.tmp` .npy file of `shape`, its blocks
  reserved."""
  path = os.fspath(epath.Path(directory) / (name + '.tmp'))
  array = np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=tuple(shape))
  if hasattr(os, 'posix_fallocate'):
    with open(path, 'r+b') as f:
      os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
  return array


def finish(directory, arrays, checksums_name):
  """Flushes `arrays` ({name: map from `open_rows`}), renames them into place, and writes
  their checksums to `checksums_name`."""
  directory = epath.Path(directory)
  records = {}
  for name, array in arrays.items():
    array.flush()
    (directory / (name + '.tmp')).rename(directory / name)
    records[name] = checksums.file_record(os.fspath(directory / name))
  atomic.write_text(directory / checksums_name,
                    json.dumps({'algorithm': checksums.FILE_ALGORITHM, 'files': records},
                               indent=2))


def read_json(what, directory, name):
  """The JSON file `name` (None if absent); unparsable → `damaged`."""
  path = epath.Path(directory) / name
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except ValueError as e:  # also UnicodeDecodeError: random bytes
    raise damaged(what, directory, name, f'it is not JSON ({errors.one_line(e)})') from e


def verify(what, directory, checksums_name, names):
  """Checks files `names` against `checksums_name`; a missing checksums file (a cache written
  before them) or another algorithm is read unverified with a warning."""
  directory = epath.Path(directory)
  records = read_json(what, directory, checksums_name)
  if records is None:
    logging.warning('The %s %s has no %s (written before caches were checksummed): reading it '
                    'unverified; delete it to encode it again with checksums.', what, directory,
                    checksums_name)
    return
  if records.get('algorithm') != checksums.FILE_ALGORITHM:
    logging.warning('The %s %s was checksummed with %s, not %s: reading it unverified.', what,
                    directory, records.get('algorithm'), checksums.FILE_ALGORITHM)
    return
  t0 = time.time()
  for name in names:
    if name not in records['files']:
      raise damaged(what, directory, checksums_name, f'it lists no {name}')
    why = checksums.file_damage(os.fspath(directory / name), records['files'][name])
    if why:
      raise damaged(what, directory, name, why)
  logging.info('%s %s: %s verified (%.1f MB in %.1f s).', what.capitalize(), directory,
               ', '.join(names), sum(records['files'][n]['bytes'] for n in names) / 1e6,
               time.time() - t0)


def load(what, directory, name):
  """Read-only memory map of `<directory>/<name>` (.npy)."""
  path = epath.Path(directory) / name
  try:
    return np.load(os.fspath(path), mmap_mode='r')
  except (ValueError, OSError) as e:  # checksums matched, or a cache written before them
    raise damaged(what, directory, name, f'numpy cannot read it ({e})') from e
