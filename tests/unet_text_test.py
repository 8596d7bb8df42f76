"""The text-conditioned U-Net (`UNet(text_dim > 0)`, models/unet_text.py), and the class U-Net
left as it was."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import fashion_mnist
from guidedflow import errors
from guidedflow.models import factory
from guidedflow.models import text_transformer
from guidedflow.models import unet
from guidedflow.models import unet_text

TEXT_DIM, LENGTH, BATCH = 16, 6, 4
TINY = dict(input_size=8, in_channels=2, num_classes=3, channels=(8, 16, 32),
            num_residual_layers=1, t_embed_dim=8, y_embed_dim=8, text_heads=2)
LENGTHS = (3, 6, 0, 1)  # tokens per row: one full, one without any token


def _text_unet(seed=0, **kwargs):
  return unet.UNet(**dict(TINY, text_dim=TEXT_DIM, **kwargs), rngs=nnx.Rngs(seed))


def _cond(seed=0, lengths=LENGTHS):
  k1, k2 = jax.random.split(jax.random.key(seed))
  mask = (np.arange(LENGTH)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return {'hidden': jax.random.normal(k1, (len(lengths), LENGTH, TEXT_DIM)),
          'mask': jnp.asarray(mask),
          'pooled': jax.random.normal(k2, (len(lengths), TEXT_DIM))}


def _inputs(batch=BATCH):
  x = jax.random.normal(jax.random.key(11), (batch, 8, 8, 2))
  return x, jnp.linspace(0.1, 0.9, batch)


def _perturbed(model, scale=0.1, seed=7):
  """`model` with every parameter moved by scale·N(0, 1) (zero-initialised ones too)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves), rest)


def _cross_blocks(model):
  stages = [*model.encoders, model.midcoder, *model.decoders]
  return [b for s in stages for b in (s.cross_attention or ())]


def _logical_names(module):
  """{'path/to/param': its logical axis names (None where it has none)}."""
  names = {}
  for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    meta = v.get_metadata()
    names['/'.join(map(str, path))] = next(
        (tuple(meta[k]) for k in ('out_sharding', 'sharding_names') if meta.get(k)), None)
  return names


def test_shape_structure_and_parameter_names():
  model = _text_unet()
  x, t = _inputs()
  out = model(x, t, _cond())
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert not hasattr(model, 'label_embed')
  assert model.text_embed.proj.kernel.shape == (TEXT_DIM, TINY['y_embed_dim'])
  # Cross-attention at the two lowest resolutions only (4×4: encoder 1, decoder 0; 2×2: the
  # midcoder), after each residual block; heads kept at ≥ 16 channels each.
  assert model.encoders[0].cross_attention is None and model.decoders[1].cross_attention is None
  assert [b.num_heads for b in model.encoders[1].cross_attention] == [1]
  assert [b.num_heads for b in model.midcoder.cross_attention] == [2]
  assert [b.num_heads for b in model.decoders[0].cross_attention] == [1]
  names = _logical_names(_cross_blocks(model)[1])
  assert names['query/kernel'] == ('conv_in', 'heads')
  assert names['key_value/kernel'] == ('text', 'heads')
  assert names['out/kernel'] == ('heads', 'conv_out')
  assert _logical_names(model.text_embed)['proj/kernel'] == ('text', None)
  assert all(n is not None for n in _logical_names(model).values())


def test_levels_and_heads_are_chosen_by_arguments():
  only_lowest = _text_unet(text_attention_levels=(-1,))
  assert len(_cross_blocks(only_lowest)) == 1 and only_lowest.midcoder.cross_attention
  assert unet_text.heads_for(128, 8) == 8 and unet_text.heads_for(64, 8) == 4
  assert unet_text.heads_for(8, 4) == 1 and unet_text.heads_for(48, 4) == 3
  with pytest.raises(ValueError, match='not a level'):
    _text_unet(text_attention_levels=(3,))


