"""Mixed-precision matmuls: f32 accumulation forward and backward, every layout the DiT uses."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from guidedflow.models import attention
from guidedflow.models import precision
from guidedflow import schema
from guidedflow.tasks import registry

# (subscripts, lhs shape, rhs shape): a Linear on tokens, a Linear on vectors, attention logits
# and attention output in the DiT's layouts.
LAYOUTS = [
    ('bnd,de->bne', (3, 8, 16), (16, 12)),
    ('bnd,de->bne', (3, 8, 12), (12, 40)),  # widening (qkv, fc1): the other weight gradient
    ('nd,de->ne', (8, 16), (16, 12)),
    ('bnhd,hde->bne', (2, 8, 3, 4), (3, 4, 20)),  # two contracting dims
    ('bqhd,bkhd->bhqk', (2, 5, 3, 8), (2, 7, 3, 8)),
    ('bhqk,bkhd->bqhd', (2, 3, 5, 7), (2, 7, 3, 8)),
]


def _operands(lhs_shape, rhs_shape, dtype):
  key_a, key_b = jax.random.split(jax.random.key(0))
  return (jax.random.normal(key_a, lhs_shape).astype(dtype),
          jax.random.normal(key_b, rhs_shape).astype(dtype))


def _dot_eqns(jaxpr, primitive='dot_general'):
  """Every `primitive` equation in a closed jaxpr, sub-jaxprs (custom_vjp, pjit) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      found.append(eqn)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None:
          found.extend(_dot_eqns(inner if hasattr(inner, 'eqns') else inner.jaxpr, primitive))
  return found


@pytest.mark.parametrize('subscripts,lhs_shape,rhs_shape', LAYOUTS)
def test_bf16_forward_and_gradients_match_f32_reference(subscripts, lhs_shape, rhs_shape):
  """Compiled (where XLA:CPU picks the kernel): values to bf16 rounding of the operands and
  cotangent; outputs are float32 and operand gradients keep the operands' dtype."""
  lhs, rhs = _operands(lhs_shape, rhs_shape, jnp.bfloat16)

  @jax.jit
  def run(lhs, rhs, cotangent):
    out, vjp = jax.vjp(lambda a, b: precision.einsum(subscripts, a, b), lhs, rhs)
    return out, vjp(cotangent)

  out_shape = jnp.einsum(subscripts, lhs, rhs).shape
  cotangent = jax.random.normal(jax.random.key(1), out_shape)
  out, (d_lhs, d_rhs) = run(lhs, rhs, cotangent)
  f32 = lambda a: a.astype(jnp.float32)
  ref_out, ref_vjp = jax.vjp(lambda a, b: jnp.einsum(subscripts, a, b), f32(lhs), f32(rhs))
  ref_lhs, ref_rhs = ref_vjp(f32(cotangent.astype(jnp.bfloat16)))
  assert out.dtype == jnp.float32 and d_lhs.dtype == d_rhs.dtype == jnp.bfloat16
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)  # exact products, f32 sums
  for got, want in ((d_lhs, ref_lhs), (d_rhs, ref_rhs)):
    np.testing.assert_allclose(f32(got), want, rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))


def test_backward_dots_stay_low_precision():
  """JAX's own transpose of a bf16→f32 dot multiplies the f32 cotangent by a bf16 operand (an
  f32 dot, no matrix units); here every dot of the gradient takes two bf16 operands."""
  lhs, rhs = _operands((3, 8, 16), (16, 12), jnp.bfloat16)
  grad = jax.grad(lambda a, b: precision.einsum('bnd,de->bne', a, b).sum(), argnums=(0, 1))
  eqns = _dot_eqns(jax.make_jaxpr(grad)(lhs, rhs).jaxpr)
  assert len(eqns) >= 3  # forward, d_lhs, d_rhs
  for eqn in eqns:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
    assert eqn.params['preferred_element_type'] == jnp.float32, eqn
  plain = jax.grad(lambda a, b: jnp.einsum('bnd,de->bne', a, b,
                                           preferred_element_type=jnp.float32).sum(),
                   argnums=(0, 1))
  plain_eqns = _dot_eqns(jax.make_jaxpr(plain)(lhs, rhs).jaxpr)
  assert any(jnp.float32 in [v.aval.dtype for v in e.invars] for e in plain_eqns)


