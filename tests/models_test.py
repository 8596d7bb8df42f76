"""Tests for guidedflow.models: shapes, zero init, null label, parameter counts, precision."""

import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from guidedflow import models
from guidedflow.models import dit as dit_lib
from guidedflow.models.layers import param_count
from guidedflow.models import factory
from guidedflow.tasks import registry

NUM_CLASSES = 10
TINY_UNET = dict(channels=(8, 16), num_residual_layers=1, t_embed_dim=8, y_embed_dim=8)


def _tiny_dit(dtype=jnp.float32, param_dtype=jnp.float32, seed=0):
  return models.create_model('dit', variant='test/7', input_size=28, in_channels=3,
                             num_classes=NUM_CLASSES, dtype=dtype, param_dtype=param_dtype,
                             rngs=nnx.Rngs(seed))


def _tiny_unet(input_size=28, dtype=jnp.float32, seed=0):
  return models.create_model('unet', input_size=input_size, in_channels=3,
                             num_classes=NUM_CLASSES, dtype=dtype, rngs=nnx.Rngs(seed),
                             **TINY_UNET)


def _inputs(batch=4, size=28, channels=3, seed=1):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, size, size, channels))
  t = jax.random.uniform(kt, (batch,))
  y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES + 1)
  return x, t, y