def test_padded_tokens_change_nothing():
  model = _perturbed(_text_unet())
  x, t = _inputs()
  cond = _cond()
  out = model(x, t, cond)
  mask = np.asarray(cond['mask'], bool)
  noise = 100.0 * jax.random.normal(jax.random.key(5), cond['hidden'].shape)
  changed = dict(cond, hidden=jnp.where(mask[:, :, None], cond['hidden'], noise))
  np.testing.assert_allclose(np.asarray(model(x, t, changed)), np.asarray(out), atol=1e-6)
  # Through a trained encoder: other ids at padded positions, same image prediction.
  encoder = text_transformer.TextTransformer(width=TEXT_DIM, depth=1, heads=2,
                                             max_length=LENGTH, rngs=nnx.Rngs(3))
  ids = jax.random.randint(jax.random.key(8), (BATCH, LENGTH), 3, 200)
  other = jnp.where(mask, ids, jax.random.randint(jax.random.key(9), ids.shape, 0, 259))

  def predict(token_ids):
    features = encoder(token_ids, cond['mask'])
    return model(x, t, dict(features, mask=cond['mask']))

  np.testing.assert_allclose(np.asarray(predict(other)), np.asarray(predict(ids)), atol=1e-6)
  # The same padding with real tokens does change the prediction.
  assert float(jnp.abs(model(x, t, dict(cond, hidden=noise)) - out).max()) > 1e-3


def test_at_initialisation_hidden_states_change_nothing_and_pooled_does():
  model = _text_unet(norm='group')
  # The final conv starts at zero (output 0): give it weights so that the output says something.
  model.final_conv.kernel[...] = jax.random.normal(jax.random.key(1),
                                                   model.final_conv.kernel.shape)
  x, t = _inputs()
  cond = _cond()
  out = model(x, t, cond)
  assert float(jnp.abs(out).max()) > 1e-2
  other_hidden = dict(cond, hidden=_cond(seed=1)['hidden'])
  np.testing.assert_array_equal(np.asarray(model(x, t, other_hidden)), np.asarray(out))
  other_pooled = dict(cond, pooled=_cond(seed=1)['pooled'])
  assert float(jnp.abs(model(x, t, other_pooled) - out).max()) > 1e-3


def test_one_optimizer_step_makes_the_output_depend_on_the_hidden_states():
  model = _text_unet(norm='group')
  model.final_conv.kernel[...] = jax.random.normal(jax.random.key(1),
                                                   model.final_conv.kernel.shape)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, t = _inputs()
  cond = _cond()
  target = jax.random.normal(jax.random.key(2), x.shape)

  def loss_fn(m):
    return jnp.mean((m(x, t, cond) - target) ** 2)

  grads = nnx.grad(loss_fn)(model)
  out_grads = [float(jnp.abs(g[...]).max()) for p, g in nnx.to_flat_state(grads)
               if 'cross_attention' in p and p[-2:] == ('out', 'kernel')]
  assert len(out_grads) == 3 and min(out_grads) > 0
  optimizer.update(model, grads)
  other_hidden = dict(cond, hidden=_cond(seed=1)['hidden'])
  delta = jnp.abs(model(x, t, other_hidden) - model(x, t, cond))
  # Rows with tokens now see them; the row without any token (LENGTHS[2] = 0) still does not.
  assert all(float(delta[i].max()) > 1e-4 for i, n in enumerate(LENGTHS) if n)
  assert float(delta[LENGTHS.index(0)].max()) == 0.0


def test_each_sample_is_independent_of_the_other_rows():
  model = _perturbed(_text_unet())
  x, t = _inputs()
  cond = _cond()
  out = model(x, t, cond)
  assert bool(jnp.isfinite(out).all())
  for i in range(BATCH):
    row = jax.tree.map(lambda a, i=i: a[i:i + 1], cond)
    np.testing.assert_allclose(np.asarray(model(x[i:i + 1], t[i:i + 1], row))[0],
                               np.asarray(out[i]), rtol=1e-5, atol=1e-5)
  # Other rows' conditions changed: row 0's prediction stays.
  swapped = jax.tree.map(lambda a, b: a.at[1:].set(b[1:]), cond, _cond(seed=3, lengths=(3, 2, 6,
                                                                                          4)))
  np.testing.assert_allclose(np.asarray(model(x, t, swapped)[0]), np.asarray(out[0]), atol=1e-5)


