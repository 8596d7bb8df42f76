"""The text-conditioned generator wrapper: the null condition (learned or the empty prompt) takes
the place of ∅ rows only, for a trained encoder and for cached features alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from guidedflow.models import text_conditioning
from guidedflow.models import text_transformer


class _Backbone(nnx.Module):
  """Stand-in image network: x plus a function of every text feature (masked mean of hidden,
  pooled), so any change of the features changes the output."""

  def __init__(self, dim, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (2 * dim,)))

  def __call__(self, x, t, cond):
    mask = cond['mask'][..., None].astype(jnp.float32)
    mean = (cond['hidden'] * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    feature = jnp.concatenate([mean, cond['pooled']], -1) @ self.w[...]
    return x + (feature + t)[:, None, None, None]


L, D = 12, 16


def _encoder_model(null, tokenizer):
  rngs = nnx.Rngs(0)
  encoder = text_transformer.TextTransformer(rngs=rngs, width=D, depth=1, heads=2, max_length=L)
  empty = None
  if null == 'empty':
    tokens, mask = tokenizer([''])
    empty = {'tokens': tokens[0], 'mask': mask[0]}
  return text_conditioning.TextConditioned(_Backbone(D, rngs), text_dim=D, max_length=L,
                                           encoder=encoder, null=null, empty=empty, rngs=rngs)


@pytest.mark.parametrize('null', ['learned', 'empty'])
def test_null_rows_take_the_null_condition_and_only_they(null):
  tokenizer = text_transformer.ByteTokenizer(L)
  model = _encoder_model(null, tokenizer)
  tokens, mask = tokenizer(['a dark sneaker', 'a bag', 'pullover, patterned'])
  x, t = jnp.zeros((3, 4, 4, 1)), jnp.full((3,), 0.5)
  y = {'tokens': tokens, 'mask': mask, 'null': np.array([0, 1, 0], np.int32)}
  out = model(x, t, y)
  alone = model(x[:1], t[:1], {k: v[:1] for k, v in y.items()})
  np.testing.assert_allclose(out[0], alone[0], atol=1e-6)  # a row does not see its neighbours
  other_tokens, other_mask = tokenizer(['x', 'something else entirely', 'y'])
  moved = model(x, t, {'tokens': other_tokens, 'mask': other_mask, 'null': y['null']})
  np.testing.assert_allclose(moved[1], out[1], atol=1e-6)  # ∅ ignores its caption
  assert not np.allclose(moved[0], out[0], atol=1e-4)
  encoded = text_conditioning.encode_condition(model, y)  # what the Sampler does, once
  assert set(encoded) == {'hidden', 'mask', 'pooled'}
  np.testing.assert_array_equal(model(x, t, encoded), out)
  labels = np.arange(3)  # a class model's labels pass through
  assert text_conditioning.encode_condition(model, labels) is labels
  if null == 'empty':  # ∅ is the empty prompt, encoded
    empty_tokens, empty_mask = tokenizer([''])
    explicit = model(x[1:2], t[1:2], {'tokens': empty_tokens, 'mask': empty_mask,
                                      'null': np.zeros(1, np.int32)})
    np.testing.assert_allclose(out[1], explicit[0], atol=1e-6)
  else:  # learned: the gradient reaches the null parameters through ∅ rows only
    def loss(m, null_rows):
      return m(x, t, dict(y, null=null_rows)).sum()
    grads = nnx.grad(loss)(model, np.array([0, 0, 0], np.int32))
    assert float(jnp.abs(grads.null_hidden[...]).sum()) == 0.0
    grads = nnx.grad(loss)(model, np.array([0, 1, 0], np.int32))
    assert float(jnp.abs(grads.null_pooled[...]).sum()) > 0.0


def test_cached_features_with_the_empty_prompts_features():
  rng = np.random.default_rng(0)
  empty = {'hidden': rng.normal(size=(L, D)).astype(np.float32),
           'mask': np.array([1, 1] + [0] * (L - 2), np.int32),
           'pooled': rng.normal(size=(D,)).astype(np.float32)}
  rngs = nnx.Rngs(0)
  model = text_conditioning.TextConditioned(_Backbone(D, rngs), text_dim=D, max_length=L,
                                            null='empty', empty=empty, rngs=rngs)
  y = {'hidden': rng.normal(size=(2, L, D)).astype(np.float32),
       'mask': np.ones((2, L), np.int32), 'pooled': rng.normal(size=(2, D)).astype(np.float32),
       'null': np.array([1, 0], np.int32)}
  features = model.features(y)
  np.testing.assert_array_equal(features['hidden'][0], empty['hidden'])
  np.testing.assert_array_equal(features['mask'][0], empty['mask'])
  np.testing.assert_array_equal(features['pooled'][1], y['pooled'][1])
  assert not any(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(model.empty))