def _perturb(model, scale=0.05, seed=7):
  """Adds noise to every parameter, so zero-initialised layers stop hiding the rest."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return model


@nnx.jit
def _forward(model, x, t, y):
  return model(x, t, y)


@pytest.fixture(scope='module')
def dit_model():
  return _tiny_dit()


@pytest.fixture(scope='module')
def perturbed_dit():
  return _perturb(_tiny_dit())


@pytest.fixture(scope='module')
def perturbed_unet():
  return _perturb(_tiny_unet())


# ---- Shapes and dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize('family', sorted(dit_lib.VARIANTS))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dit_every_family_shapes_on_28x28_patch7(family, dtype):
  """Abstract build + forward: any family works on an odd image size and channel count."""
  model = nnx.eval_shape(lambda: models.create_model(
      'dit', variant=f'{family}/7', input_size=28, in_channels=3, num_classes=NUM_CLASSES,
      dtype=dtype, rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((2, 28, 28, 3), dtype)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, *a: nnx.merge(graphdef, s)(*a), state, x, t, y)
  assert out.shape == (2, 28, 28, 3)
  assert out.dtype == jnp.float32
  assert model.config.grid == (4, 4)
  assert model.label_embed.embedding.shape == (NUM_CLASSES + 1, model.config.width)


def test_dit_forward_is_zero_at_init(dit_model):
  out = _forward(dit_model, *_inputs())
  chex.assert_shape(out, (4, 28, 28, 3))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize('size', [28, 32])
def test_unet_shapes_and_zero_init(size):
  model = _tiny_unet(input_size=size)
  out = _forward(model, *_inputs(size=size))
  chex.assert_shape(out, (4, size, size, 3))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  assert model.label_embed.embedding.shape == (NUM_CLASSES + 1, TINY_UNET['y_embed_dim'])


def test_unet_without_norm_starts_as_identity_blocks_and_learns():
  """norm='none': no GroupNorm parameters, every residual block is x ↦ x at initialisation
  (conv2 zero), and the zero conv2 still gets a gradient (so the blocks do not stay dead)."""
  model = models.create_model('unet', input_size=16, in_channels=1, num_classes=NUM_CLASSES,
                              rngs=nnx.Rngs(0), norm='none', **TINY_UNET)
  paths = ['/'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert not [p for p in paths if 'norm' in p]
  block = model.encoders[0].res_blocks[0]
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, TINY_UNET['channels'][0]))
  t_emb = jnp.ones((2, TINY_UNET['t_embed_dim']))
  y_emb = jnp.ones((2, TINY_UNET['y_embed_dim']))
  np.testing.assert_array_equal(np.asarray(block(x, t_emb, y_emb)), np.asarray(x))

  graphdef, params = nnx.split(block)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(x, t_emb, y_emb) ** 2)

  grad = jax.grad(loss)(params)
  assert float(jnp.abs(grad['conv2']['kernel'][...]).max()) > 1e-3
  with pytest.raises(ValueError, match="'group' or 'none'"):
    models.create_model('unet', input_size=16, in_channels=1, num_classes=NUM_CLASSES,
                        rngs=nnx.Rngs(0), norm='batch', **TINY_UNET)


def test_outputs_depend_on_t_and_y(perturbed_dit, perturbed_unet):
  x, t, y = _inputs()
  for model in (perturbed_dit, perturbed_unet):
    base = _forward(model, x, t, y)
    assert float(jnp.abs(base).max()) > 1e-3
    assert float(jnp.abs(base - _forward(model, x, 1.0 - t, y)).max()) > 1e-4
    y_null = jnp.full_like(y, NUM_CLASSES)
    assert float(jnp.abs(base - _forward(model, x, t, y_null)).max()) > 1e-4


# ---- Null label -------------------------------------------------------------------------------


@pytest.mark.parametrize('make', [_tiny_dit, _tiny_unet], ids=['dit', 'unet'])
def test_null_row_trains_and_differs_from_class_rows(make):
  """One Adam step on a batch with null labels updates row K, and only rows that were used."""
  model = _perturb(make())
  before = np.asarray(model.label_embed.embedding[...])
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, t, _ = _inputs(batch=6)
  y = jnp.array([0, 1, 2, NUM_CLASSES, NUM_CLASSES, 1])
  target = jax.random.normal(jax.random.key(3), x.shape)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x, t, y) - target) ** 2))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  after = np.asarray(model.label_embed.embedding[...])
  null_row = after[NUM_CLASSES]
  assert np.abs(null_row - before[NUM_CLASSES]).max() > 1e-4  # ∅ received gradient
  np.testing.assert_array_equal(after[3:NUM_CLASSES], before[3:NUM_CLASSES])  # unused classes
  distances = np.abs(after[:NUM_CLASSES] - null_row).max(axis=1)
  assert distances.min() > 1e-3


# ---- Parameter counts and FLOPs ---------------------------------------------------------------

# DiT paper: S/2 33M, B/2 130M, L/2 458M, XL/2 675M (32×32×4 latents, 1000 classes).
PAPER_PARAMS = {'S/2': 33e6, 'B/2': 130e6, 'L/2': 458e6, 'XL/2': 675e6}
EXACT_PARAMS = {'S/2': 32_858_896, 'B/2': 130_303_504, 'L/2': 457_824_272, 'XL/2': 674_816_272}
# DiT paper "Gflops" are multiply-adds: S/2 6.06, XL/2 118.6 at 256×256 (32×32 latents).
PAPER_GMACS = {'S/2': 6.06, 'B/2': 23.01, 'L/2': 80.71, 'XL/2': 118.64}


@pytest.mark.parametrize('variant', sorted(PAPER_PARAMS))
def test_dit_parameter_counts_match_paper(variant):
  model = nnx.eval_shape(lambda: models.create_model(
      'dit', variant=variant, input_size=32, in_channels=4, num_classes=1000, rngs=nnx.Rngs(0)))
  count = param_count(model)
  assert abs(count / PAPER_PARAMS[variant] - 1) < 0.01
  assert count == EXACT_PARAMS[variant]
  flops = models.flops_per_example('dit', variant=variant, input_size=32, in_channels=4,
                                   num_classes=1000)
  assert flops == model.flops_per_example()
  assert abs(flops / 2e9 / PAPER_GMACS[variant] - 1) < 0.01


def test_analytic_flops_close_to_xla_count(perturbed_dit, perturbed_unet):
  """The analytic count (matmuls only) is within 15% of XLA's count of the whole forward."""
  x, t, y = _inputs(batch=2)
  for model in (perturbed_dit, perturbed_unet):
    graphdef, state = nnx.split(model)
    lowered = jax.jit(lambda s, g=graphdef: nnx.merge(g, s)(x, t, y)).lower(state)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert 0.85 < model.flops_per_example() * 2 / cost['flops'] < 1.15


# ---- Gradients and precision ------------------------------------------------------------------


@pytest.mark.parametrize('which', ['dit', 'unet'])
def test_gradients_are_finite_and_reach_every_parameter(which, perturbed_dit, perturbed_unet):
  model = perturbed_dit if which == 'dit' else perturbed_unet
  x, t, y = _inputs()
  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, t, y) ** 2)))(model)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(int(jnp.any(g != 0)) for g in leaves) == len(leaves)


