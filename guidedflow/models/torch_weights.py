"""Reads and writes PyTorch `.pth` state-dict files without torch.

Both layouts that `torch.save` writes are supported: the zip archive of torch ≥ 1.6
(`<name>/data.pkl` + one raw little-endian storage per tensor in `<name>/data/<key>`) and the
older single-stream format (three header pickles, the state-dict pickle, the list of storage
keys, then each storage as an int64 element count followed by its raw bytes). The pickle is read
by a restricted unpickler that only accepts `collections.OrderedDict`, torch storage classes and
`torch._utils._rebuild_tensor(_v2)` / `_rebuild_parameter`, so a file cannot run code.
`save_state_dict` writes the same formats (tests use it to make weight files without torch).
"""

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32), 'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}


# ----------------------------------------------------------------------------------------------
# Reading: a restricted unpickler that turns tensors into numpy arrays.


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def materialize(self, data: np.ndarray) -> np.ndarray:
    extent = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
    if 0 in self.shape:
      return np.zeros(self.shape, data.dtype)
    if self.offset < 0 or extent >= data.size or min(self.stride, default=0) < 0:
      raise ValueError(f'tensor view out of bounds of storage {self.storage.key}')
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.shape, tuple(s * data.itemsize for s in self.stride))
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into `_TensorRef`s; refuses every other global."""

  _ALLOWED = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  }

  def __init__(self, file, storages: dict[str, _StorageRef] | None = None):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[module, name]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name}: only tensors are read')

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: the same + view_metadata.
    if self._storages is None or not isinstance(pid, tuple) or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError('storage views are not supported')
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unexpected storage type {storage_type!r}')
    ref = _StorageRef(key, _STORAGE_DTYPES[storage_type.name], numel)
    return self._storages.setdefault(key, ref)


def _tensors(result: Any, storage_data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  if not isinstance(result, Mapping):
    raise ValueError(f'expected a state dict (a mapping of tensors), got {type(result).__name__}')
  return {str(k): v.materialize(storage_data[v.storage.key])
          for k, v in result.items() if isinstance(v, _TensorRef)}


def _read_zip(path: str, unpickler) -> tuple[Any, dict[str, np.ndarray]]:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if not pickles:
      raise ValueError('zip archive without <name>/data.pkl')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = '<'
    if prefix + 'byteorder' in names and archive.read(prefix + 'byteorder').strip() == b'big':
      byteorder = '>'
    storages = {}
    with archive.open(pickles[0]) as f:
      result = unpickler(f, storages).load()
    data = {}
    for key, ref in storages.items():
      raw = np.frombuffer(archive.read(f'{prefix}data/{key}'), ref.dtype.newbyteorder(byteorder))
      data[key] = raw.astype(ref.dtype)
  return result, data


def _read_legacy(path: str, unpickler) -> tuple[Any, dict[str, np.ndarray]]:
  with open(path, 'rb') as f:
    if unpickler(f).load() != _LEGACY_MAGIC:
      raise ValueError('not a torch.save file (bad magic number)')
    if unpickler(f).load() != _LEGACY_PROTOCOL:
      raise ValueError('unsupported torch.save protocol version')
    sys_info = unpickler(f).load()
    byteorder = '<' if sys_info.get('little_endian', True) else '>'
    storages = {}
    result = unpickler(f, storages).load()
    data = {}
    for key in unpickler(f).load():
      ref = storages[str(key)]
      (numel,) = struct.unpack(byteorder + 'q', f.read(8))
      raw = f.read(numel * ref.dtype.itemsize)
      if len(raw) != numel * ref.dtype.itemsize:
        raise ValueError(f'file truncated in storage {key}')
      data[str(key)] = np.frombuffer(raw, ref.dtype.newbyteorder(byteorder)).astype(ref.dtype)
  return result, data


# What reading a damaged or foreign file can raise: random bytes parse as pickle opcodes that
# pop an empty stack, ask for more bytes than exist or than an int64 can count.
UNREADABLE = (pickle.UnpicklingError, EOFError, KeyError, IndexError, struct.error,
              zipfile.BadZipFile, AttributeError, TypeError, ValueError, OverflowError,
              MemoryError)


def read_pickle(path: str, unpickler=None) -> tuple[Any, dict[str, np.ndarray]]:
  """(the unpickled top-level object, its storages' data) of a `torch.save` file, zip or
  legacy; `unpickler` (default: the restricted one) decides which classes may appear."""
  unpickler = unpickler or _RestrictedUnpickler
  if zipfile.is_zipfile(path):
    return _read_zip(path, unpickler)
  return _read_legacy(path, unpickler)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict (zip or legacy format) as numpy arrays, without torch.

  Entries that are not tensors are dropped; keys keep the file's order.

  Raises:
    ValueError: the file is not a torch state dict, is truncated, or its pickle asks for
      anything beyond tensors and an `OrderedDict` (it is refused, never executed).
  """
  path = os.fspath(path)
  try:
    return _tensors(*read_pickle(path))
  except UNREADABLE as e:
    raise ValueError(f'{path}: not a readable PyTorch state-dict file ({e}).') from e


# ----------------------------------------------------------------------------------------------
# Writing: the pickle opcodes and archive layout that torch.save emits.


class _PickleWriter:
  """Emits the few pickle (protocol 2) opcodes a torch state dict needs, without torch."""

  def __init__(self):
    self.out = io.BytesIO()
    self.out.write(pickle.PROTO + b'\x02')

  def op(self, code: bytes):
    self.out.write(code)

  def global_(self, module: str, name: str):
    self.out.write(pickle.GLOBAL + f'{module}\n{name}\n'.encode('ascii'))

  def str_(self, s: str):
    data = s.encode('utf-8')
    self.out.write(pickle.BINUNICODE + struct.pack('<I', len(data)) + data)

  def int_(self, i: int):
    if 0 <= i < 2**31:
      self.out.write(pickle.BININT + struct.pack('<i', i))
    else:
      self.out.write(pickle.LONG1 + bytes([8]) + struct.pack('<q', i))

  def int_tuple(self, values: tuple[int, ...]):
    self.op(pickle.MARK)
    for v in values:
      self.int_(int(v))
    self.op(pickle.TUPLE)

  def empty_ordered_dict(self):
    self.global_('collections', 'OrderedDict')
    self.op(pickle.EMPTY_TUPLE + pickle.REDUCE)

  def finish(self) -> bytes:
    self.op(pickle.STOP)
    return self.out.getvalue()


def _state_dict_pickle(tensors: list[tuple[str, np.ndarray]], legacy: bool) -> bytes:
  writer = _PickleWriter()
  writer.empty_ordered_dict()
  writer.op(pickle.MARK)
  for key, (name, array) in enumerate(tensors):
    writer.str_(name)
    writer.global_('torch._utils', '_rebuild_tensor_v2')
    writer.op(pickle.MARK)
    writer.op(pickle.MARK)  # persistent id: ('storage', type, key, location, numel[, view])
    writer.str_('storage')
    writer.global_('torch', _storage_name(array.dtype))
    writer.str_(str(key))
    writer.str_('cpu')
    writer.int_(array.size)
    if legacy:
      writer.op(pickle.NONE)
    writer.op(pickle.TUPLE + pickle.BINPERSID)
    writer.int_(0)  # storage offset
    writer.int_tuple(array.shape)
    writer.int_tuple(tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)))
    writer.op(pickle.NEWFALSE)  # requires_grad
    writer.empty_ordered_dict()  # backward hooks
    writer.op(pickle.TUPLE + pickle.REDUCE)
  writer.op(pickle.SETITEMS)
  return writer.finish()