def test_jit_matches_eager_and_traces_once():
  model = _perturbed(_text_unet())
  x, t = _inputs()
  traces = []

  @nnx.jit
  def forward(m, x, t, cond):
    traces.append(1)
    return m(x, t, cond)

  np.testing.assert_allclose(np.asarray(forward(model, x, t, _cond())),
                             np.asarray(model(x, t, _cond())), rtol=1e-5, atol=1e-5)
  forward(model, x, t, _cond(seed=4))
  assert len(traces) == 1


def test_wrong_condition_types_are_refused():
  x, t = _inputs()
  with pytest.raises(ValueError, match='takes a dict'):
    _text_unet()(x, t, jnp.zeros((BATCH,), jnp.int32))
  plain = unet.UNet(**{k: v for k, v in TINY.items() if k != 'text_heads'}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='takes labels'):
    plain(x, t, _cond())
  with pytest.raises(ValueError, match='text width 16'):
    _text_unet()(x, t, dict(_cond(), pooled=jnp.zeros((BATCH, 8))))


def test_factory_builds_the_text_unet_from_the_config():
  config = fashion_mnist.get_config()
  config.model.unet_text_heads = 8
  model = factory.constructor(config, (28, 28, 1), text_dim=128)()
  plain = factory.constructor(config, (28, 28, 1))()
  assert plain.text_dim == 0 and hasattr(plain, 'label_embed')
  assert [b.num_heads for b in model.midcoder.cross_attention] == [8, 8]
  assert [b.num_heads for b in model.encoders[1].cross_attention] == [4, 4]  # 64 ch: 16 each
  assert model.flops_per_example() > plain.flops_per_example()
  config.model.unet_text_attention_levels = (5,)
  with pytest.raises(errors.ConfigError, match='not a level'):
    factory.constructor(config, (28, 28, 1), text_dim=128)
  config = fashion_mnist.get_config('dit')
  with pytest.raises(errors.ConfigError, match='text U-Net only'):
    factory.constructor(config, (28, 28, 1), text_dim=128)


# Fingerprints of tiny seeded class-conditional U-Nets computed by the code before text_dim
# existed (commit 362a026): (parameter count, sha256 of the sorted 'path:shape' lines, Σ|θ|,
# Σ output, Σ|output| after every parameter was moved by 0.1·N(0, 1)).
BEFORE_TEXT = {
    ('group', 0): (60, '579d4387d656b496', 1119.1786848083402, -83.93912506103516,
                   361.16485595703125),
    ('none', 2): (52, '6d79a0a50e262078', 969.5080007657016, 61.2235107421875,
                  311.9102783203125),
}


@pytest.mark.parametrize('norm,heads', sorted(BEFORE_TEXT))
def test_class_conditional_unet_is_unchanged(norm, heads):
  model = unet.UNet(input_size=8, in_channels=2, num_classes=3, channels=(8, 16),
                    num_residual_layers=1, t_embed_dim=8, y_embed_dim=8, norm=norm,
                    attention_heads=heads, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  flat = sorted((jax.tree_util.keystr(p), v)
                for p, v in jax.tree_util.tree_leaves_with_path(params))
  layout = '\n'.join(f'{p}:{tuple(v.shape)}' for p, v in flat)
  count, digest, abs_sum, out_sum, out_abs_sum = BEFORE_TEXT[(norm, heads)]
  assert len(flat) == count
  assert hashlib.sha256(layout.encode()).hexdigest()[:16] == digest
  np.testing.assert_allclose(sum(np.abs(np.asarray(v, np.float64)).sum() for _, v in flat),
                             abs_sum, rtol=1e-6)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  out = _perturbed(model)(x, jnp.array([0.25, 0.75]), jnp.array([1, 3]))
  np.testing.assert_allclose(float(jnp.sum(out)), out_sum, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(jnp.abs(out))), out_abs_sum, rtol=1e-5)