@pytest.mark.parametrize('which', ['dit', 'unet'])
def test_bf16_compute_close_to_f32(which):
  make = _tiny_dit if which == 'dit' else _tiny_unet
  f32 = _perturb(make())
  bf16 = _perturb(make(dtype=jnp.bfloat16))
  for a, b in zip(jax.tree.leaves(nnx.state(f32, nnx.Param)),
                  jax.tree.leaves(nnx.state(bf16, nnx.Param))):
    assert b.dtype == jnp.float32  # param_dtype stays f32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  inputs = _inputs()
  out32 = _forward(f32, *inputs)
  out16 = _forward(bf16, *inputs)
  chex.assert_type(out16, jnp.float32)
  # bf16 has an 8-bit mantissa (relative step 2^-8 ≈ 0.4%); a few layers compound it to ~1–3%.
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.03, rel


@pytest.mark.parametrize('scan_blocks', [True, False])
def test_dit_bf16_gradients_compile_and_match_f32(scan_blocks):
  """bf16 compute, jitted gradient (every mixed-precision dot layout the DiT has, forward and
  backward, through XLA:CPU's kernel choice) is close to the f32 gradient of the same weights."""
  grads = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = _perturb(_dit(depth=2, dtype=dtype, scan_blocks=scan_blocks))
    grads[dtype] = _grads_as_dict(model, _inputs())
  for g32, g16 in zip(jax.tree.leaves(grads[jnp.float32]), jax.tree.leaves(grads[jnp.bfloat16])):
    assert g16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g16)))
    scale = float(jnp.linalg.norm(g32)) + 1e-12
    assert float(jnp.linalg.norm(g16 - g32)) / scale < 0.06


def test_bf16_params():
  model = _tiny_dit(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('bfloat16')}
  chex.assert_type(_forward(model, *_inputs()), jnp.float32)


# ---- Errors, metadata, factory ----------------------------------------------------------------


def test_dit_indivisible_size_raises_with_hint():
  with pytest.raises(ValueError, match=r"30×30 is not divisible by patch size 4.*'S/2'"):
    dit_lib.DiT('S/4', input_size=30, in_channels=1, num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'not divisible by 4'):
    models.create_model('unet', input_size=30, in_channels=1, num_classes=10,
                        rngs=nnx.Rngs(0), channels=(8, 16, 32))


def test_unknown_names_raise():
  with pytest.raises(ValueError, match=r"allowed: \['dit', 'unet'\]"):
    models.create_model('vit', input_size=28, in_channels=1, num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='Unknown DiT variant'):
    dit_lib.resolve_config('M/2', input_size=28, in_channels=1, num_classes=10)


def test_overrides_apply():
  cfg = dit_lib.resolve_config('S/2', input_size=(28, 32), in_channels=1, num_classes=10,
                               width=64, depth=2, num_heads=4, patch_size=4, mlp_ratio=2.0)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.mlp_dim) == (64, 2, 4, 4, 128)
  assert cfg.grid == (7, 8)


@pytest.mark.parametrize('which', ['dit', 'unet'])
def test_every_param_has_logical_names(which, dit_model):
  model = dit_model if which == 'dit' else nnx.eval_shape(_tiny_unet)
  names = jax.tree.leaves(
      jax.tree.map(lambda v: (v.get_metadata().get('out_sharding'), v.shape),
                   nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)),
      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)
  assert names
  for logical, shape in names:
    assert logical is not None and len(logical) == len(shape), (logical, shape)
  if which == 'dit':  # Scanned (the default): stacked blocks carry the leading layer axis.
    depth = dit_model.config.depth
    assert dit_model.blocks.fc1.kernel.shape[0] == depth
    assert dit_model.blocks.fc1.kernel.get_metadata()['out_sharding'] == ('layers', 'embed', 'mlp')
    assert dit_model.blocks.attn.qkv.kernel.get_metadata()['out_sharding'] == (
        'layers', 'embed', 'heads')
    assert dit_model.blocks.fc1.bias.get_metadata()['out_sharding'] == ('layers', 'mlp')
    unscanned = nnx.eval_shape(lambda: _dit(scan_blocks=False))
    assert unscanned.blocks[0].fc1.kernel.get_metadata()['out_sharding'] == ('embed', 'mlp')
    assert unscanned.blocks[0].attn.qkv.kernel.get_metadata()['out_sharding'] == (
        'embed', 'heads')


# ---- Scanned blocks, remat policies, attention ------------------------------------------------


def _dit(depth=3, **kwargs):
  return models.create_model('dit', variant='test/7', input_size=28, in_channels=3,
                             num_classes=NUM_CLASSES, depth=depth, rngs=nnx.Rngs(0), **kwargs)


