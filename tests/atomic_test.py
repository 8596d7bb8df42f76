"""Outputs are written whole or not at all: a failed write keeps the previous file."""

import errno
import os

import numpy as np
import pytest

from guidedflow import atomic
from guidedflow.tasks import generator


def _disk_full_after(nbytes):
  """A stand-in for np.savez that writes `nbytes` and then meets a full disk."""
  def savez(f, **arrays):
    del arrays
    f.write(b'x' * nbytes)
    raise OSError(errno.ENOSPC, 'No space left on device', getattr(f, 'name', None))
  return savez


def test_failed_samples_write_keeps_the_previous_samples_and_grid(tmp_path, monkeypatch):
  images = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(10), 2).astype(np.int32)
  generator.write_samples(tmp_path, images, labels, 10, ('images', 'labels'))
  before = {name: (tmp_path / name).read_bytes() for name in ('samples.npz', 'grid.png')}
  monkeypatch.setattr(generator.np, 'savez', _disk_full_after(1000))
  with pytest.raises(OSError) as raised:
    generator.write_samples(tmp_path, images[::-1], labels, 10, ('images', 'labels'))
  assert raised.value.filename == os.fspath(tmp_path / 'samples.npz')  # the real path
  assert {name: (tmp_path / name).read_bytes() for name in before} == before
  assert sorted(os.listdir(tmp_path)) == ['grid.png', 'samples.npz']  # no temporary left


def test_write_text_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'sub' / 'result.json'
  atomic.write_text(path, '{"a": 1}')
  assert path.read_text() == '{"a": 1}'
  with pytest.raises(RuntimeError):
    with atomic.open_write(path, 'w') as f:
      f.write('{"a": 2, "half')
      raise RuntimeError('killed mid-write')
  assert path.read_text() == '{"a": 1}' and os.listdir(path.parent) == ['result.json']
  atomic.write_text(path, '{"a": 3}')
  assert path.read_text() == '{"a": 3}'
