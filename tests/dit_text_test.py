"""Tests for guidedflow.models.dit_text: the cross-attention DiT (PixArt-α block, adaLN-single)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from guidedflow import errors
from guidedflow.models import dit_text, layers

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (an 8-device
# subprocess) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('dit_text')

TEXT_DIM = 12
TOKENS = 5
SIZE, CHANNELS = 8, 3


def _model(depth=1, **kwargs):
  return dit_text.TextDiT('test/2', input_size=SIZE, in_channels=CHANNELS, text_dim=TEXT_DIM,
                          depth=depth, rngs=nnx.Rngs(0), **kwargs)


def _perturb(model, scale=0.05, seed=7, where=lambda path: True):
  """Adds noise to the parameters whose path ('blocks/fc1/kernel') `where` accepts, so that
  zero-initialised layers stop hiding the rest."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(paths))
  noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype) if where(_name(path)) else p
           for (path, p), k in zip(paths, keys)]
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, noisy))
  nnx.update(model, state)
  return model


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _inputs(batch=4, seed=1, mask=None):
  kx, kt, kh, kp = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (batch, SIZE, SIZE, CHANNELS))
  t = jax.random.uniform(kt, (batch,))
  if mask is None:  # row i has TOKENS − i real tokens (a different mask per row)
    mask = (jnp.arange(TOKENS)[None] < TOKENS - jnp.arange(batch)[:, None]).astype(jnp.int32)
  cond = {'hidden': jax.random.normal(kh, (batch, TOKENS, TEXT_DIM)), 'mask': mask,
          'pooled': jax.random.normal(kp, (batch, TEXT_DIM))}
  return x, t, cond


@nnx.jit
def _forward(model, x, t, cond):
  return model(x, t, cond)


def _loss(model, x, t, cond):
  return jnp.mean(jnp.square(model(x, t, cond) - x))


def _grads(model, inputs):
  return nnx.to_pure_dict(nnx.jit(nnx.grad(_loss))(model, *inputs))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _copy_weights(unscanned, **kwargs):
  """A scanned TextDiT holding `unscanned`'s weights (stacked by dit_text.stack_blocks)."""
  model = _model(depth=len(unscanned.blocks), **kwargs)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(
      state, dit_text.stack_blocks(nnx.to_pure_dict(nnx.state(unscanned, nnx.Param))))
  nnx.update(model, state)
  return model


@pytest.fixture(scope='module')
def perturbed():
  return _perturb(_model(depth=2))


def test_shapes_dtype_and_zero_output_at_init():
  model = _model()
  x, t, cond = _inputs()
  out = _forward(model, x, t, cond)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) == 0.0  # zero final projection
  block = model.blocks
  assert block.scale_shift_table.shape == (1, 6, 32)
  assert model.final_scale_shift_table.shape == (2, 32)
  # PixArt's table init: randn / √width.
  assert 0.5 / np.sqrt(32) < float(jnp.std(block.scale_shift_table[...])) < 2 / np.sqrt(32)
  assert float(jnp.abs(block.cross_attn.proj.kernel[...]).max()) == 0.0
  assert block.cross_attn.kv.kernel.shape == (1, 32, 64)
  assert model.caption_fc1.kernel.shape == (TEXT_DIM, 32)
  with pytest.raises(ValueError, match='text_dim=12'):
    model(x, t, {**cond, 'hidden': cond['hidden'][..., :7]})


def test_every_parameter_has_logical_names():
  state = nnx.state(_model(), nnx.Param)
  names = {}
  for path, variable in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]:
    sharding = variable.get_metadata().get('out_sharding')
    assert sharding is not None and len(sharding) == len(variable.shape), _name(path)
    names[_name(path)] = tuple(sharding)
  assert names['blocks/cross_attn/kv/kernel'] == ('layers', 'embed', 'heads')
  assert names['blocks/cross_attn/proj/kernel'] == ('layers', 'heads', 'embed')
  assert names['blocks/scale_shift_table'] == ('layers', None, 'embed')
  assert names['caption_fc1/kernel'] == ('text', 'embed')
  assert names['t_block/kernel'] == ('embed', 'modulation')