def _loss(model, x, t, y):
  return jnp.mean(model(x, t, y) ** 2)


def _grads_as_dict(model, inputs):
  return nnx.to_pure_dict(nnx.jit(nnx.grad(_loss))(model, *inputs))


def _copy_weights(unscanned, scan_blocks, **kwargs):
  """A DiT of the given layout holding `unscanned`'s weights (stacked by dit.stack_blocks)."""
  model = _dit(depth=unscanned.config.depth, scan_blocks=scan_blocks, **kwargs)
  params = nnx.to_pure_dict(nnx.state(unscanned, nnx.Param))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, dit_lib.stack_blocks(params) if scan_blocks else params)
  nnx.update(model, state)
  return model


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize('unroll', [1, 2, 'auto'])
def test_scanned_and_unscanned_dit_same_outputs_and_gradients(unroll):
  """Same weights (stacked by dit.stack_blocks): same outputs and gradients to f32 rounding,
  whatever the scan's unrolling (2 of 3 blocks: a remainder; 'auto' on this CPU: all 3)."""
  unscanned = _perturb(_dit(scan_blocks=False))
  scanned = _copy_weights(unscanned, scan_blocks=True, unroll_blocks=unroll)
  assert scanned.blocks.fc1.kernel.shape == (3, *unscanned.blocks[0].fc1.kernel.shape)
  inputs = _inputs()
  out_u, out_s = _forward(unscanned, *inputs), _forward(scanned, *inputs)
  assert float(jnp.abs(out_u).max()) > 0.1  # not the trivial all-zero initial output
  np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
  grads_u = _grads_as_dict(unscanned, inputs)
  assert len(grads_u['blocks']) == 3
  _assert_trees_close(_grads_as_dict(scanned, inputs), dit_lib.stack_blocks(grads_u))
  # The scanned forward traces one block inside one scan, not 3 copies of the block (unrolling
  # happens when the scan is lowered).
  for model, scans in ((scanned, 1), (unscanned, 0)):
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s, g=graphdef: nnx.merge(g, s)(*inputs))(state))
    assert jaxpr.count('scan[') == scans
    # 5 matmuls outside the blocks, 7 per traced block (qkv, 2 attention, proj, MLP, adaLN).
    assert jaxpr.count('dot_general') == (5 + 7 if scans else 5 + 3 * 7)


def test_unrolled_block_scan_stacks_no_residuals():
  """unroll_blocks='auto' on a CPU: the gradient's program has no loop over the blocks and no
  dynamic-update-slice into stacked residual buffers; not unrolled (1) it has both."""
  inputs = _inputs()

  def lowered_gradient(model):
    graphdef, state = nnx.split(model)
    return jax.jit(jax.grad(lambda s: _loss(nnx.merge(graphdef, s), *inputs))).lower(
        state).as_text()

  assert jax.default_backend() == 'cpu'
  rolled = lowered_gradient(nnx.eval_shape(lambda: _dit(unroll_blocks=1)))
  unrolled = lowered_gradient(nnx.eval_shape(lambda: _dit(unroll_blocks='auto')))
  assert 'stablehlo.while' in rolled and 'dynamic_update_slice' in rolled
  assert 'stablehlo.while' not in unrolled and 'dynamic_update_slice' not in unrolled


def test_unroll_blocks_resolves_by_platform_and_rejects_bad_values():
  resolve = dit_lib.resolve_unroll_blocks
  assert resolve('auto', 12, 'cpu') == 12
  assert resolve('auto', 12, 'tpu') == resolve('auto', 12, 'gpu') == 1
  assert resolve(4, 12, 'tpu') == 4 and resolve(40, 12, 'cpu') == 12
  for bad in (0, -1, True, 'all', 2.0):
    with pytest.raises(ValueError, match='positive number of blocks'):
      resolve(bad, 12, 'cpu')
  with pytest.raises(ValueError, match='unroll_blocks=0'):
    _dit(unroll_blocks=0)