def _compiled_dot_operand_dtypes(hlo_text):
  """(lhs dtype, rhs dtype) of every dot in compiled HLO text (fused computations included)."""
  dtypes = dict(re.findall(r'%([\w.\-]+) = (\w+)\[', hlo_text))
  dots = re.findall(r'= \w+\[[^=]*? dot\(%([\w.\-]+), %([\w.\-]+)\)', hlo_text)
  return [(dtypes.get(lhs), dtypes.get(rhs)) for lhs, rhs in dots]


@pytest.mark.parametrize('subscripts,lhs_shape,rhs_shape', LAYOUTS)
def test_compiled_gradient_dots_keep_bf16_operands(subscripts, lhs_shape, rhs_shape):
  """What XLA:CPU compiles, not only the jaxpr: the input gradient of a Linear (x̄ = ȳ Wᵀ) had
  its transpose folded into the dot and ran as an f32 × f32 dot of converted operands (the
  bf16 train step's input-gradient GEMMs at the f32 rate) until the transposed weight was
  materialised."""
  lhs, rhs = _operands(lhs_shape, rhs_shape, jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda a, b: precision.einsum(subscripts, a, b).sum(), argnums=(0, 1)))
  dots = _compiled_dot_operand_dtypes(grad.lower(lhs, rhs).compile().as_text())
  assert len(dots) >= 2, dots  # d_lhs and d_rhs
  assert all(pair == ('bf16', 'bf16') for pair in dots), dots


def test_compiled_attention_dots_keep_bf16_operands():
  """Attention forward and backward as XLA:CPU compiles them: its transposed operands (kᵀ, vᵀ,
  qᵀ, dOᵀ) made by swapping the axes of a (B·H, N, D) array were dots XLA ran in f32."""
  qkv = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 2, 3, 8)).astype(jnp.bfloat16)
  loss = lambda x: attention.qkv_attention(x, 0.5).sum()
  dots = _compiled_dot_operand_dtypes(jax.jit(jax.grad(loss)).lower(qkv).compile().as_text())
  assert len(dots) == 5, dots  # logits recomputed for P; dP, dQ, dKᵀ, dVᵀ (P·V is unused)
  assert all(pair == ('bf16', 'bf16') for pair in dots), dots


@pytest.mark.parametrize('lhs_shape,rhs_shape,dims', [
    ((3, 8, 16), (16, 12), (((2,), (0,)), ((), ()))),
    ((3, 8, 12), (12, 40), (((2,), (0,)), ((), ()))),
    ((6, 4, 3), (3, 40, 4), (((2, 1), (0, 2)), ((), ()))),  # contracting dims out of order
])
def test_f32_operands_same_values_and_gradients_as_plain_dot_general(lhs_shape, rhs_shape, dims):
  """On CPU f32 dots take the canonical-layout route too: the same products, forward and back,
  whichever operand the weight gradient transposes."""
  lhs, rhs = _operands(lhs_shape, rhs_shape, jnp.float32)
  out_shape = jax.eval_shape(lambda: jax.lax.dot_general(lhs, rhs, dims)).shape
  cotangent = jax.random.normal(jax.random.PRNGKey(5), out_shape)
  out, vjp = jax.vjp(lambda a, b: precision.mixed_dot_general(a, b, dims), lhs, rhs)
  ref_out, ref_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), lhs, rhs)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
  for got, want in zip(vjp(cotangent), ref_vjp(cotangent)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # float32 × bfloat16 (mixed dtypes) stays the plain dot.
  np.testing.assert_array_equal(
      precision.mixed_dot_general(lhs, rhs.astype(jnp.bfloat16), dims),
      jax.lax.dot_general(lhs, rhs.astype(jnp.bfloat16), dims))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('width,out', [(16, 64), (64, 16)])
def test_weight_gradient_transposes_the_smaller_operand(width, out, dtype):
  """A weight gradient contracts over the tokens, so one operand is transposed for its GEMM.
  f32: the layer's input (tokens, width) where the layer widens (qkv, fc1), the cotangent
  (tokens, out) otherwise (on XLA:CPU the GEMM takes it transposed as it is); XLA:CPU
  transposed the 4× larger cotangent of fc1 at 2.6 GB/s. bf16: never the input, whose
  transpose XLA:CPU fuses into the op that recomputes it (`fused.py`) and runs 10× slower."""
  lhs, rhs = _operands((2, 32, width), (width, out), dtype)
  grad = jax.grad(lambda a, b: precision.einsum('bnd,de->bne', a, b).sum(), argnums=(0, 1))
  transposes = [e for e in _dot_eqns(jax.make_jaxpr(grad)(lhs, rhs).jaxpr, 'transpose')
                if e.params['permutation'] != tuple(range(len(e.params['permutation'])))]
  shapes = [e.invars[0].aval.shape for e in transposes]
  if dtype == jnp.float32:
    assert max((np.prod(s) for s in shapes), default=0) <= 64 * min(width, out), shapes
  else:
    assert lhs.shape not in shapes and (2, 32, out) in shapes, shapes


def test_nnx_linear_with_mixed_dot_general():
  """As `nnx.Linear(dot_general=...)`: bf16 compute gives f32 out, grads for f32 params."""
  layer = nnx.Linear(16, 12, dtype=jnp.bfloat16, dot_general=precision.mixed_dot_general,
                     rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 8, 16))
  graphdef, params = nnx.split(layer)

  @jax.jit
  def loss(params, x):
    return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x)))

  grads = jax.grad(loss)(params, x)
  assert nnx.merge(graphdef, params)(x).dtype == jnp.float32
  ref = jax.grad(lambda p: jnp.mean(jnp.square(
      x @ p['kernel'][...] + p['bias'][...])))(params)
  np.testing.assert_allclose(grads['kernel'][...], ref['kernel'][...], rtol=3e-2,
                             atol=3e-2 * float(jnp.abs(ref['kernel'][...]).max()))
  assert grads['kernel'][...].dtype == jnp.float32