def test_padded_tokens_change_nothing(perturbed):
  """Hidden states at masked positions (and a row with no token at all) do not matter."""
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]],
                   jnp.int32)
  x, t, cond = _inputs(mask=mask)
  noise = 100.0 * jax.random.normal(jax.random.key(3), cond['hidden'].shape)
  changed = {**cond, 'hidden': jnp.where(mask[..., None] == 0, noise, cond['hidden'])}
  out, out_changed = _forward(perturbed, x, t, cond), _forward(perturbed, x, t, changed)
  assert np.isfinite(np.asarray(out)).all()
  assert float(jnp.abs(out).max()) > 0.1
  np.testing.assert_allclose(out_changed, out, rtol=0, atol=1e-6)
  # ... and a real token does matter.
  real = {**cond, 'hidden': cond['hidden'].at[:, 0].add(1.0)}
  moved = jnp.abs(_forward(perturbed, x, t, real) - out).max(axis=(1, 2, 3))
  assert (moved[:3] > 1e-4).all() and float(moved[3]) < 1e-6
  # Gradients through an all-zero mask row are finite too.
  grads = jax.tree.leaves(_grads(perturbed, (x, t, cond)))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_at_init_only_the_pooled_text_acts_and_one_step_opens_cross_attention():
  """Zero cross-attention projection: at init the output (final layer perturbed: it is zero
  too) ignores the caption tokens but not the pooled vector; one optimizer step on a loss
  through cross-attention makes it depend on the tokens."""
  model = _perturb(_model(), where=lambda path: path.startswith('final_proj'))
  x, t, cond = _inputs()
  out = _forward(model, x, t, cond)
  other_hidden = {**cond, 'hidden': cond['hidden'] + 1.0}
  other_pooled = {**cond, 'pooled': cond['pooled'] + 1.0}
  assert float(jnp.abs(_forward(model, x, t, other_hidden) - out).max()) == 0.0
  assert float(jnp.abs(_forward(model, x, t, other_pooled) - out).max()) > 1e-3

  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, t, cond):
    grads = nnx.grad(_loss)(model, x, t, cond)
    optimizer.update(model, grads)

  step(model, optimizer, x, t, cond)
  assert float(jnp.abs(model.blocks.cross_attn.proj.kernel[...]).max()) > 0.0
  delta = _forward(model, x, t, other_hidden) - _forward(model, x, t, cond)
  assert float(jnp.abs(delta).max()) > 1e-4


@pytest.mark.parametrize('unroll', [1, 'auto'])
def test_scanned_and_unscanned_same_outputs_and_gradients(unroll):
  unscanned = _perturb(_model(depth=2, scan_blocks=False))
  scanned = _copy_weights(unscanned, unroll_blocks=unroll)
  inputs = _inputs()
  out_u, out_s = _forward(unscanned, *inputs), _forward(scanned, *inputs)
  assert float(jnp.abs(out_u).max()) > 0.1
  np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
  grads_u = _grads(unscanned, inputs)
  _assert_trees_close(_grads(scanned, inputs), dit_text.stack_blocks(grads_u))
  # unstack_blocks inverts stack_blocks.
  params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  back = dit_text.unstack_blocks(params)
  _assert_trees_close(back['blocks'],
                      nnx.to_pure_dict(nnx.state(unscanned, nnx.Param))['blocks'], 0, 0)


def test_remat_policies_same_outputs_and_gradients(perturbed):
  inputs = _inputs()
  base = dit_text.unstack_blocks(nnx.to_pure_dict(nnx.state(perturbed, nnx.Param)))
  unscanned = _model(depth=2, scan_blocks=False)
  state = nnx.state(unscanned, nnx.Param)
  nnx.replace_by_pure_dict(state, base)
  nnx.update(unscanned, state)
  want_out, want_grads = _forward(perturbed, *inputs), _grads(perturbed, inputs)
  for remat in ('full', 'dots_with_no_batch_dims_saveable'):
    model = _copy_weights(unscanned, remat=remat)
    assert model.remat == remat
    np.testing.assert_allclose(_forward(model, *inputs), want_out, rtol=1e-6, atol=1e-6)
    _assert_trees_close(_grads(model, inputs), want_grads)
    graphdef, params = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s, g=graphdef: jax.grad(
        lambda s: _loss(nnx.merge(g, s), *inputs))(s))(params))
    assert 'checkpoint' in jaxpr or 'remat' in jaxpr


