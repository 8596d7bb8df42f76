"""Whether a saved state tree fits the model being restored, and the message when it does not.

Compares leaf paths, shapes and dtypes of a checkpoint's metadata with the abstract state of
the model; the error names the first parameter that differs and the fix (including the one
known layout change: DiT blocks saved one per block vs stacked for nnx.scan).
"""

import re
from typing import Any

import jax
import numpy as np

from guidedflow import checksums
from guidedflow import errors


class CheckpointMismatchError(errors.UserError, ValueError):
  """The checkpoint's state tree, shapes or dtypes differ from the model being restored."""


def flat_by_path(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(checksums.key_name(k) for k in path): leaf for path, leaf in leaves}


def shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  dtype = getattr(leaf, 'dtype', None)
  return tuple(np.shape(leaf)), np.dtype(np.asarray(leaf).dtype if dtype is None else dtype)


def _describe(leaf: Any) -> str:
  shape, dtype = shape_dtype(leaf)
  return f'{shape} {dtype.name}'


_NUMBERED_BLOCK = re.compile(r'(^|/)blocks/\d+/')


def _block_layout_fix(saved: dict, expected: dict) -> str | None:
  """The fix when the trees differ only in the DiT block layout — one subtree per block
  ('blocks/0/...', `scan_blocks=False`) vs blocks stacked on a leading axis ('blocks/...')."""
  def merged(paths):
    return {_NUMBERED_BLOCK.sub(r'\1blocks/', path) for path in paths}

  saved_numbered = any(_NUMBERED_BLOCK.search(path) for path in saved)
  if saved_numbered == any(_NUMBERED_BLOCK.search(path) for path in expected):
    return None
  if merged(saved) != merged(expected):
    return None
  if saved_numbered:
    return ("its DiT blocks are saved one per block ('blocks/0/...', the layout before scanned "
            'blocks became the default) but the model stacks them for nnx.scan. Restore it with '
            '--config.model.scan_blocks=false (same model, same results).')
  return ("its DiT blocks are stacked for nnx.scan ('blocks/...' with a leading layer axis) but "
          'the model has one module per block. Restore it with --config.model.scan_blocks=true.')


def check_matches(saved: dict[str, Any], abstract_state: Any, where: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter whose path, shape or dtype in
  `saved` (leaves by path, from the checkpoint's metadata) differs from `abstract_state`;
  `where` names the checkpoint in the message."""
  expected = flat_by_path(abstract_state)
  fix = ('The checkpoint was written by a different model/optimizer config. Restore with the '
         'config it was trained with (saved in the checkpoint) or use another --workdir.')
  layout_fix = _block_layout_fix(saved, expected)
  if layout_fix:
    raise CheckpointMismatchError(f'{where}: {layout_fix}')
  for path, want in expected.items():
    if path not in saved:
      raise CheckpointMismatchError(f'{where} has no parameter {path!r} that the model '
                                    f'expects ({_describe(want)}). {fix}')
    have = saved[path]
    if shape_dtype(have) != shape_dtype(want):
      raise CheckpointMismatchError(
          f'{where}: parameter {path!r} was saved as {_describe(have)} but the model '
          f'expects {_describe(want)}. {fix}')
  extra = [path for path in saved if path not in expected]
  if extra:
    raise CheckpointMismatchError(f'{where} holds parameter {extra[0]!r} '
                                  f'({_describe(saved[extra[0]])}) that the model does not '
                                  f'have ({len(extra)} such). {fix}')
