"""The residuals of the hand-written derivatives, kept in a form XLA:CPU stacks in place.

A scanned DiT (`nnx.scan` over the blocks) stacks every residual its blocks' derivatives keep
into one (depth, …) buffer, written one layer at a time by a dynamic-update-slice. XLA:CPU of
jaxlib 0.10.2 has no bf16 dynamic-update-slice (0.12 has): its float normalisation rewrites one as
convert(buffer) → f32 update → convert back, which reads and writes the *whole* stacked buffer
for every layer (depth² work instead of depth). In the W1 bf16 train step (DiT-S/2, batch 32) that
was 15 % of the op time (benchmarks/README.md). The same bits as uint16 are plain data to XLA:
the update stays in place. `custom_vjp` pairs made with `kept` store their low-precision
residuals that way on CPU; float32 residuals, and every residual on GPU and TPU (where bf16
updates are native), are kept as they are.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

_HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Bits:
  """A bf16/f16 array's bits as uint16, and a zero-size array of its dtype (the dtype to
  restore: a pytree's leaves must be arrays)."""
  bits: jax.Array
  like: jax.Array


def _keep_leaf(x):
  if isinstance(x, jax.Array) and x.dtype in _HALF_FLOATS and x.size:
    return _Bits(lax.bitcast_convert_type(x, jnp.uint16), jnp.zeros((0,), x.dtype))
  return x


def _restore_leaf(x):
  return lax.bitcast_convert_type(x.bits, x.like.dtype) if isinstance(x, _Bits) else x


_BUILDING_FOR = []  # the platforms of the enclosing `building_for` blocks, innermost last


@contextlib.contextmanager
def building_for(platform):
  """Inside, `target_platform()` is `platform`: an ahead-of-time compile for a TPU on a CPU
  host builds its models for the TPU (bf16 compute kept), not for this host's CPU."""
  _BUILDING_FOR.append(platform)
  try:
    yield
  finally:
    _BUILDING_FOR.pop()


def target_platform():
  """The platform the traced program is for: `building_for`'s, the mesh's (`jax.set_mesh`,
  e.g. TPU devices of an ahead-of-time compile on a CPU host), else the default backend."""
  if _BUILDING_FOR:
    return _BUILDING_FOR[-1]
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  return getattr(device, 'platform', None) or jax.default_backend()


def keep(residuals):
  """`residuals` as a derivative keeps them: bf16/f16 arrays as their uint16 bits on XLA:CPU."""
  if target_platform() != 'cpu':
    return residuals
  return jax.tree.map(_keep_leaf, residuals)


def restore(residuals):
  """The residuals `keep` was given."""
  return jax.tree.map(_restore_leaf, residuals, is_leaf=lambda x: isinstance(x, _Bits))


def kept(fwd, bwd):
  """(fwd, bwd) for `custom_vjp.defvjp`, the residuals between them passed through `keep` and
  `restore`. `fwd(*args) -> (out, residuals)`; `bwd(*nondiff_args, residuals, cotangent)`."""

  def kept_fwd(*args):
    out, residuals = fwd(*args)
    return out, keep(residuals)

  def kept_bwd(*args):
    *nondiff, residuals, cotangent = args
    return bwd(*nondiff, restore(residuals), cotangent)

  return kept_fwd, kept_bwd
