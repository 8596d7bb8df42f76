"""Orbax checkpoints of the training state, the data-iterator state and the config; preemption.

A checkpoint step holds three items: `state` (a pytree of arrays: model, EMA and optimizer
states, saved with `StandardSave`), `data` (the `BatchIterator` state, JSON) and `config`
(JSON). Orbax writes each step into a temporary directory and renames it when complete, and
deletes old steps only after a newer one is finalised, so a crash or preemption mid-save never
loses the last good checkpoint.

Preemption (`should_stop`), one code path on CPU, GPU and TPU:
- With `jax.distributed.initialize()` (any number of processes) JAX's preemption service
  catches SIGTERM on any process and `CheckpointManager.reached_preemption(step)` turns True on
  every process at the same step (the step after the largest one any process had reached).
- Without it (single-process runs, or a JAX preemption service disabled by
  `jax_enable_preemption_service=False`), a SIGTERM handler installed here sets a flag. With
  several processes the flags are combined with a tiny all-gather at every `should_stop` call,
  so all processes see the same answer at the same step; the loop must call `should_stop`
  at every step on every process (as with JAX's service). A second SIGTERM terminates at once.
The loop then does: `if ckpt.should_stop(step): ckpt.save(step, ..., force=True);
ckpt.wait_until_finished(); exit(0)`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from guidedflow import errors


class CheckpointMismatchError(errors.UserError, ValueError):
  """The checkpoint's state tree, shapes or dtypes differ from the model being restored."""


def _key_name(key: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _flat_by_path(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  dtype = getattr(leaf, 'dtype', None)
  return tuple(np.shape(leaf)), np.dtype(np.asarray(leaf).dtype if dtype is None else dtype)


def _describe(leaf: Any) -> str:
  shape, dtype = _shape_dtype(leaf)
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


def _with_sharding(abstract_state: Any) -> Any:
  """ShapeDtypeStruct leaves, each with a sharding (default device, replicated if multi-process).

  Without one, orbax would reuse the sharding stored in the checkpoint, which fails when the
  checkpoint was written on another topology.
  """
  if jax.process_count() == 1:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  else:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('replica',))
    default = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def leaf_to_abstract(leaf):
    shape, dtype = _shape_dtype(leaf)
    sharding = getattr(leaf, 'sharding', None)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=default if sharding is None else sharding)

  return jax.tree.map(leaf_to_abstract, abstract_state)


def _jax_preemption_service_active() -> bool:
  # Private JAX state, read defensively; only decides which of two working paths to use.
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


