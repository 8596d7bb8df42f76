"""Mixed-precision matmuls: low-precision operands, float32 accumulation and output, both ways.

XLA:CPU runs a bf16 × bf16 → bf16 dot as convert → f32 dot → convert (no matrix units), but a
bf16 × bf16 → f32 dot (`preferred_element_type=float32`) goes to the matrix units where the
CPU has them (Intel AMX: ~3× the f32 matmul rate on the 2-core Xeon of benchmarks/README.md);
GPUs and TPUs accumulate bf16 dots in f32 either way. JAX's own transpose of such a dot
multiplies the f32 cotangent with a bf16 operand, i.e. an f32 dot again, so the backward pass
(two thirds of a train step's FLOPs) would miss the matrix units. `mixed_dot_general` is a
`lax.dot_general` with a custom VJP: forward and both operand gradients are bf16 × bf16 → f32
dots (the cotangent is rounded to the operands' dtype first, as PyTorch autocast and mixed-
precision training do). Float32 operands take the plain `lax.dot_general`, bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

from guidedflow.models import stash

LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _kept(ndim, contract, batch):
  return [d for d in range(ndim) if d not in contract and d not in batch]


def _grad_lhs(g, lhs_ndim, rhs, dimension_numbers, swap_ans=False):
  """Cotangent of the lhs of `dot_general(lhs, rhs, dimension_numbers)` given its output's `g`."""
  (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
  x_kept = _kept(lhs_ndim, x_contract, x_batch)
  y_kept = _kept(rhs.ndim, y_contract, y_batch)
  n_batch = len(x_batch)
  # The output's axes are (batch, lhs kept, rhs kept), or (batch, rhs kept, lhs kept) when the
  # operands were swapped (the rhs gradient is computed as a swapped lhs gradient).
  start = n_batch if swap_ans else n_batch + len(x_kept)
  ans_y = tuple(range(start, start + len(y_kept)))
  dims = ((ans_y, tuple(y_kept)), (tuple(range(n_batch)), tuple(y_batch)))
  out = _matmul_f32(g, rhs, dims)
  # `out` axes: batch, lhs kept, then lhs contracting dims in the order of the rhs's.
  x_contract_by_y = [x_contract[i] for i in np.argsort(y_contract)]
  return jnp.transpose(out, tuple(np.argsort(list(x_batch) + x_kept + x_contract_by_y)))


def _matmul_f32(lhs, rhs, dimension_numbers):
  """bf16 × bf16 → f32 `dot_general` as a canonical (batch, M, K) × (batch, K, N) matmul.

  XLA:CPU sends a mixed dot to its matmul library (YNNPACK) only in some layouts; the others
  fall to a runtime without a bf16 × bf16 → f32 kernel ("Unsupported element type for
  DotThunk"). Transposing and flattening to one batch, one M, one K and one N dimension gives a
  layout it always takes (and, with no batch, a plain 2-D GEMM). Only for XLA:CPU: on TPU and
  GPU the flattening (b and h merged into one batch dim) and the barrier would keep XLA from
  sharding the dot and fusing around it (attention heads were all-gathered under a 'tensor'
  mesh axis: benchmarks/sharding_review.py), so there it is the plain mixed dot.
  """
  if target_platform() != 'cpu':
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)
  (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
  x_kept = _kept(lhs.ndim, x_contract, x_batch)
  y_kept = _kept(rhs.ndim, y_contract, y_batch)
  b, m, k, n = _size(lhs, x_batch), _size(lhs, x_kept), _size(lhs, x_contract), _size(rhs, y_kept)
  rhs_order = tuple(y_batch) + tuple(y_contract) + tuple(y_kept)
  if (lhs.dtype == rhs.dtype == jnp.float32 and not x_batch and rhs_order == tuple(range(rhs.ndim))
      and tuple(x_contract) == tuple(range(len(x_contract)))):
    # A weight gradient, Aᵀ·B contracting the tokens (the leading axes) of both: XLA:CPU runs
    # an f32 GEMM with a transposed lhs as it is, as fast as A transposed first when A is the
    # smaller operand (`dot_f32_grads` makes it so), and the transpose pass is saved.
    out = lax.dot_general(lhs.reshape(k, m), rhs.reshape(k, n), (((0,), (0,)), ((), ())))
    return lax.optimization_barrier(out).reshape(
        [lhs.shape[d] for d in x_kept] + [rhs.shape[d] for d in y_kept])
  a = jnp.transpose(lhs, tuple(x_batch) + tuple(x_kept) + tuple(x_contract)).reshape(b, m, k)
  c = jnp.transpose(rhs, rhs_order).reshape(b, k, n)
  if rhs.dtype != jnp.float32 and rhs_order != tuple(range(rhs.ndim)):
    # A transposed bf16 weight (the input gradient of a Linear, x̄ = ȳ Wᵀ: a third of a train
    # step's FLOPs): XLA folds the transpose into the dot's dimension numbers, a layout its bf16
    # path does not take, and runs the dot as convert → f32 dot. Behind a barrier (a copy of the
    # small operand) it stays a bf16 GEMM: W1 / W2 bf16 train step 1.16× / 1.19×
    # (benchmarks/README.md; tests/precision_test.py). f32 takes the folded layout at full speed.
    c = lax.optimization_barrier(c)
  if x_batch:
    out = lax.dot_general(a, c, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  else:
    out = lax.dot_general(a[0], c[0], (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  # Keep XLA from folding a transpose of the result back into the dot's layout.
  out = lax.optimization_barrier(out)
  shape = ([lhs.shape[d] for d in x_batch] + [lhs.shape[d] for d in x_kept]
           + [rhs.shape[d] for d in y_kept])
  return out.reshape(shape)


target_platform = stash.target_platform  # the traced program's platform (stash's too)
building_for = stash.building_for  # models built inside are for that platform (aot.py)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_dot(lhs, rhs, dimension_numbers):
  return _matmul_f32(lhs, rhs, dimension_numbers)


def _mixed_dot_fwd(lhs, rhs, dimension_numbers):
  return _mixed_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _mixed_dot_bwd(dimension_numbers, residuals, g):
  lhs, rhs = residuals
  d_lhs, d_rhs = dot_f32_grads(lhs, rhs, dimension_numbers, g.astype(lhs.dtype))
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


def dot_f32(lhs, rhs, dimension_numbers):
  """`lax.dot_general` → float32 in the layouts above (the forward of `mixed_dot_general` for
  operands of one dtype; for ops with their own derivative that contain a matmul)."""
  return _matmul_f32(lhs, rhs, _as_tuples(dimension_numbers))


def dot_f32_grads(lhs, rhs, dimension_numbers, g):
  """The f32 cotangents of `dot_f32(lhs, rhs, dimension_numbers)`'s operands given its output's
  cotangent `g` in the operands' dtype: two more `dot_f32`s (the input and weight gradients)."""
  dimension_numbers = _as_tuples(dimension_numbers)
  (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
  swapped = ((y_contract, x_contract), (y_batch, x_batch))
  d_lhs = _grad_lhs(g, lhs.ndim, rhs, dimension_numbers)
  # The weight gradient transposes one operand. f32: the smaller one, the input where the layer
  # widens (`_grad_rhs_transposing_lhs`). bf16: the cotangent, in a transpose pass of its own;
  # the input's transpose XLA:CPU fuses into the elementwise op that recomputes the input
  # (`fused.py`), where it ran at a tenth of a plain transpose's speed (11.7 ms for a (8192,
  # 384) on the Xeon of benchmarks/README.md: W1 bf16 train step 1.05× this way).
  if (x_batch or lhs.dtype != jnp.float32
      or _size(lhs, x_contract) >= _size(rhs, _kept(rhs.ndim, y_contract, y_batch))):
    return d_lhs, _grad_lhs(g, rhs.ndim, lhs, swapped, swap_ans=True)
  return d_lhs, _grad_rhs_transposing_lhs(g, lhs, rhs.ndim, dimension_numbers)


def _size(a, dims):
  return int(np.prod([a.shape[d] for d in dims], dtype=np.int64))


def _grad_rhs_transposing_lhs(g, lhs, rhs_ndim, dimension_numbers):
  """Cotangent of the rhs of an unbatched `dot_general(lhs, rhs, …)` as lhsᵀ · g.

  A weight gradient contracts over the tokens, so one of its operands must be transposed for
  the GEMM. `_grad_lhs`'s form (gᵀ · lhs, then the small result transposed) transposes the
  cotangent; this one transposes the layer's input, the smaller of the two where the layer
  widens (qkv, fc1: 3 and 4 times the width), and its result is already in the rhs's layout.
  """
  (x_contract, y_contract), _ = dimension_numbers
  x_kept = _kept(lhs.ndim, x_contract, ())
  # g's axes are (lhs kept, rhs kept); contract the former with the lhs's kept axes.
  out = _matmul_f32(lhs, g, ((tuple(x_kept), tuple(range(len(x_kept)))), ((), ())))
  # `out` axes: the lhs's contracting dims in ascending order, then the rhs's kept dims.
  y_kept = _kept(rhs_ndim, y_contract, ())
  y_by_x = [y_contract[x_contract.index(d)] for d in sorted(x_contract)]
  return jnp.transpose(out, tuple(np.argsort(y_by_x + y_kept)))


_mixed_dot.defvjp(*stash.kept(_mixed_dot_fwd, _mixed_dot_bwd))


def _as_tuples(dimension_numbers):
  (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
  return ((tuple(int(d) for d in x_contract), tuple(int(d) for d in y_contract)),
          (tuple(int(d) for d in x_batch), tuple(int(d) for d in y_batch)))


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      **kwargs):
  """`lax.dot_general` with float32 accumulation for bf16/f16 operands (module docstring).

  Drop-in for `nnx.Linear(dot_general=...)` and `nnx.Einsum`: with two low-precision operands of
  one dtype the result is float32 (cast to `preferred_element_type` if another one is asked
  for). Two float32 operands on XLA:CPU take the same route (`_matmul_f32`'s layouts, forward
  and backward): JAX's own weight-gradient dots had XLA:CPU transpose their operands in loop
  fusions with the elementwise ops before them, at a tenth of a plain transpose's speed
  (DiT-S/2 f32 train step 1.15× faster this way; benchmarks/README.md). Otherwise this is
  `lax.dot_general` itself.
  """
  if lhs.dtype == rhs.dtype and (any(lhs.dtype == d for d in LOW_PRECISION) or (
      lhs.dtype == jnp.float32 and target_platform() == 'cpu')):
    out = _mixed_dot(lhs, rhs, _as_tuples(dimension_numbers))
    return out if preferred_element_type is None else out.astype(preferred_element_type)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def einsum(subscripts, lhs, rhs):
  """Two-operand `jnp.einsum` through `mixed_dot_general`: float32 result, gradients as above."""
  return jnp.einsum(subscripts, lhs, rhs, preferred_element_type=jnp.float32,
                    _dot_general=mixed_dot_general)


def cpu_bf16_units(cpuinfo_path='/proc/cpuinfo'):
  """The bf16 matrix/vector units of this CPU ('amx_bf16', 'avx512_bf16'), () if none/unknown."""
  try:
    with open(cpuinfo_path, encoding='utf-8') as f:
      flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
  except OSError:
    return ()
  return tuple(unit for unit in ('amx_bf16', 'avx512_bf16') if unit in flags)


def resolve_compute_dtype(name, backend, *, convolutional=False, cpuinfo_path='/proc/cpuinfo'):
  """(dtype name to compute in, reason or None): where bf16 would be slower on a CPU → float32.

  XLA:CPU computes a bf16 matmul by converting to f32 on a CPU without AMX or AVX512-BF16 (bf16
  costs the f32 matmul plus the conversions), and it runs bf16 convolutions no faster than f32
  even with them (benchmarks/README.md). The program then computes in float32 and says why.
  Accelerators keep bf16.
  """
  if name != 'bfloat16' or backend != 'cpu':
    return name, None
  if not cpu_bf16_units(cpuinfo_path):
    return 'float32', ('this CPU has no bf16 units (AMX or AVX512-BF16), where XLA runs bf16 '
                       'matmuls as f32 plus conversions: computing in float32 instead')
  if convolutional:
    return 'float32', ('XLA:CPU runs bf16 convolutions no faster than f32: computing the '
                       'convolutional network in float32 instead')
  return name, None


# Where an inference program's dots run on XLA:CPU (`config.sampling.cpu_dots`).
CPU_DOTS = ('auto', 'ynnpack', 'eigen', 'onednn')
# Where a train step's dots run on XLA:CPU (`config.train.cpu_dots`).
TRAIN_CPU_DOTS = ('auto', 'ynnpack', 'onednn')
# YNNPACK keeps the convolutions; dots (and their fusions) go to XLA's Eigen-based GEMMs.
_DOTS_IN_EIGEN = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}
# The dots, with the elementwise ops XLA fuses into them, in oneDNN fusions (dots alone: W1 /
# W2 f32 train 0.99× / 0.95×, CFG sampling 0.99× / 0.90× of these, benchmarks/README.md).
_DOTS_IN_ONEDNN = {
    'xla_cpu_use_onednn': True,
    'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE'}
# The first jaxlib whose oneDNN dot fusions outran YNNPACK (and YNNPACK Eigen) with the f32 DiT
# on the AMX Xeon; with jaxlib 0.10 they failed to compile the U-Net's train step and the DiT's
# sampler, and XLA:CPU aborted the process.
ONEDNN_SINCE = (0, 12)


def inference_compiler_options(cpu_dots, compute_dtype, backend, cpuinfo_path='/proc/cpuinfo',
                               jaxlib_version=None, *, convolutional=False):
  """XLA compiler options for a forward-only program (the Sampler's), or None for the defaults.

  On the 2-core Intel Xeon with AMX of benchmarks/README.md, jaxlib 0.10's Eigen GEMMs ran the
  DiT's forward f32 matmuls 7–31 % faster than YNNPACK, its default (CFG sampling of DiT-S/2
  1.16×, DiT-T/4 1.04×). With jaxlib 0.12 YNNPACK samples DiT-S/2 1.11× faster than Eigen, and
  oneDNN's dot fusions 1.07× (DiT-T/4 1.12×) faster than YNNPACK. 'auto' takes, for an f32
  network on such a CPU (AMX: the machine measured), Eigen's GEMMs with jaxlib < 0.12 and
  oneDNN's from 0.12 (not for a convolutional network), XLA's defaults elsewhere (YNNPACK, at
  the matmul peak on AMD EPYCs); bf16 keeps YNNPACK, whose bf16 GEMMs use the matrix units.
  'ynnpack', 'eigen' (f32 only) and 'onednn' force them. Accelerators take no options.
  `jaxlib_version` ((major, minor); default: the installed one) is for tests.
  """
  if cpu_dots not in CPU_DOTS:
    raise ValueError(f'cpu_dots={cpu_dots!r}: use one of {CPU_DOTS}')
  if backend != 'cpu' or cpu_dots == 'ynnpack':
    return None
  if cpu_dots == 'onednn' or (cpu_dots == 'auto' and _onednn_pays(
      compute_dtype, convolutional, cpuinfo_path, jaxlib_version)):
    return dict(_DOTS_IN_ONEDNN)
  if compute_dtype != 'float32':
    return None
  if cpu_dots == 'eigen' or (
      'amx_bf16' in cpu_bf16_units(cpuinfo_path)
      and jaxlib_version_tuple(jaxlib_version) < ONEDNN_SINCE):
    return dict(_DOTS_IN_EIGEN)
  return None


def train_compiler_options(cpu_dots, compute_dtype, backend, *, convolutional,
                           cpuinfo_path='/proc/cpuinfo', jaxlib_version=None):
  """XLA compiler options for a train step, or None for the defaults.

  On the 2-core Intel Xeon with AMX of benchmarks/README.md, jaxlib 0.12's oneDNN dot fusions
  ran the DiT's f32 train step 1.12× (DiT-S/2) and 1.06× (DiT-T/4) as fast as YNNPACK, its
  default, but bf16 at 0.45× and the U-Net at 0.96×; with jaxlib 0.10 they gained nothing and
  aborted some programs. 'auto' takes oneDNN for an f32, non-convolutional network on such a
  CPU (AMX: the machine measured) with jaxlib ≥ 0.12, XLA's defaults elsewhere; 'ynnpack' /
  'onednn' force them. Accelerators take no options. `jaxlib_version` ((major, minor);
  default: the installed one) is for tests.
  """
  if cpu_dots not in TRAIN_CPU_DOTS:
    raise ValueError(f'cpu_dots={cpu_dots!r}: use one of {TRAIN_CPU_DOTS}')
  if backend != 'cpu' or cpu_dots == 'ynnpack':
    return None
  if cpu_dots == 'onednn' or _onednn_pays(compute_dtype, convolutional, cpuinfo_path,
                                          jaxlib_version):
    return dict(_DOTS_IN_ONEDNN)
  return None


def _onednn_pays(compute_dtype, convolutional, cpuinfo_path, jaxlib_version):
  """Whether oneDNN's fusions ran this XLA:CPU program faster where measured: an f32,
  non-convolutional network (the DiT), a CPU with AMX, jaxlib ≥ 0.12."""
  return (compute_dtype == 'float32' and not convolutional
          and jaxlib_version_tuple(jaxlib_version) >= ONEDNN_SINCE
          and 'amx_bf16' in cpu_bf16_units(cpuinfo_path))


def jaxlib_version_tuple(version=None):
  """(major, minor) of `version`, default the installed jaxlib's."""
  return version or tuple(int(p) for p in jaxlib.__version__.split('.')[:2])