def _cpuinfo(tmp_path, flags):
  path = tmp_path / f'cpuinfo_{len(flags)}'
  path.write_text(f'processor\t: 0\nmodel name\t: test cpu\nflags\t\t: fpu sse2 {flags}\n')
  return str(path)


def test_bf16_falls_back_to_f32_on_a_cpu_without_bf16_units(tmp_path):
  no_units = _cpuinfo(tmp_path, 'avx avx2 fma')
  amx = _cpuinfo(tmp_path, 'avx2 avx512f avx512_bf16 amx_bf16 amx_tile')
  assert precision.cpu_bf16_units(amx) == ('amx_bf16', 'avx512_bf16')
  assert precision.cpu_bf16_units(no_units) == ()
  dtype, reason = precision.resolve_compute_dtype('bfloat16', 'cpu', cpuinfo_path=no_units)
  assert dtype == 'float32' and 'no bf16 units' in reason
  resolve = precision.resolve_compute_dtype
  assert resolve('bfloat16', 'cpu', cpuinfo_path=amx) == ('bfloat16', None)
  assert resolve('bfloat16', 'gpu', cpuinfo_path=no_units) == ('bfloat16', None)
  assert resolve('float32', 'cpu', cpuinfo_path=no_units) == ('float32', None)
  assert resolve('bfloat16', 'cpu', cpuinfo_path=str(tmp_path / 'missing')) == (dtype, reason)
  dtype, reason = resolve('bfloat16', 'cpu', convolutional=True, cpuinfo_path=amx)
  assert dtype == 'float32' and 'convolutions' in reason
  assert resolve('bfloat16', 'tpu', convolutional=True) == ('bfloat16', None)


def test_a_model_built_for_a_tpu_on_a_cpu_host_keeps_bf16():
  """--mode=compile builds its models inside `building_for('tpu')`: the compute dtype is the
  target's, not the CPU host's (whose bf16 units would otherwise decide it)."""
  from configs import imagenet256_latent  # pylint: disable=g-import-not-at-top
  from guidedflow.models import factory  # pylint: disable=g-import-not-at-top
  config = imagenet256_latent.get_config('test/2')
  with precision.building_for('tpu'):
    assert precision.target_platform() == 'tpu'
    assert factory.compute_dtype(config) == ('bfloat16', None)
  assert precision.target_platform() == jax.default_backend()
  expected = 'bfloat16' if precision.cpu_bf16_units() else 'float32'
  assert factory.compute_dtype(config)[0] == expected


_ONEDNN = {'xla_cpu_use_onednn': True,
           'xla_cpu_experimental_onednn_fusion_type':
               'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE'}