def test_stack_and_unstack_blocks_are_inverse():
  params = nnx.to_pure_dict(nnx.state(_perturb(_dit(scan_blocks=False)), nnx.Param))
  stacked = dit_lib.stack_blocks(params)
  assert stacked['blocks']['attn']['qkv']['kernel'].shape == (3, 32, 96)
  np.testing.assert_array_equal(stacked['blocks']['fc2']['bias'][2],
                                params['blocks'][2]['fc2']['bias'])
  _assert_trees_close(dit_lib.unstack_blocks(stacked), params, rtol=0, atol=0)
  with pytest.raises(ValueError, match='numbered 0..depth'):
    dit_lib.stack_blocks({'blocks': {0: {'w': jnp.ones(2)}, 2: {'w': jnp.ones(2)}}})


@pytest.mark.parametrize('scan_blocks', [True, False], ids=['scanned', 'unscanned'])
def test_remat_policies_same_gradients_and_recompute(scan_blocks):
  """Every remat policy gives the no-remat gradients; 'full' and the dots policy put the
  blocks under jax.checkpoint (with the policy), 'none' does not."""
  base = _perturb(_dit(depth=2, scan_blocks=False))
  inputs = _inputs()
  grads, jaxprs = {}, {}
  for remat in dit_lib.REMAT_POLICIES:
    model = _copy_weights(base, scan_blocks, remat=remat)
    assert model.remat == remat
    grads[remat] = _grads_as_dict(model, inputs)
    graphdef, state = nnx.split(model)
    jaxprs[remat] = str(jax.make_jaxpr(lambda s, g=graphdef: jax.grad(
        lambda s: _loss(nnx.merge(g, s), *inputs))(s))(state))
  for remat in ('full', 'dots_with_no_batch_dims_saveable'):
    _assert_trees_close(grads[remat], grads['none'])
    assert 'checkpoint' in jaxprs[remat] or 'remat' in jaxprs[remat]
  assert 'checkpoint' not in jaxprs['none'] and 'remat' not in jaxprs['none']
  # jax prints the policy as a parameter of the remat primitive.
  assert 'policy=None' in jaxprs['full']
  assert 'policy=None' not in jaxprs['dots_with_no_batch_dims_saveable']
  assert 'policy=' in jaxprs['dots_with_no_batch_dims_saveable']


@pytest.mark.parametrize('scan_blocks', [True, False], ids=['scanned', 'unscanned'])
def test_dit_with_remat_runs_inside_an_outer_scan(scan_blocks):
  """The samplers merge the parameters outside their lax.scan and call the model inside it
  (nnx's graph-mode transforms refuse Variables of an outer trace; the blocks' must not)."""
  model = _perturb(_dit(depth=2, scan_blocks=scan_blocks, remat='full'))
  graphdef, state = nnx.split(model)
  x, t, y = _inputs()

  @jax.jit
  def two_euler_steps(state):
    merged = nnx.merge(graphdef, state)
    step = lambda x, _: (x + 0.5 * merged(x, t, y), None)  # pylint: disable=unnecessary-lambda-assignment
    return jax.lax.scan(step, x, None, length=2)[0]

  expected = x
  for _ in range(2):
    expected = expected + 0.5 * _forward(model, expected, t, y)
  np.testing.assert_allclose(two_euler_steps(state), expected, rtol=1e-5, atol=1e-5)


def test_remat_accepts_booleans_of_older_configs_and_rejects_unknown():
  assert dit_lib.remat_policy_name(True) == 'full'
  assert dit_lib.remat_policy_name(False) == 'none'
  assert nnx.eval_shape(lambda: _dit(remat=True)).remat == 'full'
  with pytest.raises(ValueError, match='dots_with_no_batch_dims_saveable'):
    _dit(remat='everything')


def test_attention_impls_agree_and_cudnn_needs_bf16():
  """jax.nn.dot_product_attention ('xla') and the einsum attention (the default) agree."""
  model = _perturb(_dit(depth=2))
  inputs = _inputs()
  outs = {}
  for impl in ('xla', 'einsum'):
    model.blocks.attn.impl = impl
    outs[impl] = _forward(model, *inputs)
  assert float(jnp.abs(outs['xla']).max()) > 0.1
  np.testing.assert_allclose(outs['xla'], outs['einsum'], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="needs bfloat16.*Use 'einsum' or 'xla'"):
    _dit(attention_impl='cudnn')
  with pytest.raises(ValueError, match='is not one of'):
    _dit(attention_impl='flash')