def test_bfloat16_close_to_float32(perturbed):
  model = _copy_weights(_copy_to_unscanned(perturbed), dtype=jnp.bfloat16)
  inputs = _inputs()
  out32, out16 = _forward(perturbed, *inputs), _forward(model, *inputs)
  assert out16.dtype == jnp.float32
  scale = float(jnp.abs(out32).max())
  assert scale > 0.1
  assert float(jnp.abs(out16 - out32).max()) < 0.05 * scale
  grads = _grads(model, inputs)
  assert grads['blocks']['cross_attn']['kv']['kernel'].dtype == jnp.float32
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def _copy_to_unscanned(scanned):
  model = _model(depth=2, scan_blocks=False)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(
      state, dit_text.unstack_blocks(nnx.to_pure_dict(nnx.state(scanned, nnx.Param))))
  nnx.update(model, state)
  return model


def test_rows_are_independent_with_different_masks(perturbed):
  x, t, cond = _inputs()
  assert len({tuple(row) for row in np.asarray(cond['mask'])}) == 4
  together = _forward(perturbed, x, t, cond)
  for i in range(4):
    alone = _forward(perturbed, x[i:i + 1], t[i:i + 1],
                     jax.tree.map(lambda a, i=i: a[i:i + 1], cond))
    np.testing.assert_allclose(alone[0], together[i], rtol=1e-5, atol=1e-5)


def test_xla_attention_matches_einsum(perturbed):
  model = _copy_weights(_copy_to_unscanned(perturbed), attention_impl='xla')
  mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
                   jnp.int32)
  inputs = _inputs(mask=mask)
  np.testing.assert_allclose(_forward(model, *inputs), _forward(perturbed, *inputs),
                             rtol=1e-5, atol=1e-5)


def test_pixart_xl_parameter_count():
  """PixArt-α XL/2 (256², T5-XXL) is 611M parameters; ours has SD3's pooled MLP on top
  (text_dim·D + D² + 2D) and predicts no variance (4 output channels, not 8)."""
  model = nnx.eval_shape(lambda: dit_text.TextDiT('XL/2', input_size=32, in_channels=4,
                                                  text_dim=4096, rngs=nnx.Rngs(0)))
  d, text_dim = 1152, 4096
  pooled_mlp = text_dim * d + d + d * d + d
  learned_sigma = d * 16 + 16  # the final layer's 4 extra output channels per 2×2 patch
  pixart = layers.param_count(model) - pooled_mlp + learned_sigma
  assert pixart == 610_856_096  # 611M, as published
  assert layers.param_count(model) == 616_885_648


def test_analytic_flops_close_to_xla_count(perturbed):
  """The analytic count (matmuls only) is within 15% of XLA's count of the whole forward."""
  x, t, cond = _inputs(batch=2)
  graphdef, state = nnx.split(perturbed)
  lowered = jax.jit(lambda s: nnx.merge(graphdef, s)(x, t, cond)).lower(state)
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert 0.85 < perturbed.flops_per_example(TOKENS) * 2 / cost['flops'] < 1.15


def test_from_config_builds_the_configured_model():
  config = ml_collections.ConfigDict({
      'model': {'variant': 'test/2', 'dtype': 'float32', 'param_dtype': 'float32',
                'remat': 'full', 'scan_blocks': False, 'unroll_blocks': 'auto',
                'attention_impl': 'auto'},
      'train': {'seed': 3}})
  construct = dit_text.from_config(config, (SIZE, SIZE, CHANNELS), TEXT_DIM)
  model = nnx.eval_shape(construct)
  assert model.remat == 'full' and not model.scan_blocks and model.text_dim == TEXT_DIM
  assert model.attention_impl == 'einsum'
  with pytest.raises(errors.ConfigError, match='not divisible by patch size 3'):
    config.model.variant = 'test/3'
    dit_text.from_config(config, (SIZE, SIZE, CHANNELS), TEXT_DIM)


