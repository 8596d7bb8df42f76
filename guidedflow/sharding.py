"""Device mesh, logical-axis rules and placement of models and batches on the mesh.

Parameters carry *logical* axis names (nnx `out_sharding` metadata, set with
`nnx.with_partitioning` in `guidedflow.models`); `DEFAULT_RULES` maps them to the mesh axes
`('data', 'fsdp', 'tensor')`. The batch is split over `data` × `fsdp`; parameters over `fsdp`
(ZeRO-3 style, gathered by XLA where used) and `tensor` (Megatron-style heads / MLP split).
"""

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical axis → mesh axis (or None: replicated). The first rule for a name wins; names not
# listed are replicated.
DEFAULT_RULES = (
    ('embed', 'fsdp'),        # model width
    ('mlp', 'tensor'),        # MLP hidden (and the time-MLP hidden)
    ('heads', 'tensor'),      # fused heads × head_dim of q/k/v and the attention projection
    ('modulation', 'tensor'),  # adaLN outputs (6·width per block)
    ('conv_in', 'fsdp'),      # U-Net conv input channels
    ('conv_out', 'tensor'),   # U-Net conv output channels
    ('patch', None),          # p·p·C patch features (small)
    ('classes', None),        # label-table rows (K + 1: rarely divisible)
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh with Auto axis types over `devices` (default: all).

  One entry of `mesh_shape` may be -1: all remaining devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'mesh_shape {tuple(mesh_shape)} must have {len(MESH_AXES)} entries, one '
                     f'per axis {MESH_AXES}.')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh_shape {tuple(mesh_shape)}: sizes must be positive, at most one -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'mesh_shape {tuple(mesh_shape)}: {len(devices)} devices are not '
                       f'divisible by {known}.')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f'mesh_shape {tuple(mesh_shape)} needs {math.prod(shape)} devices, but '
                     f'{len(devices)} are available; use -1 for one axis to take the rest.')
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:  # Topology-aware device order (TPU ICI rings); plain order where jax has no opinion.
    return jax.make_mesh(tuple(shape), MESH_AXES, auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_mesh_spec(logical_names: Sequence[str | None] | None,
                         rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  """('embed', 'mlp') → PartitionSpec('fsdp', 'tensor'); a mesh axis is used at most once."""
  return _mesh_spec(logical_names, rules)


def _mesh_spec(logical_names, rules: Rules, shape: Sequence[int] | None = None,
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


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for every array in `state` (real or abstract), from nnx metadata.

  Variables become the same Variable holding a `NamedSharding` (as `nnx.get_named_sharding`
  returns), so the result can be `out_shardings` / `in_shardings` of a jit over the state, or
  an orbax restore target's shardings. Bare arrays are replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      shape = getattr(x.get_value(), 'shape', ())
      names = _logical_names(x)
      if names is not None and len(names) != len(shape):
        names = None  # e.g. a factored optimizer statistic: replicate rather than guess
      spec = _mesh_spec(names, rules, shape, mesh)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded_model(model_ctor: Callable[[], nnx.Module], mesh: Mesh,
                         rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Builds `model_ctor()` with every parameter created directly in its shards.

  The shapes come from `nnx.eval_shape`, the shardings from `state_shardings`, and the
  initialisation runs under `jax.jit` with those `out_shardings`, so no device ever holds the
  whole model. `model_ctor` must make its own `nnx.Rngs` (e.g.
  `lambda: DiT('XL/2', ..., rngs=nnx.Rngs(0))`).
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(model_ctor))
  shardings = state_shardings(abstract_state, mesh, rules)

  init = jax.jit(lambda: nnx.state(model_ctor()), out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def to_host(x) -> np.ndarray:
  """A global array as host numpy; across processes, gathered from all of them."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))