class Checkpointer:
  """Periodic and preemption checkpoints in `directory` (an orbax `CheckpointManager`).

  Args:
    directory: where step directories go (created if missing); local path or gs://.
    max_to_keep: newest checkpoints kept; older ones are deleted after a newer save completes.
    save_interval_steps: `save` without `force` writes only at multiples of this (0: only
      forced saves).
    async_save: write in a background thread (call `wait_until_finished` before reading or
      exiting). Synchronous by default: simpler, and cheap for small models.
    handle_sigterm: install the SIGTERM handler when JAX's preemption service is not active
      (see the module docstring). Must be constructed in the main thread for that.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               save_interval_steps: int = 1000, async_save: bool = False,
               handle_sigterm: bool = True):
    self.directory = os.fspath(directory)
    if '://' not in self.directory:
      self.directory = os.path.abspath(self.directory)
    # The save interval is applied here (orbax would also save the first step it sees).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    # Handlers named up front so that a fresh manager can read metadata before any save.
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                'config': ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                          options=options)
    self._save_interval_steps = int(save_interval_steps)
    self._sigterm = threading.Event()
    self._stopped = False
    self._handler_installed = False
    self._previous_handler = None
    self._use_jax_preemption = _jax_preemption_service_active()
    if handle_sigterm and not self._use_jax_preemption:
      self._install_sigterm_handler()

  # -- preemption -------------------------------------------------------------------------------

  @property
  def preemption_mode(self) -> str:
    """'jax' (JAX's preemption service), 'sigterm' (own handler, flags all-gathered across
    processes when there are several) or 'none' (no handler: SIGTERM kills the process)."""
    if self._use_jax_preemption:
      return 'jax'
    return 'sigterm' if self._handler_installed else 'none'

  def _install_sigterm_handler(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Checkpointer created outside the main thread: no SIGTERM handler, so a '
                      'preemption kills the run without a final checkpoint.')
      return
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._handler_installed = True

  def _on_sigterm(self, signum, frame) -> None:
    del frame  # Unused.
    if self._sigterm.is_set():  # Second SIGTERM: stop waiting for the loop, die now.
      self._restore_sigterm_handler()
      os.kill(os.getpid(), signum)
      return
    self._sigterm.set()
    logging.warning('SIGTERM received: saving a checkpoint at the next step, then exiting.')

  def _restore_sigterm_handler(self) -> None:
    if self._handler_installed:
      # None: the previous handler was not set from Python; fall back to the default.
      previous = signal.SIG_DFL if self._previous_handler is None else self._previous_handler
      signal.signal(signal.SIGTERM, previous)
      self._handler_installed = False

  def should_stop(self, step: int) -> bool:
    """True, on every process at the same step, once any process got a preemption signal.

    Call it at every step on every process (it is collective with several processes).
    """
    if self._stopped:
      return True
    if self._use_jax_preemption:
      stop = bool(self._manager.reached_preemption(step))
    elif jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(self._sigterm.is_set()))
      stop = bool(np.any(flags))
    else:
      stop = self._sigterm.is_set()
    if stop:
      logging.warning('Preemption: stopping at step %d.', step)
    self._stopped = stop
    return stop

  # -- save / restore ---------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: Mapping[str, Any],
           config: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` (pytree of arrays), `data_state` and `config` (JSON-able) at `step`.

    `config` may be a ConfigDict; it is stored as JSON, so tuples come back as lists.

    Without `force`, saves only at multiples of `save_interval_steps`. Returns whether a save
    was started; a step that already has a checkpoint is not written again (returns False).
    Call on every process.
    """
    step = int(step)
    if not force and (self._save_interval_steps <= 0 or step % self._save_interval_steps):
      return False
    if step in self._manager.all_steps():
      return False
    items = {'state': ocp.args.StandardSave(state), 'data': ocp.args.JsonSave(dict(data_state))}
    if config is not None:
      config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)  # ConfigDict.
      items['config'] = ocp.args.JsonSave(config)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def _resolve_step(self, step: int | None) -> int:
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f'No checkpoint for step {step} in {self.directory}; available: '
                              f'{self.all_steps()}.')
    return int(step)

  def _check_matches(self, abstract_state: Any, step: int) -> None:
    metadata = self._manager.item_metadata(step)['state']
    saved = _flat_by_path(getattr(metadata, 'tree', metadata))
    expected = _flat_by_path(abstract_state)
    fix = ('The checkpoint was written by a different model/optimizer config. Restore with the '
           'config it was trained with (saved in the checkpoint) or use another --workdir.')
    where = f'Checkpoint {self.directory} step {step}'
    layout_fix = _block_layout_fix(saved, expected)
    if layout_fix:
      raise CheckpointMismatchError(f'{where}: {layout_fix}')
    for path, want in expected.items():
      if path not in saved:
        raise CheckpointMismatchError(f'{where} has no parameter {path!r} that the model '
                                      f'expects ({_describe(want)}). {fix}')
      have = saved[path]
      if _shape_dtype(have) != _shape_dtype(want):
        raise CheckpointMismatchError(
            f'{where}: parameter {path!r} was saved as {_describe(have)} but the model '
            f'expects {_describe(want)}. {fix}')
    extra = [path for path in saved if path not in expected]
    if extra:
      raise CheckpointMismatchError(f'{where} holds parameter {extra[0]!r} '
                                    f'({_describe(saved[extra[0]])}) that the model does not '
                                    f'have ({len(extra)} such). {fix}')

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, data_state) of `step` (default: latest) into `abstract_state`'s layout.

    Args:
      abstract_state: pytree like the saved state with `jax.ShapeDtypeStruct` leaves (or
        arrays); their `.sharding` places the restored arrays directly (no host copy). Leaves
        without a sharding go to the default device (replicated when multi-process).
      step: checkpoint step; None = latest.

    Raises:
      FileNotFoundError: no such checkpoint.
      CheckpointMismatchError: tree, shape or dtype differs; names the first parameter path.
    """
    step = self._resolve_step(step)
    self._check_matches(abstract_state, step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_with_sharding(abstract_state)),
        data=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'])

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: latest); None if there is none."""
    try:
      step = self._resolve_step(step)
    except FileNotFoundError:
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))
    except (KeyError, FileNotFoundError):  # Saved without a config.
      return None
    config = restored['config']
    return None if config is None else dict(config)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, releases the manager and restores the previous SIGTERM handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    if threading.current_thread() is threading.main_thread():
      self._restore_sigterm_handler()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
