"""Training and evaluation batches: a grain `MapDataset` whose element `s` is the batch of step s.

The global batch of step `s` is a pure function of `(seed, s)` (`HostBatches`); each process
takes its contiguous slice of it. `BatchIterator` reads that `MapDataset` (through grain's
iterator and a prefetch thread for file-backed datasets, `mp_prefetch` worker processes on
request, in the loop's thread for in-memory arrays) and turns the numpy batches into jax
arrays, optionally one global array assembled with `jax.make_array_from_process_local_data`. Its state (`get_state`) is grain's iterator position
(`next_index` = the step of the next batch) with the seed and the sizes it was drawn with; the
checkpoint stores it, and a resumed iterator yields bitwise the same batches as the
uninterrupted stream.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Iterator, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import errors
from guidedflow import images as images_lib
from guidedflow.datasets import Dataset


def process_slice(global_batch_size: int, process_index: int | None,
                  process_count: int | None) -> tuple[int, int]:
  """[lo, hi): this process's contiguous part of a global batch."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise errors.DataError(
        f'Global batch size {global_batch_size} is not divisible by the number of processes '
        f'{process_count}; set --config.train.batch_size to a multiple of {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  local = global_batch_size // process_count
  return process_index * local, (process_index + 1) * local


def to_model(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A dataset batch as the model takes it: 'image' through `images.to_model`, the rest (labels,
  latent moments) as it is."""
  out = dict(batch)
  if 'image' in out:
    out['image'] = images_lib.to_model(out['image'])
  return out


def to_jax(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, jax.Array]:
  """Host batch → jax arrays: on the default device, or one global array per key on
  `sharding` (labels, masks: its batch axis only)."""
  if sharding is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  out = {}
  for key, value in batch.items():
    if value.ndim < len(sharding.spec):
      spec = jax.sharding.PartitionSpec(*sharding.spec[:value.ndim])
      value_sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    else:
      value_sharding = sharding
    out[key] = jax.make_array_from_process_local_data(value_sharding, value)
  return out


class HostBatches(grain.MapDataset):
  """The infinite stream of this process's training batches; element `s` = step s (numpy).

  The stream is the concatenation of epochs; epoch `e` is the permutation drawn by
  `np.random.default_rng([seed, e])`. Step `s` reads stream positions `[s*B, (s+1)*B)` (a batch
  may straddle two epochs, so every example appears exactly once per epoch). Every process
  computes the same global indices and gathers only its slice `[p*B/P, (p+1)*B/P)`. A
  process-local dataset (this process's shard of the latent cache) gives this process's part
  of every batch alone, by its own permutations `default_rng([seed, e, p])`.

  Random access: any step costs the same, so resuming at step s is O(1).
  """

  def __init__(self, dataset: Dataset, *, global_batch_size: int, seed: int,
               process_index: int | None = None, process_count: int | None = None):
    super().__init__()
    if global_batch_size <= 0:
      raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
    if dataset.num_examples == 0:
      raise errors.DataError(f'{dataset!r} is empty.')
    self.dataset = dataset
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self._process = (process_index, process_count)
    self._lo, self._hi = process_slice(self.global_batch_size, process_index, process_count)
    self._stream_batch, self._rng_extra = self.global_batch_size, ()
    if getattr(dataset, 'process_local', False):
      self._stream_batch, self._lo, self._hi = self._hi - self._lo, 0, self._hi - self._lo
      self._rng_extra = (jax.process_index() if process_index is None else process_index,)
    self._permutations: dict[tuple[int, int], np.ndarray] = {}
    self._perm_lock = threading.Lock()

  def with_seed(self, seed: int) -> 'HostBatches':
    """The same stream shuffled by `seed`."""
    process_index, process_count = self._process
    return HostBatches(self.dataset, global_batch_size=self.global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count)

  def __getstate__(self):  # pickled into grain workers: no lock, no cached permutations
    state = dict(self.__dict__)
    state.pop('_perm_lock'), state.pop('_permutations')
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._permutations, self._perm_lock = {}, threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize  # infinite, as grain's `repeat(None)`

  def __getitem__(self, step):
    if isinstance(step, slice):
      return self.slice(step)
    return self.host_batch(step)

  def __str__(self) -> str:
    return (f'HostBatches({self.dataset!r}, global_batch_size={self.global_batch_size}, '
            f'seed={self.seed})')

  def _permutation(self, seed: int, epoch: int) -> np.ndarray:
    with self._perm_lock:
      perm = self._permutations.get((seed, epoch))
      if perm is None:
        perm = np.random.default_rng([seed, epoch, *self._rng_extra]).permutation(
            self.dataset.num_examples)
        if len(self._permutations) >= 4:  # A batch touches at most a few consecutive epochs.
          self._permutations.pop(min(self._permutations))
        self._permutations[(seed, epoch)] = perm
      return perm

  def _indices_and_epochs(self, step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = self.dataset.num_examples
    positions = np.arange(step * self._stream_batch, (step + 1) * self._stream_batch,
                          dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      indices[where] = self._permutation(seed, int(epoch))[offsets[where]]
    return indices, epochs

  def global_indices(self, step: int, seed: int | None = None) -> np.ndarray:
    """Dataset indices of the whole global batch of `step` (same on every process); of this
    process's part of it for a process-local dataset."""
    return self._indices_and_epochs(step, self.seed if seed is None else seed)[0]

  def host_batch(self, step: int, seed: int | None = None) -> dict[str, np.ndarray]:
    """This process's slice of the batch of `step` as numpy (`to_model`). A dataset that draws
    something per example and epoch (`draws_per_epoch`: a caption) gets each example's epoch
    and the stream's seed too, so a resumed run draws the same."""
    seed = self.seed if seed is None else seed
    indices, epochs = self._indices_and_epochs(step, seed)
    indices, epochs = indices[self._lo:self._hi], epochs[self._lo:self._hi]
    if getattr(self.dataset, 'draws_per_epoch', False):
      return to_model(self.dataset.get_batch(indices, epochs=epochs, seed=seed))
    return to_model(self.dataset.get_batch(indices))


class BatchIterator:
  """Infinite, deterministic, resumable iterator of shuffled training batches (jax arrays).

  Reads `HostBatches` (element `s` = the batch of step `s`; see there for the order of
  examples). File-backed datasets (the latent cache, TFDS, image folders) are read through
  grain's iterator (`to_iter_dataset`, one prefetch thread); in-memory arrays are gathered in
  the loop's thread when the step asks (`benchmarks/input_pipeline.py`: grain's iterator costs
  such a ~30 µs gather 10–40 µs more and a thread buys nothing there); `workers` > 0 reads
  through grain's `mp_prefetch` worker processes.

  Args:
    dataset: a `Dataset`.
    global_batch_size: B, summed over all processes.
    seed: shuffling seed.
    sharding: optional `NamedSharding` for the image batch (batch axis first); the global batch
      is assembled with `jax.make_array_from_process_local_data`; labels use its first axis
      entries. None: arrays on the default device (process-local batches).
    start_step: first step to produce.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    prefetch: batches grain prepares ahead in one background thread (0: none, the batch is
      gathered when asked for; None: 2 for file-backed datasets, 0 for in-memory ones).
      Batches are a pure function of the step, so prefetching never changes them.
    workers: grain worker processes (`mp_prefetch`) that gather the batches; 0: none. The
      dataset is pickled into them (file-backed datasets map or open their files again). On
      the 2-core CPU of the benchmark they are far slower than a thread for every reader here
      (a few ms per batch through shared memory): for JPEG decoding on many cores.
  """

  def __init__(self, dataset: Dataset, *, global_batch_size: int, seed: int, sharding=None,
               start_step: int = 0, process_index: int | None = None,
               process_count: int | None = None, prefetch: int | None = None,
               workers: int = 0):
    self.batches = HostBatches(dataset, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)
    self.dataset = dataset
    self.global_batch_size = self.batches.global_batch_size
    self.sharding = sharding
    if prefetch is None:
      prefetch = 0 if getattr(dataset, 'in_memory', False) else 2
    self._prefetch = int(prefetch)
    self._workers = int(workers)
    self._iterator: grain.DatasetIterator | None = None
    self._consumed = 0  # batches taken from a worker iterator
    self._next = int(start_step)  # the next step while no grain iterator is open

  @property
  def seed(self) -> int:
    return self.batches.seed

  # -- pure functions of (seed, step) -----------------------------------------------------------

  def global_indices(self, step: int, seed: int | None = None) -> np.ndarray:
    """See `HostBatches.global_indices`."""
    return self.batches.global_indices(step, seed)

  def host_batch(self, step: int, seed: int | None = None) -> dict[str, np.ndarray]:
    """This process's slice of the batch of `step` as numpy (`to_model`)."""
    return self.batches.host_batch(step, seed)

  # -- iteration ----------------------------------------------------------------------------------

  def _grain_iterator(self) -> grain.DatasetIterator:
    if self._iterator is None:
      read = grain.ReadOptions(num_threads=1 if self._prefetch else 0,
                               prefetch_buffer_size=self._prefetch)
      if self._workers:
        from absl import flags  # pylint: disable=g-import-not-at-top
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags (library use, tests)
          flags.FLAGS.mark_as_parsed()
        # The workers read the stream from `_next` on; the step is `_next` + the batches taken.
        stream = self.batches[self._next:].to_iter_dataset(read).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=self._workers))
        self._iterator, self._consumed = iter(stream), 0
      else:
        self._iterator = iter(self.batches.to_iter_dataset(read))
        self._iterator.set_state({'next_index': self._next})  # O(1): random access
    return self._iterator

  @property
  def step(self) -> int:
    """The step of the next batch: grain's `next_index` while grain's iterator reads."""
    if self._iterator is None:
      return self._next
    if self._workers:
      return self._next + self._consumed
    return int(self._iterator.get_state()['next_index'])

  @step.setter
  def step(self, step: int) -> None:
    if self._iterator is not None and not self._workers:
      self._iterator.set_state({'next_index': int(step)})  # drops the prefetched batches
    else:
      self._close_iterator()
      self._next = int(step)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._prefetch or self._workers:
      batch = next(self._grain_iterator())
      self._consumed += 1
    else:  # in memory: the gather in this thread
      batch = self.batches[self._next]
      self._next += 1
    return to_jax(batch, self.sharding)

  def get_state(self) -> dict[str, int]:
    """JSON-able state: 'step' (grain's `next_index`: the next batch is the one of `step`), the
    seed, and the sizes that `set_state` checks."""
    return {'step': self.step, 'seed': self.seed, 'global_batch_size': self.global_batch_size,
            'num_examples': self.dataset.num_examples}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues the stream described by `state` (from `get_state`, e.g. via a checkpoint; an
    older `{'step', 'seed'}` state too)."""
    for key, current in (('global_batch_size', self.global_batch_size),
                         ('num_examples', self.dataset.num_examples)):
      if key in state and int(state[key]) != current:
        logging.warning('Resuming a data stream saved with %s=%s, now %s: the batches differ '
                        'from the uninterrupted run.', key, state[key], current)
    seed = int(state.get('seed', self.seed))
    if seed != self.seed:
      self._close_iterator()
      self.batches = self.batches.with_seed(seed)
    self.step = int(state['step'])

  def _close_iterator(self) -> None:
    if self._iterator is not None:
      self._next = self.step
      iterator, self._iterator = self._iterator, None
      iterator.close()

  def close(self) -> None:
    self._close_iterator()

  def __enter__(self) -> 'BatchIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # Interpreter shutdown.
      pass


def eval_batches(dataset: Dataset, batch_size: int, *, sharding=None,
                 num_batches: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Yields the split in order, in fixed-shape batches, for held-out metrics.

  The last partial batch is padded (with copies of the first examples) to `batch_size`; each
  batch carries `mask` (float32, 1 = real example, 0 = padding): average losses as
  `sum(loss * mask) / sum(mask)`. Fixed shapes mean one compile. Processes split each global
  batch as `BatchIterator` does.

  Args:
    dataset: a `Dataset`.
    batch_size: global batch size.
    sharding: as in `BatchIterator`.
    num_batches: stop after this many batches; None or 0 = the whole split.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
  """
  lo, hi = process_slice(batch_size, process_index, process_count)
  total = -(-dataset.num_examples // batch_size)
  if num_batches:
    total = min(total, num_batches)
  for b in range(total):
    positions = np.arange(b * batch_size, (b + 1) * batch_size)[lo:hi]
    mask = (positions < dataset.num_examples).astype(np.float32)
    batch = dataset.get_batch(np.where(mask > 0, positions, positions % dataset.num_examples))
    yield to_jax(dict(to_model(batch), mask=mask), sharding)
