"""Reads and writes `torch.save` checkpoints that wrap a state dict, without torch.

Training frameworks (PyTorch Lightning, the original LDM/Stable Diffusion `.ckpt` files) save
`{'state_dict': {...}, 'global_step': ..., 'callbacks': ..., ...}` rather than a bare state dict,
and their pickles name classes beyond tensors (`pytorch_lightning....ModelCheckpoint`, numpy
scalars). `read_checkpoint` uses the restricted unpickler of `torch_weights` for tensors and
storages and turns every other global into an inert placeholder (nothing is imported or run),
then returns the tensors of the `state_dict` entry, or of the top level for a bare state dict.
Both `torch.save` formats are read: the zip archive (torch ≥ 1.6) and the single-stream one.
"""
# pylint: disable=protected-access  # the pickle pieces of torch_weights are shared here

import os
import pickle
import struct
from typing import Any, Mapping

import numpy as np

from guidedflow.models import torch_weights


class _Opaque:
  """Stands in for any non-tensor object of a checkpoint; nothing is imported or run."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


class _CheckpointUnpickler(torch_weights._RestrictedUnpickler):
  def find_class(self, module, name):
    try:
      return super().find_class(module, name)
    except pickle.UnpicklingError:
      return _Opaque


def _torch_pickle(path: str) -> tuple[Any, dict[str, np.ndarray]]:
  """The unpickled top-level object of a `torch.save` file and its storages' data."""
  return torch_weights.read_pickle(path, _CheckpointUnpickler)


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a `torch.save` file: a state dict, or a checkpoint's `state_dict` entry.

  Raises:
    ValueError: the file is not a readable torch pickle or holds no tensors.
  """
  path = os.fspath(path)
  try:
    result, data = _torch_pickle(path)
  except torch_weights.UNREADABLE as e:
    raise ValueError(f'{path}: not a readable PyTorch checkpoint ({e}).') from e
  if isinstance(result, Mapping) and isinstance(result.get('state_dict'), Mapping):
    result = result['state_dict']
  tensor = torch_weights._TensorRef
  if not isinstance(result, Mapping) or not any(isinstance(v, tensor) for v in result.values()):
    raise ValueError(f'{path}: no tensors in the PyTorch file (neither a state dict nor a '
                     "checkpoint with a 'state_dict').")
  return {str(k): v.materialize(data[v.storage.key])
          for k, v in result.items() if isinstance(v, tensor)}


def _string(text: str) -> bytes:
  data = text.encode('utf-8')
  return pickle.BINUNICODE + struct.pack('<I', len(data)) + data


def save_checkpoint(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes `{'state_dict': state_dict, 'global_step': 0, 'callbacks': {ModelCheckpoint: {}},
  'hyper_parameters': argparse.Namespace()}` as `torch.save` did before 1.6 (single stream),
  like the original LDM checkpoints; the two non-tensor entries name classes that a reader
  must not import (tests use this to check that `read_checkpoint` does not).
  """
  tensors = [(str(k), np.asarray(v, order='C')) for k, v in state_dict.items()]
  tensors = [(k, v.astype(v.dtype.newbyteorder('<'))) for k, v in tensors]
  inner = torch_weights._state_dict_pickle(tensors, True)[2:-1]  # without PROTO and STOP
  callback = pickle.GLOBAL + b'pytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n'
  namespace = (pickle.GLOBAL + b'argparse\nNamespace\n' + pickle.EMPTY_TUPLE + pickle.REDUCE
               + pickle.EMPTY_DICT + _string('lr') + pickle.BININT1 + b'\1' + pickle.SETITEM
               + pickle.BUILD)
  entries = (_string('state_dict') + inner + _string('global_step') + pickle.BININT1 + b'\0'
             + _string('callbacks') + pickle.EMPTY_DICT + callback + pickle.EMPTY_DICT
             + pickle.SETITEM + _string('hyper_parameters') + namespace)
  pickled = pickle.PROTO + b'\x02' + pickle.EMPTY_DICT + pickle.MARK + entries + pickle.SETITEMS
  with open(path, 'wb') as f:
    sys_info = dict(protocol_version=torch_weights._LEGACY_PROTOCOL, little_endian=True,
                    type_sizes=dict(short=2, int=4, long=4))
    for header in (torch_weights._LEGACY_MAGIC, torch_weights._LEGACY_PROTOCOL, sys_info):
      pickle.dump(header, f, protocol=2)
    f.write(pickled + pickle.STOP)
    pickle.dump([str(i) for i in range(len(tensors))], f, protocol=2)
    for _, array in tensors:
      f.write(struct.pack('<q', array.size) + array.tobytes())
