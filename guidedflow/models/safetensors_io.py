"""Reads and writes `.safetensors` files with numpy only (no `safetensors` package).

The format: an 8-byte little-endian unsigned header length N, then N bytes of UTF-8 JSON
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}` with an optional
`"__metadata__"` mapping of strings to strings, then the tensors' raw little-endian bytes, each
at `8 + N + begin` up to `8 + N + end`. Nothing in the file is executed; offsets and sizes are
checked against the file before any tensor is read.
"""

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

METADATA_KEY = '__metadata__'
_DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'),
    'I16': np.dtype('<i2'), 'I8': np.dtype('i1'), 'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_MAX_HEADER = 100 << 20


def is_safetensors(path: str | os.PathLike) -> bool:
  """Whether the file starts like a safetensors file (a plausible header length, then `{`)."""
  with open(path, 'rb') as f:
    head = f.read(9)
    size = os.fstat(f.fileno()).st_size
  if len(head) < 9:
    return False
  (length,) = struct.unpack('<Q', head[:8])
  return 2 <= length <= min(size - 8, _MAX_HEADER) and head[8:9] == b'{'


def _read_header(f, size: int, path: str) -> tuple[dict, int]:
  raw = f.read(8)
  if len(raw) != 8:
    raise ValueError(f'{path}: not a safetensors file (shorter than 8 bytes).')
  (length,) = struct.unpack('<Q', raw)
  if length > min(size - 8, _MAX_HEADER):
    raise ValueError(f'{path}: not a safetensors file (header length {length}, file {size} B).')
  try:
    header = json.loads(f.read(length).decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not a safetensors file (bad JSON header: {e}).') from e
  if not isinstance(header, dict):
    raise ValueError(f'{path}: safetensors header is not a JSON object.')
  return header, 8 + length


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
  """The header's `__metadata__` (strings to strings; empty if the file has none)."""
  path = os.fspath(path)
  with open(path, 'rb') as f:
    header, _ = _read_header(f, os.fstat(f.fileno()).st_size, path)
  metadata = header.get(METADATA_KEY) or {}
  return {str(k): str(v) for k, v in metadata.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of the file as a numpy array (native byte order), in the header's order.

  Raises:
    ValueError: the file is not safetensors, names an unknown dtype, or a tensor's offsets do
      not match its shape or lie outside the file.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    header, start = _read_header(f, size, path)
    data = f.read()
  tensors = {}
  for name, info in header.items():
    if name == METADATA_KEY:
      continue
    try:
      dtype, shape = _DTYPES[info['dtype']], tuple(int(d) for d in info['shape'])
      begin, end = (int(o) for o in info['data_offsets'])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: bad safetensors entry for '{name}': {info!r} ({e}).") from e
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end <= len(data) or end - begin != nbytes:
      raise ValueError(f"{path}: tensor '{name}' ({info['dtype']}, {list(shape)}) has offsets "
                       f'[{begin}, {end}] that do not fit it or the file ({len(data)} data B).')
    array = np.frombuffer(data, dtype, count=nbytes // dtype.itemsize, offset=begin)
    tensors[name] = array.reshape(shape).astype(dtype.newbyteorder('='), copy=False)
  return tensors


def _dtype_name(dtype: np.dtype) -> str:
  for name, candidate in _DTYPES.items():
    if candidate == dtype.newbyteorder('<') or candidate == dtype:
      return name
  raise ValueError(f'safetensors has no dtype for {dtype}')


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name → array) as a safetensors file, with optional string metadata.

  Tensors are stored in the mapping's order, C-contiguous and little-endian; the header is
  padded with spaces to a multiple of 8 bytes, as the reference writer does.
  """
  header, chunks, offset = {}, [], 0
  if metadata:
    header[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
  for name, value in tensors.items():
    array = np.asarray(value, order='C')
    array = array.astype(array.dtype.newbyteorder('<'), copy=False)
    data = array.tobytes()
    header[str(name)] = dict(dtype=_dtype_name(array.dtype), shape=list(array.shape),
                             data_offsets=[offset, offset + len(data)])
    chunks.append(data)
    offset += len(data)
  encoded = json.dumps(header, separators=(',', ':')).encode('utf-8')
  encoded += b' ' * (-len(encoded) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)) + encoded)
    for data in chunks:
      f.write(data)
