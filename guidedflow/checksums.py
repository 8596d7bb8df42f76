"""Checksums of a pytree of (sharded) arrays, computed on device, so that a checkpoint whose
bytes changed on disk is caught at restore instead of training on from garbage.

For each array x with elements viewed as unsigned 32-bit integers b_i (their raw bits, i the
row-major index), the checksum is Σ_i h(b_i) · (h(i) | 1) mod 2³², with h a bijective 32-bit
mixer (xorshift-multiply, "lowbias32"). Sums mod 2³² are exact in any order, so the value does
not depend on the sharding, the mesh or how XLA splits the reduction: the checksum of a state
saved on one topology matches the same state restored on another. A change of one element
changes h(b_i) (h is a bijection) by some d ≠ 0 and the sum by d times an odd number, never
0 mod 2³², so every single-element change is caught; the mixed, position-dependent weights make
structured changes (a swap, the same bits added everywhere, a doubled array) as unlikely to
cancel as random ones, about 2⁻³². The cost is one elementwise pass, no host copy.

`file_record` / `file_damage` do the same for files written once and read many times (the
latent cache): size and CRC-32, checked when the file is opened.
"""

import hashlib
import mmap
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

# Saved beside the checksums: a checkpoint whose checksums were computed otherwise is restored
# unverified rather than blamed. Change it whenever the function below changes.
ALGORITHM = 'sum-lowbias32-odd-weights/v1'
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _mix(x):
  """lowbias32 (Chris Wellons): a bijection of uint32 with good avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _leaf_checksum(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize in _UNSIGNED:
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
  else:  # 64-bit leaves (jax_enable_x64): both 32-bit halves
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return _leaf_checksum(halves[..., 0]) * jnp.uint32(3) + _leaf_checksum(halves[..., 1])
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):  # row-major index without reshaping the sharded array
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
    stride = stride * x.shape[axis] % 2**32
  return jnp.sum(_mix(bits) * (_mix(index) | jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _tree_checksums(tree):
  return jax.tree.map(_leaf_checksum, tree)


def key_name(key):
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def checksums(tree):
  """{'/'-joined leaf path: 8 hex digits} of every array leaf of `tree` (same on every
  process)."""
  sums = _tree_checksums(tree)
  leaves, _ = jax.tree_util.tree_flatten_with_path(sums)
  out = {}
  for path, value in leaves:
    # Replicated scalar: every process holds it whole (also when the input spans processes).
    local = value.addressable_data(0) if isinstance(value, jax.Array) else value
    out['/'.join(key_name(k) for k in path)] = f'{int(np.asarray(local)):08x}'
  return out


def mismatches(saved, tree):
  """The leaf paths whose checksum in `tree` differs from `saved` (a `checksums` dict); paths
  only in one of them count as differences."""
  now = checksums(tree)
  return sorted(path for path in set(saved) | set(now) if saved.get(path) != now.get(path))


# Files (caches written once, read many times): the size and a CRC-32 of the bytes, which
# catches truncation, replaced files and changed bytes (a burst of up to 32 changed bits
# always, any other change but for ~2⁻³²); zlib's CRC-32 reads ~4 GB/s on these CPUs.
FILE_ALGORITHM = 'crc32/v1'
_CHUNK = 64 << 20


def file_record(path):
  """{'bytes': size, 'crc32': 8 hex digits} of the file at `path` (a local path); reads through
  a memory map, so no copy of the file is allocated."""
  crc, size = 0, os.path.getsize(path)
  if size:
    with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
      with memoryview(view) as data:
        for start in range(0, size, _CHUNK):
          crc = zlib.crc32(data[start:start + _CHUNK], crc)
  return {'bytes': size, 'crc32': f'{crc:08x}'}


def file_damage(path, record):
  """Why the file at `path` no longer matches `record` (from `file_record`); None if it does."""
  try:
    size = os.path.getsize(path)
  except FileNotFoundError:
    return 'it is missing'
  if size != record['bytes']:
    return (f'it holds {size} bytes, not the {record["bytes"]} written '
            f'({"truncated" if size < record["bytes"] else "grown"})')
  if file_record(path)['crc32'] != record['crc32']:
    return 'its bytes changed since it was written (CRC-32 mismatch)'
  return None


def fingerprint(params, salt=''):
  """16 hex digits that name a tree of weights (with `salt`): the identity of an encoder whose
  outputs a cache holds (SHA-256 of every leaf's path and float32 bytes, in path order)."""
  digest = hashlib.sha256(str(salt).encode())
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                           key=lambda item: jax.tree_util.keystr(item[0])):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return digest.hexdigest()[:16]
