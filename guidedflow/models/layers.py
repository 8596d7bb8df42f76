"""Small pieces shared by the networks: logical-axis initialisers and activation constraints,
f32 norms, time embeddings."""

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow.models import stash

Initializer = Callable[..., jax.Array]

# Logical name of the leading axis of parameters stacked for `nnx.scan` (one slice per block).
LAYER_AXIS = 'layers'


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """Wraps `init` so the created `nnx.Param` carries logical axis names `names`.

  The names are *logical* ('embed', 'mlp', ...), not mesh axes: `guidedflow.sharding` maps them
  to a mesh with its rules. Eager sharding (flax's default since 0.12) would try to place the
  array on mesh axes of these names at creation, so it is switched off per parameter; models
  are placed on a mesh by `sharding.state_shardings` (init under `jax.jit`).
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


# Logical activation dims → axes of `guidedflow.sharding`'s mesh ('data', 'fsdp', 'tensor'):
# the batch is split over data × fsdp, heads and the MLP hidden over tensor. A name not listed
# (None) is replicated; `UNCONSTRAINED` leaves the dim to XLA.
ACTIVATION_RULES = {'batch': ('data', 'fsdp'), 'heads': ('tensor',), 'mlp': ('tensor',)}
UNCONSTRAINED = jax.sharding.PartitionSpec.UNCONSTRAINED
CONSTRAIN_ACTIVATIONS = True  # False: XLA alone decides (benchmarks/sharding_review.py compares)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """`x` pinned to the mesh layout of its logical dims `names` (one per dim of x).

  Without this, XLA's sharding propagation may follow the FSDP-sharded weights into the
  activations: XL-size blocks then all-gather the global batch and all-reduce (B, N, 4D)
  partial sums instead of all-gathering weights and reduce-scattering gradients
  (`benchmarks/sharding_review.py`). A no-op outside a multi-device mesh (`jax.set_mesh`) or
  for mesh axes the mesh lacks; a dim its axes do not divide is left to XLA.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not CONSTRAIN_ACTIVATIONS:
    return x
  spec = []
  for dim, name in zip(x.shape, names, strict=True):
    if name is UNCONSTRAINED or name is None:
      spec.append(name)
      continue
    axes = tuple(a for a in ACTIVATION_RULES[name] if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes:
      spec.append(None)
    elif dim % math.prod(mesh.shape[a] for a in axes):
      spec.append(UNCONSTRAINED)
    else:
      spec.append(axes if len(axes) > 1 else axes[0])
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def layer_norm_f32(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters over the last axis; statistics and result in f32.

  Its derivative keeps the output y and 1/σ (one f32 tensor of x's shape): dx = (dy − mean(dy)
  − y·mean(dy·y)) / σ. JAX's own derivative of the formula kept three (benchmarks/memory.py).
  """
  return layer_norm_f32_fwd(x, eps)[0]


def layer_norm_f32_fwd(x, eps):
  """(y, residuals) of `layer_norm_f32`; also the first half of `fused.norm_modulate_dense`."""
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  y = centred * inv_std
  return y, (y, inv_std, jnp.zeros((), x.dtype))


def layer_norm_f32_bwd(eps, residuals, dy):
  """(dx,) of `layer_norm_f32` from its residuals and the output's cotangent dy."""
  del eps
  y, inv_std, like = residuals
  dx = inv_std * (dy - jnp.mean(dy, axis=-1, keepdims=True)
                  - y * jnp.mean(dy * y, axis=-1, keepdims=True))
  return (dx.astype(like.dtype),)


layer_norm_f32.defvjp(*stash.kept(layer_norm_f32_fwd, layer_norm_f32_bwd))


_GELU_C = math.sqrt(2.0 / math.pi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu_tanh(x: jax.Array, dtype=None) -> jax.Array:
  """GeLU, tanh approximation (`jax.nn.gelu(x, approximate=True)`), computed in f32, returned in
  `dtype` (default x's); its derivative keeps only x, rounded to `dtype`.

  JAX's derivative of the formula keeps five intermediates besides x, each as large as the MLP
  hidden layer, the largest activations of a transformer block (benchmarks/memory.py); this one
  recomputes them from x in the backward pass. f32 arithmetic: XLA:CPU evaluated the formula
  on bf16 2.5× slower than on f32 followed by a rounding (17 % of the bf16 DiT forward).
  """
  return gelu_tanh_fwd(x, dtype)[0]


def gelu_tanh_fwd(x, dtype):
  """(GeLU(x) in `dtype`, residuals) of `gelu_tanh`; also used by `fused.gelu_dense`."""
  dtype = dtype or x.dtype
  out = jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(dtype)
  return out, (x.astype(dtype), jnp.zeros((), x.dtype))


def gelu_tanh_bwd(dtype, residuals, dy):
  """(dx,) of `gelu_tanh` from its residuals (x in `dtype`) and the output's cotangent dy."""
  del dtype
  x, like = residuals
  x32 = x.astype(jnp.float32)
  tanh = jnp.tanh(_GELU_C * (x32 + 0.044715 * x32**3))
  slope = 0.5 * (1.0 + tanh) + 0.5 * x32 * (1.0 - tanh**2) * _GELU_C * (1.0 + 3 * 0.044715 * x32**2)
  return ((dy.astype(jnp.float32) * slope).astype(like.dtype),)


gelu_tanh.defvjp(*stash.kept(gelu_tanh_fwd, gelu_tanh_bwd))


def timestep_embedding(t: jax.Array, dim: int, *, time_scale: float = 1000.0,
                       max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of times `t` (B,) in [0, 1] → (B, dim) float32.

  `t` is multiplied by `time_scale` first, so t ∈ [0, 1] covers the same phase range as DDPM's
  integer steps 0..1000 that the DiT frequencies (max_period 10⁴) were designed for; without it
  the low frequencies would barely move across [0, 1]. Layout [cos | sin] as in DiT.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (time_scale * t.astype(jnp.float32))[:, None] * freqs[None, :]  # (B, half)
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def sincos_2d_position_embedding(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (MAE/DiT), shape (grid_h·grid_w, dim), float32.

  Half the channels encode the row, half the column; `dim` must be divisible by 4. Computed in
  numpy so that it is a compile-time constant, not a parameter.
  """
  if dim % 4:
    raise ValueError(f'2-D sin-cos position embedding needs width divisible by 4, got {dim}.')

  def one_d(pos: np.ndarray, d: int) -> np.ndarray:
    omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)  # (M, d/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  emb = np.concatenate([one_d(rows, dim // 2), one_d(cols, dim // 2)], axis=1)
  return emb.astype(np.float32)


def param_count(model: nnx.Module) -> int:
  """Number of scalars in the model's `nnx.Param`s (works on `nnx.eval_shape` models too)."""
  params = nnx.state(model, nnx.Param)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def as_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
  """`28` or `(28, 28)` → `(28, 28)`."""
  if isinstance(input_size, int):
    return input_size, input_size
  h, w = input_size
  return int(h), int(w)