def _storage_name(dtype: np.dtype) -> str:
  for name, storage_dtype in _STORAGE_DTYPES.items():
    if storage_dtype == dtype:
      return name
  raise ValueError(f'no torch storage type for dtype {dtype}')


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                    legacy_format: bool = False) -> None:
  """Writes `state_dict` as `torch.save(state_dict, path)` would, without torch.

  The default is torch ≥ 1.6's zip archive: `<stem>/data.pkl`, `<stem>/byteorder`,
  `<stem>/data/<i>` (raw little-endian, uncompressed, 64-byte aligned like torch's writer) and
  `<stem>/version`. `legacy_format=True` writes the pre-1.6 single-stream format instead.
  """
  path = os.fspath(path)
  tensors = [(str(k), np.asarray(v, order='C')) for k, v in state_dict.items()]
  tensors = [(k, v.astype(v.dtype.newbyteorder('<'))) for k, v in tensors]
  pickled = _state_dict_pickle(tensors, legacy_format)
  if legacy_format:
    with open(path, 'wb') as f:
      sys_info = dict(protocol_version=_LEGACY_PROTOCOL, little_endian=True,
                      type_sizes=dict(short=2, int=4, long=4))
      for header in (_LEGACY_MAGIC, _LEGACY_PROTOCOL, sys_info):
        pickle.dump(header, f, protocol=2)
      f.write(pickled)
      pickle.dump([str(i) for i in range(len(tensors))], f, protocol=2)
      for _, array in tensors:
        f.write(struct.pack('<q', array.size) + array.tobytes())
    return
  stem = os.path.basename(path).split('.')[0] or 'archive'
  records = [('data.pkl', pickled), ('byteorder', b'little')]
  records += [(f'data/{i}', array.tobytes()) for i, (_, array) in enumerate(tensors)]
  records.append(('version', b'3\n'))
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    for name, data in records:
      info = zipfile.ZipInfo(f'{stem}/{name}', date_time=(1980, 1, 1, 0, 0, 0))
      header_end = archive.fp.tell() + 30 + len(info.filename.encode('utf-8')) + 4
      padding = -header_end % 64
      info.extra = struct.pack('<HH', 0x4246, padding) + b'Z' * padding  # 'FB' padding field
      archive.writestr(info, data)