def test_inference_compiler_options_take_the_dots_library_measured_fastest(tmp_path):
  """'auto', f32 on a CPU with AMX: Eigen's GEMMs with jaxlib < 0.12, oneDNN's dot fusions from
  0.12 (not for a convolutional network), where each sampled faster; XLA's defaults for bf16,
  other CPUs and accelerators; 'ynnpack' / 'eigen' (f32) / 'onednn' force them."""
  amx = _cpuinfo(tmp_path, 'avx2 avx512f avx512_bf16 amx_bf16 amx_tile')
  zen4 = _cpuinfo(tmp_path, 'avx2 avx512f avx512_bf16')
  options = functools.partial(precision.inference_compiler_options, cpuinfo_path=amx,
                              jaxlib_version=(0, 10))
  eigen = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}
  assert options('auto', 'float32', 'cpu') == eigen
  assert options('auto', 'float32', 'cpu', convolutional=True) == eigen
  assert options('auto', 'bfloat16', 'cpu') is None
  assert options('ynnpack', 'float32', 'cpu') is None
  assert options('auto', 'float32', 'tpu') is None and options('eigen', 'float32', 'gpu') is None
  assert options('onednn', 'float32', 'gpu') is None
  for version in ((0, 12), (0, 13), (1, 0)):
    assert options('auto', 'float32', 'cpu', jaxlib_version=version) == _ONEDNN
    assert options('auto', 'float32', 'cpu', jaxlib_version=version, convolutional=True) is None
    assert options('auto', 'bfloat16', 'cpu', jaxlib_version=version) is None
    assert options('eigen', 'float32', 'cpu', jaxlib_version=version) == eigen
  assert options('eigen', 'bfloat16', 'cpu') is None
  assert options('onednn', 'bfloat16', 'cpu') == _ONEDNN
  for version in ((0, 10), (0, 12)):
    assert precision.inference_compiler_options('auto', 'float32', 'cpu', cpuinfo_path=zen4,
                                                jaxlib_version=version) is None
  assert precision.inference_compiler_options('eigen', 'float32', 'cpu', cpuinfo_path=zen4) == eigen
  with pytest.raises(ValueError, match='cpu_dots'):
    options('mkl', 'float32', 'cpu')


def test_train_compiler_options_take_onednn_for_an_f32_dit_where_measured_faster(tmp_path):
  """'auto': oneDNN's dot fusions for an f32, non-convolutional network on a CPU with AMX with
  jaxlib ≥ 0.12 (where the DiT trained faster), XLA's defaults for bf16, the U-Net, jaxlib
  0.10, other CPUs and accelerators; 'ynnpack' / 'onednn' force it."""
  amx = _cpuinfo(tmp_path, 'avx2 avx512f avx512_bf16 amx_bf16 amx_tile')
  zen4 = _cpuinfo(tmp_path, 'avx2 avx512f avx512_bf16')
  onednn = _ONEDNN
  options = functools.partial(precision.train_compiler_options, cpuinfo_path=amx,
                              jaxlib_version=(0, 12), convolutional=False)
  assert options('auto', 'float32', 'cpu') == onednn
  assert options('auto', 'float32', 'cpu', jaxlib_version=(1, 0)) == onednn
  assert options('auto', 'float32', 'cpu', jaxlib_version=(0, 10)) is None
  assert options('auto', 'bfloat16', 'cpu') is None
  assert options('auto', 'float32', 'cpu', convolutional=True) is None
  assert options('auto', 'float32', 'gpu') is None and options('onednn', 'float32', 'tpu') is None
  assert options('ynnpack', 'float32', 'cpu') is None
  assert options('auto', 'float32', 'cpu', cpuinfo_path=zen4) is None
  for forced in (dict(jaxlib_version=(0, 10)), dict(cpuinfo_path=zen4), dict(convolutional=True)):
    assert options('onednn', 'bfloat16', 'cpu', **forced) == onednn
  with pytest.raises(ValueError, match='cpu_dots'):
    options('eigen', 'float32', 'cpu')


def test_the_generator_task_asks_for_its_train_step_options():
  """`train.cpu_dots` and the model reach `precision.train_compiler_options` (forced values:
  they do not depend on this machine)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.dtype = 'float32'
  config.train.cpu_dots = 'onednn'
  onednn = registry.get_task(config).train_compiler_options('cpu')
  assert onednn and onednn['xla_cpu_use_onednn']
  assert registry.get_task(config).train_compiler_options('gpu') is None
  config.train.cpu_dots = 'ynnpack'
  assert registry.get_task(config).train_compiler_options('cpu') is None
  config.train.cpu_dots = 'auto'
  config.model.name = 'unet'
  assert registry.get_task(config).train_compiler_options('cpu') is None
  del config.train['cpu_dots']  # a config written before the key is completed with 'auto'
  schema.complete(config)
  assert config.train.cpu_dots == 'auto'
  assert registry.get_task(config).train_compiler_options('cpu') is None
