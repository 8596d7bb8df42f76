"""Device mesh, logical-axis rules and placement of models and batches on the mesh.

Parameters carry *logical* axis names (nnx `out_sharding` metadata, set with
`nnx.with_partitioning` in `guidedflow.models`); `DEFAULT_RULES` maps them to the mesh axes
`('data', 'fsdp', 'tensor')`. The batch is split over `data` × `fsdp`; parameters over `fsdp`
(ZeRO-3 style, gathered by XLA where used) and `tensor` (Megatron-style heads / MLP split).
"""

import math
import os
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from guidedflow import jax_compat
from guidedflow.models.layers import LAYER_AXIS

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
DISTRIBUTED_MODES = ('auto', 'on', 'off')  # config.mesh.distributed

# Logical axis → mesh axis (or None: replicated). The first rule for a name wins; names not
# listed are replicated.
DEFAULT_RULES = (
    (LAYER_AXIS, None),       # leading axis of scanned (stacked) blocks: one slice per layer
    ('embed', 'fsdp'),        # model width
    ('mlp', 'tensor'),        # MLP hidden (and the time-MLP hidden)
    ('heads', 'tensor'),      # fused heads × head_dim of q/k/v and the attention projection
    ('modulation', 'tensor'),  # adaLN outputs (6·width per block)
    ('conv_in', 'fsdp'),      # U-Net conv input channels
    ('conv_out', 'tensor'),   # U-Net conv output channels
    ('patch', None),          # p·p·C patch features (small)
    ('classes', None),        # label-table rows (K + 1: rarely divisible)
)

# Parameters with fewer elements than this stay replicated (biases, norms, small tables):
# sharding them saves almost nothing and costs a collective per use. A stacked parameter counts
# the elements of one layer (its 'layers' axis left out): each use touches one slice.
MIN_SHARD_SIZE = 4096

Rules = Sequence[tuple[str, Any]]


# ----------------------------------------------------------------------------- multi-host


def _slurm_job_with_several_tasks() -> bool:
  needed = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  return all(v in os.environ for v in needed) and int(os.environ['SLURM_NTASKS']) > 1


def _on_cloud_tpu_vm() -> bool:
  return jax_compat.running_in_cloud_tpu_vm()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'Environment variable {name}={value!r} must be an integer.') from None


