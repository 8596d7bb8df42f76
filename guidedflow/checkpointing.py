"""Orbax checkpoints of the training state, the data-iterator state and the config; preemption.

A checkpoint step holds three items: `state` (a pytree of arrays: model, EMA and optimizer
states, saved with `StandardSave`), `data` (the `BatchIterator` state, JSON) and `config`
(JSON). Orbax writes each step into a temporary directory and renames it when complete, and
deletes old steps only after a newer one is finalised, so a crash or preemption mid-save never
loses the last good checkpoint.

A step whose files are damaged (truncated, missing, or bytes changed: every array's checksum,
`guidedflow.checksums`, is saved with it and verified on restore) is reported by step and
reason and skipped: `restore_newest` returns the newest step that restores, and moves the
damaged ones aside (`<directory>_damaged/<step>`, never deleted) when asked to (training does;
sampling and evaluation only skip, they never change a run's files). A save that does not fit
on the disk keeps the previous checkpoint and raises `DiskFullError` with the space needed.

Preemption (`should_stop`), one code path on CPU, GPU and TPU:
- With `jax.distributed.initialize()` (any number of processes) JAX's preemption service
  catches SIGTERM on any process and `CheckpointManager.reached_preemption(step)` turns True on
  every process at the same step (the step after the largest one any process had reached).
  Ctrl-C is passed on to it as a SIGTERM.
- Without it (single-process runs, or a JAX preemption service disabled by
  `jax_enable_preemption_service=False`), `guidedflow.stop_signals` turns SIGTERM and Ctrl-C
  into a flag. With several processes the flags are combined with a tiny all-gather at every
  `should_stop` call, so all processes see the same answer at the same step; the loop must call
  `should_stop` at every step on every process (as with JAX's service). A second signal aborts
  at once.
The loop then does: `if ckpt.should_stop(step): ckpt.save(step, ..., force=True);
ckpt.wait_until_finished(); exit(ckpt.exit_status)`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from typing import Any, Callable, Mapping

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from guidedflow import checksums as checksums_lib
from guidedflow import jax_compat
from guidedflow import errors
from guidedflow import stop_signals
from guidedflow import tree_compat
from guidedflow import workdir as workdir_lib


CheckpointMismatchError = tree_compat.CheckpointMismatchError  # raised by restore; here for callers


class DamagedCheckpointError(errors.UserError, IOError):
  """A checkpoint step cannot be read back (files missing or truncated, checksums differ)."""

  def __init__(self, step: int, reason: str):
    super().__init__(f'checkpoint step {step} is damaged: {reason}')
    self.step, self.reason = step, reason


class DiskFullError(errors.UserError, OSError):
  """A checkpoint does not fit on the disk; the previous one is kept."""


def _is_read_noise(error: BaseException | None) -> bool:
  text = str(error)
  return (text == 'Event loop is closed' or
          text.startswith('Encountered error while reading array index'))


class _DropReadNoise(logging.Filter):
  """asyncio's 'Task exception was never retrieved' for the reads of a failed restore."""

  def filter(self, record):
    return not (record.exc_info and _is_read_noise(record.exc_info[1]))


def _drop_closed_event_loop_errors() -> None:
  """After a failed restore, tensorstore reads still in flight fail too: tensorstore reports
  each as unraisable (sys.unraisablehook) and asyncio logs each task's exception as 'never
  retrieved' — dozens of interleaved tracebacks on stderr of no consequence (the restore
  already failed and is reported in one line). Drop those; every other error is reported as
  before."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_event_loop_errors', False):
    return

  def hook(unraisable):
    if not _is_read_noise(unraisable.exc_value):
      previous(unraisable)

  hook.drops_closed_event_loop_errors = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_DropReadNoise())


def _megabytes(num_bytes: float) -> str:
  return f'{num_bytes / 2**20:.1f} MB'


def state_bytes(state: Any) -> int:
  """Bytes of all array leaves of `state` (their global size, not this process's shards)."""
  return int(sum(np.prod(np.shape(x)) * np.dtype(tree_compat.shape_dtype(x)[1]).itemsize
                 for x in jax.tree.leaves(state)))


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
    shape, dtype = tree_compat.shape_dtype(leaf)
    sharding = getattr(leaf, 'sharding', None)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=default if sharding is None else sharding)

  return jax.tree.map(leaf_to_abstract, abstract_state)


