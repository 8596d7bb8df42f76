"""Workdir files (PNGs, JSON, reference statistics, figures) on gs:// go through etils.epath.

A Cloud TPU run keeps its workdir in a bucket. Orbax writes the checkpoints there itself
(tensorstore); everything else guidedflow writes must not land in a local folder called `gs:`.
The test registers an in-memory fsspec filesystem as `gcs` (what epath uses for gs:// without
TensorFlow), so nothing touches the network.
"""

import io
import json

from etils import epath
import fsspec
from fsspec.implementations import memory
import numpy as np
from PIL import Image
import pytest

from guidedflow import evaluate
from guidedflow import evaluation
from guidedflow import images


class _FakeGCS(memory.MemoryFileSystem):
  protocol = ('gcs', 'gs')
  store = {}  # pylint: disable=dangerous-default-value  (class-level, like MemoryFileSystem)
  pseudo_dirs = ['']


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  fsspec.register_implementation('gcs', _FakeGCS, clobber=True)
  fsspec.register_implementation('gs', _FakeGCS, clobber=True)
  _FakeGCS.store.clear()
  monkeypatch.chdir(tmp_path)  # a wrong os.path write would create ./gs:/... here
  yield 'gs://bucket/run'
  assert not (tmp_path / 'gs:').exists()


def test_png_json_and_figure_go_to_the_bucket(bucket):
  grid = np.arange(6 * 4 * 1, dtype=np.uint8).reshape(6, 4, 1) * 10
  images.save_png(f'{bucket}/samples/grid_latest.png', grid, upscale=2)
  png = epath.Path(f'{bucket}/samples/grid_latest.png').read_bytes()
  back = np.asarray(Image.open(io.BytesIO(png)))
  np.testing.assert_array_equal(back, grid[..., 0].repeat(2, 0).repeat(2, 1))

  evaluate._write(f'{bucket}/eval/evaluate.json', json.dumps({'fd': 1.5}))
  assert json.loads(epath.Path(f'{bucket}/eval/evaluate.json').read_text()) == {'fd': 1.5}

  rows = [dict(guidance_scale=w, fd=10.0 / w, precision=0.8, recall=0.9 - 0.1 * w,
               density=1.0, coverage=0.7, accuracy=0.9) for w in (1.0, 2.0)]
  evaluate._plot(f'{bucket}/eval/guidance_sweep.png', rows, 'guidance_scale', 'w', 'title')
  assert epath.Path(f'{bucket}/eval/guidance_sweep.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert sorted(p.name for p in epath.Path(f'{bucket}/eval').iterdir()) == [
      'evaluate.json', 'guidance_sweep.png']


def test_reference_statistics_round_trip_in_the_bucket(bucket):
  features = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
  path = f'{bucket}/eval/reference_test_net_50.npz'
  meta = {'dataset': 'fashion_mnist', 'num_images': 50}
  evaluation.save_reference(path, features=features, labels=np.arange(50) % 10, meta=meta)
  loaded = evaluation.load_reference(path, expect_meta=meta)
  np.testing.assert_array_equal(loaded['features'], features)
  np.testing.assert_allclose(loaded['mu'], features.mean(0), rtol=1e-5)
  assert [p.name for p in epath.Path(f'{bucket}/eval').iterdir()] == [
      'reference_test_net_50.npz']  # the temporary file was renamed, not left behind
  with pytest.raises(evaluation.ReferenceMismatchError):
    evaluation.load_reference(path, expect_meta={**meta, 'num_images': 60})