def initialize_distributed(mode: str = 'auto', coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when `mode` says so; returns whether it did.

  Must run before anything touches a JAX backend (`jax.devices()`, the first array).

  Args:
    mode: 'on': always (JAX auto-detects Cloud TPU, Slurm, Open MPI and Kubernetes jobs;
      elsewhere give the coordinator). 'off': never (one process). 'auto': when a coordinator
      is given, on a Cloud TPU VM, or in a Slurm step with several tasks.
    coordinator_address: 'host:port' of process 0; default env `JAX_COORDINATOR_ADDRESS`.
    num_processes, process_id: default env `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
      (`launch/local_multiprocess.sh` sets all three).
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f'config.mesh.distributed={mode!r} is not one of {DISTRIBUTED_MODES}.')
  if mode == 'off':
    return False
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None:
    num_processes = _env_int('JAX_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int('JAX_PROCESS_ID')
  if mode == 'auto' and not (coordinator_address or _slurm_job_with_several_tasks()
                             or _on_cloud_tpu_vm()):
    return False
  if jax.distributed.is_initialized():
    return True
  if coordinator_address and (num_processes is None or process_id is None):
    raise ValueError(
        f'A coordinator ({coordinator_address}) is given but not the number of processes and this '
        'process\'s id: set JAX_NUM_PROCESSES and JAX_PROCESS_ID (or config.mesh.num_processes and '
        'config.mesh.process_id).')
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id={process_id} must be in [0, num_processes={num_processes}).')
  logging.info('jax.distributed.initialize(coordinator_address=%s, num_processes=%s, '
               'process_id=%s)', coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


# ----------------------------------------------------------------------------- mesh


def _resolve_shape(mesh_shape: Sequence[int], num_devices: int, what: str) -> list[int]:
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'{what} {tuple(mesh_shape)} must have {len(MESH_AXES)} entries, one '
                     f'per axis {MESH_AXES}.')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'{what} {tuple(mesh_shape)}: sizes must be positive, at most one -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'{what} {tuple(mesh_shape)}: {num_devices} devices are not '
                       f'divisible by {known}.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f'{what} {tuple(mesh_shape)} needs {math.prod(shape)} devices, but '
                     f'{num_devices} are available; use -1 for one axis to take the rest.')
  return shape


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None,
              dcn_shape: Sequence[int] | None = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh with Auto axis types over `devices` (default: all).

  Args:
    mesh_shape: sizes of the axes; one entry may be -1 (all remaining devices). Without
      `dcn_shape` it spans all devices; with it, one granule (see below).
    devices: default `jax.devices()` (all processes).
    dcn_shape: None or all ones: one fast network. Otherwise the mesh is hybrid: `mesh_shape`
      within each granule (a TPU slice; on platforms without slices, a process / host) and
      `dcn_shape` across granules, so that the total size of an axis is the product of both.
      Put `data` (gradient all-reduce once per step) on DCN; keep `fsdp` and `tensor` on ICI.
  """
  devices = list(jax.devices() if devices is None else devices)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if dcn_shape is not None and any(d != 1 for d in dcn_shape):
    granules, process_is_granule = _granules(devices)
    dcn = _resolve_shape(dcn_shape, granules, f'config.mesh.dcn_shape (over {granules} '
                         f'{"processes" if process_is_granule else "slices"})')
    ici = _resolve_shape(mesh_shape, len(devices) // granules,
                         'config.mesh.shape (devices per granule)')
    try:
      array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                   process_is_granule=process_is_granule)
    except (ValueError, AssertionError) as e:
      raise ValueError(f'config.mesh.shape {tuple(mesh_shape)} × dcn_shape {tuple(dcn_shape)} '
                       f'does not fit {len(devices)} devices in {granules} granules: {e}') from e
    return Mesh(array, MESH_AXES, axis_types=auto)
  shape = _resolve_shape(mesh_shape, len(devices), 'config.mesh.shape')
  try:  # Topology-aware device order (TPU ICI rings); plain order where jax has no opinion.
    return jax.make_mesh(tuple(shape), MESH_AXES, auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _granules(devices) -> tuple[int, bool]:
  """(number of DCN granules, whether they are processes): TPU slices where there are several,
  else processes (GPU / CPU hosts)."""
  slices = {getattr(d, 'slice_index', None) for d in devices}
  if None not in slices and len(slices) > 1:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def mesh_spec(logical_names, rules: Rules, shape: Sequence[int] | None = None,
               mesh: Mesh | None = None) -> PartitionSpec:
  """Maps names dim by dim; with `shape` and `mesh`, a dim the mesh axes don't divide stays
  replicated (and leaves its mesh axis free for a later dim)."""
  if not logical_names:
    return PartitionSpec()
  table = {}
  for name, axis in rules:
    table.setdefault(name, axis)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_names):
    axis = table.get(name) if name is not None else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    divides = (shape is None or mesh is None
               or shape[i] % math.prod(mesh.shape[a] for a in axes) == 0)
    if not axes or used.intersection(axes) or not divides:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _logical_names(variable: nnx.Variable):
  metadata = variable.get_metadata()
  # flax ≥ 0.12 stores the names as `out_sharding` (older: `sharding` / `sharding_names`).
  for key in ('out_sharding', 'sharding_names', 'sharding'):
    names = metadata.get(key)
    if names:
      return tuple(names)
  return None


def _elements_per_layer(shape: Sequence[int], names) -> int:
  """Elements of one layer's slice: the dims named `LAYER_AXIS` are left out."""
  if names is None:
    return math.prod(shape)
  return math.prod(n for n, name in zip(shape, names) if name != LAYER_AXIS)


def state_shardings(state, mesh: Mesh | jax.sharding.AbstractMesh, rules: Rules = DEFAULT_RULES,
                    min_shard_size: int = MIN_SHARD_SIZE):
  """NamedShardings for every array in `state` (real or abstract), from nnx metadata.

  Variables become the same Variable holding a `NamedSharding` (as `nnx.get_named_sharding`
  returns), so the result can be `out_shardings` / `in_shardings` of a jit over the state, or
  an orbax restore target's shardings. Optimizer statistics made by `tx.init(params)` are
  Variables with the parameters' metadata, so they shard like their parameters. Bare arrays,
  and Variables with fewer than `min_shard_size` elements per layer, are replicated; the
  'layers' axis of stacked (scanned) blocks is replicated, each block sharded as unstacked.
  `mesh` may be an `AbstractMesh` (shardings for any device count, e.g. for memory planning).
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      shape = getattr(x.get_value(), 'shape', ())
      names = _logical_names(x)
      if names is not None and len(names) != len(shape):
        names = None  # e.g. a factored optimizer statistic: replicate rather than guess
      if _elements_per_layer(shape, names) < min_shard_size:
        names = None
      spec = mesh_spec(names, rules, shape, mesh)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def without_axis(shardings, axis: str):
  """`shardings` (NamedShardings, or Variables holding them) with mesh axis `axis` dropped:
  e.g. FSDP-sharded weights gathered whole on every device, tensor splits kept."""
  def drop(spec):
    parts = []
    for part in spec:
      names = (part,) if isinstance(part, str) else tuple(part or ())
      kept = tuple(n for n in names if n != axis)
      parts.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*parts)

  def one(x):
    if isinstance(x, nnx.Variable):
      return x.replace(one(x.get_value()))
    return NamedSharding(x.mesh, drop(x.spec))

  return jax.tree.map(one, shardings, is_leaf=lambda x: isinstance(x, (nnx.Variable,
                                                                        NamedSharding)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_axes_size(mesh) -> int:
  """Number of batch shards: the product of the `data` and `fsdp` axis sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def bytes_per_device(tree) -> int:
  """Largest number of bytes that any one device holds of `tree` (arrays or ShapeDtypeStructs
  with shardings; leaves without one count whole)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def to_host(x) -> np.ndarray:
  """A global array as host numpy; across processes, gathered from all of them."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))