def test_attention_impl_auto_picks_cudnn_only_where_it_runs():
  """'auto': cuDNN flash attention on an NVIDIA GPU from Ampere on (None: no CUDA device, e.g.
  ROCm) in bf16 / f16 with a head dimension its kernels take (a multiple of 8, at most 128:
  DiT-S/2 64, DiT-XL/2 72), the einsum attention everywhere else; a named implementation is
  kept. On this CPU the default config's DiT uses 'einsum'."""
  resolve = dit_lib.resolve_attention_impl
  hopper, ampere, turing = (9, 0), (8, 0), (7, 5)
  assert resolve('auto', jnp.bfloat16, 64, backend='gpu', capability=hopper) == 'cudnn'
  assert resolve('auto', jnp.float16, 72, backend='gpu', capability=ampere) == 'cudnn'
  for dtype, head_dim, backend, capability in (
      (jnp.float32, 64, 'gpu', hopper), (jnp.bfloat16, 12, 'gpu', hopper),
      (jnp.bfloat16, 136, 'gpu', hopper), (jnp.bfloat16, 64, 'gpu', turing),
      (jnp.bfloat16, 64, 'gpu', None), (jnp.bfloat16, 64, 'cpu', None),
      (jnp.bfloat16, 64, 'tpu', None)):
    assert resolve('auto', dtype, head_dim, backend=backend, capability=capability) == 'einsum'
  assert resolve('xla', jnp.bfloat16, 64, backend='gpu') == 'xla'
  assert jax.default_backend() == 'cpu' and dit_lib._cuda_capability() is None
  assert nnx.eval_shape(lambda: _dit(attention_impl='auto')).attention_impl == 'einsum'
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.dtype = 'bfloat16'
  assert config.model.attention_impl == 'auto'
  model = nnx.eval_shape(factory.generator(config, (28, 28, 1)))
  assert model.attention_impl == 'einsum' and model.blocks.attn.impl == 'einsum'


def test_compile_time_benchmark_smoke():
  """benchmarks/compile_time.py --smoke: the lowered step of the scanned model does not grow
  with depth (2 → 4 blocks), the unscanned and the unrolled ones do."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'benchmarks', 'compile_time.py')
  spec = importlib.util.spec_from_file_location('compile_time_benchmark', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rows = {(r['depth'], r['layout']): r for r in module.main(['--smoke', '--json'])}
  assert set(rows) == {(d, layout) for d in (2, 4) for layout in ('scanned', 'unscanned',
                                                                     'unrolled')}
  growth = {layout: rows[4, layout]['hlo_lines'] - rows[2, layout]['hlo_lines']
            for layout in ('scanned', 'unscanned', 'unrolled')}
  assert abs(growth['scanned']) <= 5 < min(growth['unscanned'], growth['unrolled']) / 4, growth
  assert all(r['compile_s'] > 0 and r['lower_s'] > 0 for r in rows.values())


def test_model_config_keys_remat_scan_blocks_attention():
  """configs: remat takes a policy or an older config's bool, unroll_blocks 'auto' or a
  number; bad values name the key."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from guidedflow import errors  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  assert config.model.remat == 'none' and config.model.scan_blocks is True
  for value, policy in ((True, 'full'), (False, 'none'),
                        ('dots_with_no_batch_dims_saveable', 'dots_with_no_batch_dims_saveable')):
    config.model.remat = value  # a bool is accepted by the config, as older configs set it
    registry.validate(config)
    model = nnx.eval_shape(factory.generator(config, (28, 28, 1)))
    assert model.remat == policy and model.scan_blocks
  config.model.unroll_blocks = 3
  assert nnx.eval_shape(factory.generator(config, (28, 28, 1))).unroll_blocks == 3
  del config.model['unroll_blocks']  # a config written before the key existed: 'auto'
  registry.validate(config)
  assert nnx.eval_shape(factory.generator(config, (28, 28, 1))).unroll_blocks == 'auto'
  config.model.scan_blocks = False
  assert not nnx.eval_shape(factory.generator(config, (28, 28, 1))).scan_blocks
  for key, value, message in (('remat', 'sometimes', 'config.model.remat'),
                              ('attention_impl', 'flash', 'config.model.attention_impl'),
                              ('attention_impl', 'cudnn', 'dtype=bfloat16'),
                              ('unroll_blocks', 0, 'config.model.unroll_blocks=0'),
                              ('unroll_blocks', 'all', 'positive number of blocks'),
                              ('unroll_blocks', True, 'config.model.unroll_blocks=True')):
    bad = tiny.get_config()
    bad.model[key] = value
    with pytest.raises(errors.ConfigError, match=message):
      registry.validate(bad)
