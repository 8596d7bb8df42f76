"""Tests for guidedflow.models.torch_weights: `.pth` round trips, layout and unsafe pickles."""

import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from guidedflow.models import torch_weights


def _mixed_state_dict():
  rng = np.random.default_rng(0)
  return {
      'conv.weight': rng.standard_normal((4, 3, 3, 3), dtype=np.float32),
      'transposed': np.asfortranarray(rng.standard_normal((5, 7))),  # written C-contiguous
      'big_endian': rng.standard_normal((6,)).astype('>f8'),  # written little-endian
      'half': rng.standard_normal((2, 3)).astype(np.float16),
      'bf16': rng.standard_normal((8,)).astype(ml_dtypes.bfloat16),
      'num_batches_tracked': np.array(12345678901, np.int64),  # scalar, needs LONG1
      'mask': rng.integers(0, 2, (3, 2)).astype(np.bool_),
      'empty': np.zeros((0, 4), np.int32),
  }


@pytest.mark.parametrize('legacy_format', [False, True])
def test_round_trip_keeps_order_dtypes_shapes_and_values(tmp_path, legacy_format):
  state_dict = _mixed_state_dict()
  path = tmp_path / 'mixed.pth'
  torch_weights.save_state_dict(state_dict, path, legacy_format=legacy_format)
  assert zipfile.is_zipfile(path) != legacy_format
  loaded = torch_weights.read_state_dict(path)
  assert list(loaded) == list(state_dict)
  for name, value in state_dict.items():
    assert loaded[name].dtype == value.dtype.newbyteorder('='), name
    assert loaded[name].shape == value.shape, name
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_zip_storages_are_64_byte_aligned_like_torch(tmp_path):
  path = tmp_path / 'aligned.pth'
  torch_weights.save_state_dict(_mixed_state_dict(), path)
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    assert names[0] == 'aligned/data.pkl' and names[-1] == 'aligned/version'
    for info in archive.infolist():
      if '/data/' not in info.filename:
        continue
      # Local header: 30 fixed bytes, then the name and extra field, whose lengths it records.
      name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26:][:4])
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def _unsafe_pickle():
  """A pickle that would call os.system('true') if it were unpickled normally."""
  return (pickle.PROTO + b'\x02' + pickle.GLOBAL + b'os\nsystem\n' + pickle.MARK
          + pickle.BINUNICODE + b'\x04\x00\x00\x00true' + pickle.TUPLE + pickle.REDUCE
          + pickle.STOP)


@pytest.mark.parametrize('legacy_format', [False, True])
def test_unsafe_pickle_is_refused_not_executed(tmp_path, legacy_format):
  path = tmp_path / 'unsafe.pth'
  if legacy_format:
    path.write_bytes(_unsafe_pickle())
  else:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive:
      archive.writestr('unsafe/data.pkl', _unsafe_pickle())
    path.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match='not a readable PyTorch.*refusing to load os.system'):
    torch_weights.read_state_dict(path)


def test_truncated_legacy_file_is_a_value_error(tmp_path):
  path = tmp_path / 'truncated.pth'
  torch_weights.save_state_dict({'w': np.ones((64,), np.float32)}, path, legacy_format=True)
  path.write_bytes(path.read_bytes()[:-16])
  with pytest.raises(ValueError, match='file truncated in storage 0'):
    torch_weights.read_state_dict(path)


def test_dtype_without_torch_storage_is_rejected(tmp_path):
  with pytest.raises(ValueError, match='no torch storage type for dtype complex64'):
    torch_weights.save_state_dict({'z': np.zeros(2, np.complex64)}, tmp_path / 'complex.pth')


@pytest.mark.parametrize('garbage', [
    b'\x80\x05\x96' + b'\xff' * 8,  # BYTEARRAY8 of 2^64 − 1 bytes: OverflowError in pickle
    b'\x80\x05' + b'0',             # POP on an empty stack
    b'\x80\x05\x94.',               # MEMOIZE on an empty stack
], ids=['huge-length', 'pop-empty', 'memoize-empty'])
def test_random_bytes_that_parse_as_pickle_are_a_value_error(tmp_path, garbage):
  """Random bytes (the inception test's os.urandom file) can start with any pickle opcode:
  whatever pickle raises for them is the one 'not a readable' ValueError."""
  path = tmp_path / 'garbage.pth'
  path.write_bytes(garbage)
  with pytest.raises(ValueError, match='not a readable PyTorch state-dict'):
    torch_weights.read_state_dict(path)