_CHILD = textwrap.dedent(r'''
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from guidedflow import sharding
    from guidedflow.models import dit_text

    def spec(a):
      return [list(e) if isinstance(e, tuple) else e for e in a.sharding.spec]

    def make():
      return dit_text.TextDiT('test/4', input_size=16, in_channels=4, text_dim=48, width=64,
                              depth=2, rngs=nnx.Rngs(0))

    report = {'num_devices': jax.device_count()}
    batch = 8
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (batch, 16, 16, 4))
    t = jnp.linspace(0.0, 1.0, batch)
    mask = (jnp.arange(6)[None] < jnp.arange(batch)[:, None] % 7).astype(jnp.int32)
    cond = {'hidden': jax.random.normal(keys[1], (batch, 6, 48)), 'mask': mask,
            'pooled': jax.random.normal(keys[2], (batch, 48))}
    forward = nnx.jit(lambda m, x, t, c: m(x, t, c))
    for shape in [(1, 8, 1), (1, 4, 2)]:
      mesh = sharding.make_mesh(shape)
      graphdef, abstract = nnx.split(nnx.eval_shape(make))
      shardings = sharding.state_shardings(abstract, mesh, min_shard_size=0)
      with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
      model = nnx.merge(graphdef, state)
      params = nnx.state(model, nnx.Param)
      leaves, treedef = jax.tree.flatten(params)
      noise = jax.random.split(jax.random.key(1), len(leaves))
      nnx.update(model, jax.tree.unflatten(
          treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, noise)]))
      block = model.blocks
      r = report[str(shape)] = {
          'kv': spec(block.cross_attn.kv.kernel[...]),
          'q': spec(block.cross_attn.q.kernel[...]),
          'cross_proj': spec(block.cross_attn.proj.kernel[...]),
          'qkv': spec(block.attn.qkv.kernel[...]),
          'fc1': spec(block.fc1.kernel[...]),
          'table': spec(block.scale_shift_table[...]),
          't_block': spec(model.t_block.kernel[...]),
          'caption_fc1': spec(model.caption_fc1.kernel[...]),
          'pooled_mlp1': spec(model.pooled_mlp1.kernel[...]),
          'caption_fc1_shard': list(model.caption_fc1.kernel[...].addressable_shards[0].data.shape),
      }
      local = nnx.merge(nnx.graphdef(model),
                        jax.device_put(jax.device_get(nnx.state(model)), jax.devices()[0]))
      on_batch = lambda a: jax.device_put(a, sharding.batch_sharding(mesh))
      with jax.set_mesh(mesh):
        out = forward(model, on_batch(x), on_batch(t), jax.tree.map(on_batch, cond))
      ref = forward(local, x, t, cond)
      r['max_diff'] = float(np.abs(np.asarray(out) - np.asarray(ref)).max())
      r['max'] = float(jnp.abs(ref).max())
      r['out_devices'] = len(out.sharding.device_set)
    print('REPORT' + json.dumps(report))
''')


@pytest.fixture(scope='module')
def sharded_report():
  env = dict(os.environ)
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [ln for ln in result.stdout.splitlines() if ln.startswith('REPORT')][-1]
  return json.loads(line[len('REPORT'):])


@pytest.mark.parametrize('shape', ['(1, 8, 1)', '(1, 4, 2)'])
def test_fsdp_and_tensor_sharding(sharded_report, shape):
  assert sharded_report['num_devices'] == 8
  r = sharded_report[shape]
  tensor = 'tensor'  # a size-1 mesh axis is still named in the spec
  assert r['kv'] == [None, 'fsdp', tensor]
  assert r['q'] == [None, 'fsdp', tensor]
  assert r['cross_proj'] == [None, tensor, 'fsdp']
  assert r['qkv'] == [None, 'fsdp', tensor]
  assert r['fc1'] == [None, 'fsdp', tensor]
  assert r['table'] == [None, None, 'fsdp']
  assert r['t_block'] == ['fsdp', tensor]
  assert r['caption_fc1'] == [None, 'fsdp'] and r['pooled_mlp1'] == [None, 'fsdp']
  fsdp = 8 if shape == '(1, 8, 1)' else 4
  assert r['caption_fc1_shard'] == [48, 64 // fsdp]
  assert r['max'] > 1e-3
  assert r['max_diff'] < 1e-4 * max(1.0, r['max'])
  assert r['out_devices'] == 8