def _jax_preemption_service_active() -> bool:
  # Only decides which of two working paths to use.
  return jax_compat.preemption_service_active()


class Checkpointer:
  """Periodic and preemption checkpoints in `directory` (an orbax `CheckpointManager`).

  Args:
    directory: where step directories go (created if missing); local path or gs://.
    max_to_keep: newest checkpoints kept; older ones are deleted after a newer save completes.
    save_interval_steps: `save` without `force` writes only at multiples of this (0: only
      forced saves).
    async_save: write in a background thread (call `wait_until_finished` before reading or
      exiting). Synchronous by default: simpler, and cheap for small models.
    handle_sigterm: handle SIGTERM and Ctrl-C as stop requests (`guidedflow.stop_signals`;
      Ctrl-C only when JAX's preemption service owns SIGTERM). Must be constructed in the main
      thread for that.
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
                'config': ocp.JsonCheckpointHandler(),
                'checksums': ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                          options=options)
    self._save_interval_steps = int(save_interval_steps)
    _drop_closed_event_loop_errors()
    self._stopped = False
    self.warnings = []  # what a restore could not check (result.json reports it)
    self._use_jax_preemption = _jax_preemption_service_active()
    self._signals = stop_signals.StopSignals(
        forward_sigterm_to=os.getpid() if self._use_jax_preemption else None)
    if handle_sigterm:
      self._signals.install()

  # -- preemption -------------------------------------------------------------------------------

  @property
  def preemption_mode(self) -> str:
    """'jax' (JAX's preemption service), 'sigterm' (own handler, flags all-gathered across
    processes when there are several) or 'none' (no handler: SIGTERM kills the process)."""
    if self._use_jax_preemption:
      return 'jax'
    return 'sigterm' if self._signals.installed else 'none'

  @property
  def exit_status(self) -> int:
    """The status to exit with after a stop: 130 when this process got Ctrl-C, else 0."""
    return self._signals.exit_status or 0

  @property
  def stop_signal(self) -> str | None:
    """'SIGINT' or 'SIGTERM' when this process got a stop signal, else None."""
    signum = self._signals.first_signal
    return None if signum is None else stop_signals.signal_name(signum)

  def should_stop(self, step: int) -> bool:
    """True, on every process at the same step, once any process got a preemption signal.

    Call it at every step on every process (it is collective with several processes).
    """
    if self._stopped:
      return True
    if self._use_jax_preemption:
      stop = bool(self._manager.reached_preemption(step))
    elif jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.int32(self._signals.requested.is_set()))
      stop = bool(np.any(flags))
    else:
      stop = self._signals.requested.is_set()
    if stop:
      logging.warning('Stop requested (preemption, SIGTERM or Ctrl-C): stopping at step %d.', step)
    self._stopped = stop
    return stop

  # -- save -------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: Mapping[str, Any],
           config: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` (pytree of arrays) with its checksums, `data_state` and `config`
    (JSON-able) at `step`.

    `config` may be a ConfigDict; it is stored as JSON, so tuples come back as lists.

    Without `force`, saves only at multiples of `save_interval_steps`. Returns whether a save
    was started; a step that already has a checkpoint is not written again (returns False).
    Call on every process.

    Raises:
      DiskFullError: the disk cannot hold the checkpoint (checked before writing on local
        disks, and when the write fails); the previous checkpoints are kept.
    """
    step = int(step)
    if not force and (self._save_interval_steps <= 0 or step % self._save_interval_steps):
      return False
    if step in self._manager.all_steps():
      return False
    needed = self._check_free_space(step, state)
    items = {'state': ocp.args.StandardSave(state), 'data': ocp.args.JsonSave(dict(data_state)),
             'checksums': ocp.args.JsonSave({'algorithm': checksums_lib.ALGORITHM,
                                             'arrays': checksums_lib.checksums(state)})}
    if config is not None:
      config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)  # ConfigDict.
      items['config'] = ocp.args.JsonSave(config)
    try:
      return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
    except Exception as e:  # pylint: disable=broad-except
      if not workdir_lib.is_disk_full(e):
        raise
      self._remove_partial(step)
      raise DiskFullError(self._disk_full_message(step, needed)) from e

  def _free_bytes(self) -> int | None:
    if '://' in self.directory:
      return None  # object stores have no free-space figure
    try:
      return shutil.disk_usage(self.directory).free
    except OSError:
      return None

  def _disk_full_message(self, step: int, needed: str) -> str:
    free = self._free_bytes()
    kept = [s for s in self._manager.all_steps() if s != step]
    kept_text = (f'the previous checkpoint (step {max(kept)}) is kept' if kept
                 else 'no earlier checkpoint exists')
    free_text = '' if free is None else f', {_megabytes(free)} free'
    return (f'No space left to save checkpoint step {step} in {self.directory}: it needs '
            f'{needed}{free_text}; {kept_text}. Free space on that disk (or use a --workdir on '
            'a bigger one and copy the checkpoints there), then rerun the same command to '
            'resume.')

  def _previous_step_bytes(self) -> int | None:
    """On-disk bytes of the newest finished local step (a save of the same state takes about
    as much: same arrays, same compression); None without one."""
    step = self._manager.latest_step()
    if step is None or '://' in self.directory:
      return None
    total = 0
    for root, _, files in os.walk(os.path.join(self.directory, str(step))):
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total

  def _check_free_space(self, step: int, state: Any) -> str:
    """Refuses a save that will not fit, judged by the size of the previous checkpoint (before
    the first one, the arrays' uncompressed size is only reported when the write fails);
    returns the space the save needs, as text for the messages."""
    previous = self._previous_step_bytes()
    if previous is None:
      return f'up to {_megabytes(state_bytes(state))} (the arrays, before compression)'
    needed = f'about {_megabytes(previous)} (the size of step {self._manager.latest_step()})'
    free = self._free_bytes()
    if free is not None and free < previous:
      raise DiskFullError(self._disk_full_message(step, needed))
    return needed

  def _remove_partial(self, step: int) -> None:
    """Deletes the unfinished temporary directory of a failed save (it is never a checkpoint)
    to give the space back; finished steps are not touched."""
    if jax.process_index() != 0:
      return
    for path in epath.Path(self.directory).glob(f'{step}.orbax-checkpoint-tmp*'):
      try:
        path.rmtree() if path.is_dir() else path.unlink()
      except OSError as e:
        logging.warning('Could not remove the partial checkpoint %s: %s', path, e)

  # -- restore ----------------------------------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f'No checkpoint for step {step} in {self.directory}; available: '
                              f'{self.all_steps()}.')
    return int(step)

  def _saved_tree(self, step: int) -> dict[str, Any]:
    """The saved state's leaves by path, from the step's metadata (DamagedCheckpointError when
    it cannot be read: a checkpoint without metadata is damaged, not another model's)."""
    try:
      metadata = self._manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(step, f'its metadata cannot be read ({errors.one_line(e)})') from e
    saved = tree_compat.flat_by_path(getattr(metadata, 'tree', metadata)) if metadata is not None else {}
    if not saved:
      raise DamagedCheckpointError(step, 'the state metadata is missing or empty')
    return saved

  def _check_matches(self, abstract_state: Any, step: int) -> None:
    tree_compat.check_matches(self._saved_tree(step), abstract_state,
                              f'Checkpoint {self.directory} step {step}')

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, data_state) of `step` (default: latest) into `abstract_state`'s layout
    and verifies the arrays' checksums (when the step has them).

    Args:
      abstract_state: pytree like the saved state with `jax.ShapeDtypeStruct` leaves (or
        arrays); their `.sharding` places the restored arrays directly (no host copy). Leaves
        without a sharding go to the default device (replicated when multi-process).
      step: checkpoint step; None = latest.

    Raises:
      FileNotFoundError: no such checkpoint.
      CheckpointMismatchError: tree, shape or dtype differs; names the first parameter path.
      DamagedCheckpointError: files missing, unreadable or changed since the save.
    """
    step = self._resolve_step(step)
    self._check_matches(abstract_state, step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_with_sharding(abstract_state)),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(step, f'it cannot be read ({errors.one_line(e)})') from e
    saved_sums = self._restore_item(step, 'checksums') or {}
    if saved_sums.get('algorithm') != checksums_lib.ALGORITHM:
      message = (f'checkpoint step {step} has no checksums of this version '
                 f'({saved_sums.get("algorithm", "written before them")}): restored unverified')
      logging.warning('%s.', message[0].upper() + message[1:])
      self.warnings.append(message)
    else:
      bad = checksums_lib.mismatches(saved_sums['arrays'], restored['state'])
      if bad:
        raise DamagedCheckpointError(
            step, f'the checksums of {len(bad)} array(s) differ from the saved ones, first '
            f'{bad[0]!r} (its files changed on disk after the save)')
    if restored['data'] is None:
      raise DamagedCheckpointError(step, 'the data-iterator state is missing')
    return restored['state'], dict(restored['data'])

  def _restore_item(self, step: int, name: str) -> Any:
    """A JSON item of `step`; None when the step has none (saved without it)."""
    item_dir = epath.Path(self.directory) / str(step) / name
    if not item_dir.exists():
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(step, f'its {name} cannot be read ({errors.one_line(e)})') from e
    return restored[name]

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: latest); None if there is none.

    Raises:
      DamagedCheckpointError: the step has a config that cannot be read.
    """
    try:
      step = self._resolve_step(step)
    except FileNotFoundError:
      return None
    config = self._restore_item(step, 'config')
    return None if config is None else dict(config)

  def restore_newest(self, abstract_state: Any, *, move_damaged: bool,
                     check_config: Callable[[int, dict | None], None] | None = None
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest step that restores; None without any step.

    A damaged step is reported (step and reason) and skipped; with `move_damaged` it is moved
    to `<directory>_damaged/<step>` (kept, never deleted) so that training can save that step
    again. `check_config(step, saved config)` runs before each restore and may raise (a
    checkpoint of another task or objective is an error, not damage).

    Raises:
      CheckpointMismatchError, and what `check_config` raises, for an intact step.
      CheckpointNotFoundError: every step is damaged (they were moved aside when asked).
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    for step in steps:
      try:
        if check_config is not None:
          check_config(step, self.restore_config(step))
        state, data_state = self.restore(abstract_state, step)
        failure = None
      except DamagedCheckpointError as e:
        failure = e
      failure = _any_process_failed(failure, step)
      if failure is None:
        return step, state, data_state
      logging.error('Checkpoint %s in %s; skipping it%s.', str(failure)[len('checkpoint '):],
                    self.directory, ', trying the step before' if step != steps[-1] else '')
      if move_damaged:
        self.move_aside(step)
    where = f'{self.directory}_damaged' if move_damaged else self.directory
    raise errors.CheckpointNotFoundError(
        f'None of the {len(steps)} checkpoint(s) in {self.directory} can be restored (damaged; '
        f'kept in {where}, see the log for each reason). Start again in a new --workdir, or '
        'restore the checkpoints from a backup.')

  def move_aside(self, step: int) -> str:
    """Moves step `step` to `<directory>_damaged/<step>[.k]`; returns the new path."""
    target_dir = epath.Path(f'{self.directory}_damaged')
    target = target_dir / str(step)
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      k = 0
      while target.exists():
        k += 1
        target = target_dir / f'{step}.{k}'
      (epath.Path(self.directory) / str(step)).rename(target)
      logging.error('Moved the damaged checkpoint step %d to %s (kept for inspection; delete '
                    'it when you no longer need it).', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'guidedflow_move_aside_{step}')
    self._manager.reload()
    return os.fspath(target)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, releases the manager and restores the previous signal
    handlers."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    finally:
      if threading.current_thread() is threading.main_thread():
        self._signals.uninstall()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _any_process_failed(failure: DamagedCheckpointError | None,
                        step: int) -> DamagedCheckpointError | None:
  """`failure`, or one naming another process, when any process failed to restore `step`
  (all processes must skip the same steps)."""
  if jax.process_count() == 1:
    return failure
  flags = multihost_utils.process_allgather(np.int32(failure is not None))
  if failure is None and np.any(flags):
    failure = DamagedCheckpointError(step, 'another process could not read it')
  return failure
