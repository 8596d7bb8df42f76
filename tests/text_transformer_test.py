"""Tests for guidedflow.models.text_transformer: the byte tokenizer (round trip, padding,
truncation warning) and the encoder (key mask, batch independence, jit, gradients, and learning
the Fashion-MNIST class nouns from captions)."""

import logging
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from guidedflow import captions, errors
from guidedflow.models import text_transformer as tt
from guidedflow.models.layers import param_count

TINY = dict(width=32, depth=2, heads=2, max_length=24)


def _tiny(**overrides):
  return tt.TextTransformer(rngs=nnx.Rngs(0), **{**TINY, **overrides})


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize('text', ['a photo of a small light sandal', 'café', 'naïve 日本 ✓', ''])
def test_tokenizer_round_trips_utf8(text):
  tokenizer = tt.ByteTokenizer(max_length=40)
  ids, mask = tokenizer([text])
  assert tokenizer.decode(ids, mask) == [text]
  assert tokenizer.decode(ids) == [text]  # eos ends the text without the mask too


def test_tokenizer_ids_padding_and_mask():
  ids, mask = tt.ByteTokenizer(max_length=8)(['ab', 'é'])
  assert ids.shape == mask.shape == (2, 8)
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids[0], [1, 97 + 3, 98 + 3, 2, 0, 0, 0, 0])
  np.testing.assert_array_equal(ids[1], [1, 0xC3 + 3, 0xA9 + 3, 2, 0, 0, 0, 0])  # é = C3 A9
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0, 0, 0]] * 2)
  assert ids.max() < tt.BYTE_VOCAB_SIZE == 259


def test_tokenizer_lowercases_only_when_asked():
  upper, _ = tt.ByteTokenizer(16)(['T-Shirt'])
  lower, _ = tt.ByteTokenizer(16, lowercase=True)(['T-Shirt'])
  assert tt.ByteTokenizer(16).decode(upper) == ['T-Shirt']
  assert tt.ByteTokenizer(16).decode(lower) == ['t-shirt']


def test_truncation_warns_once_naming_the_limit(caplog):
  tokenizer = tt.ByteTokenizer(max_length=6)
  with caplog.at_level(logging.WARNING):
    ids, mask = tokenizer(['abcd', 'abcdefgh', 'aéé', 'xyzxyzxyz'])
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1
  message = warnings[0].getMessage()
  assert 'max_length=6' in message and '3 of 4' in message
  assert mask.sum(axis=1).tolist() == [6, 6, 5, 6]
  assert ids[:, -1].tolist() == [2, 2, 0, 2]  # eos kept at the end of a cut text
  # Whole characters only: of 'aéé' (5 bytes) 4 bytes of room keep 'aé', not half an 'é';
  # 'abcd' fits exactly, uncut.
  assert tokenizer.decode(ids, mask) == ['abcd', 'abcd', 'aé', 'xyzx']

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tokenizer(['abcd', ''])
  assert not caplog.records


def test_every_caption_fits_the_default_length():
  tokenizer = tt.TextTransformerConfig().tokenizer()
  table = captions.caption_table()
  ids, mask = tokenizer(table)
  assert mask.sum(axis=1).max() <= tokenizer.max_length
  assert tokenizer.decode(ids[::97], mask[::97]) == table[::97]


def test_caption_vocabulary_is_sorted_deterministic_and_covers_every_caption_word():
  table = captions.caption_table()
  words = tt.vocabulary(table)
  assert words == tt.vocabulary(table[::-1])  # the set of captions, not their order
  assert list(words) == sorted(set(words)) and len(words) == 49
  assert {'t-shirt', 'button-up', ',', 'patterned', 'trousers'} <= set(words)
  tokenizer = tt.WordTokenizer(words)
  assert tokenizer.vocab_size == 53 and tokenizer.max_length == 16
  ids, mask = tokenizer(['a t-shirt, dark', 'bag'])
  # pad 0, bos 1, eos 2, unk 3, then word i of the sorted vocabulary at i + 4 (',' sorts first)
  index = {w: i + 4 for i, w in enumerate(words)}
  np.testing.assert_array_equal(ids[0, :6], [1, index['a'], index['t-shirt'], 4, index['dark'], 2])
  np.testing.assert_array_equal(ids[1], [1, index['bag'], 2] + [0] * 13)
  np.testing.assert_array_equal(mask.sum(1), [6, 3])


def test_word_tokenizer_round_trips_every_caption_and_fits_16_tokens(caplog):
  table = captions.caption_table()
  tokenizer = tt.WordTokenizer(tt.vocabulary(table))
  with caplog.at_level(logging.WARNING):
    ids, mask = tokenizer(table)
  assert not caplog.records  # no caption is cut, no word is unk
  assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
  assert mask.sum(axis=1).max() == 14  # 12 words + bos + eos
  assert tokenizer.decode(ids, mask) == [c.lower() for c in table]


def test_unknown_words_are_unk_and_cut_texts_keep_eos_with_one_warning_each(caplog):
  tokenizer = tt.WordTokenizer(('a', 'bag', 'dark'), max_length=5)
  with caplog.at_level(logging.WARNING):
    ids, mask = tokenizer(['A dark bag!', 'a shiny bag', 'dark dark dark dark', 'bag'])
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(messages) == 2
  cut, = [m for m in messages if 'truncated' in m]
  assert 'max_length=5' in cut and '2 of 4' in cut
  unknown, = [m for m in messages if 'unk' in m]
  assert "'shiny'" in unknown and "'!'" not in unknown  # '!' was cut off, never looked up
  np.testing.assert_array_equal(ids, [[1, 4, 6, 5, 2], [1, 4, 3, 5, 2], [1, 6, 6, 6, 2],
                                      [1, 5, 2, 0, 0]])
  assert tokenizer.decode(ids, mask) == ['a dark bag', 'a <unk> bag', 'dark dark dark', 'bag']
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tokenizer(['a shiny bag'])  # named already (a grid tokenizes its samples' prompts again)
    tokenizer(['red bag'])
  assert [r.getMessage().split(': ')[-1] for r in caplog.records] == ["'red'."]
  with pytest.raises(errors.ConfigError, match='vocabulary'):
    tt.WordTokenizer(('bag', 'a'))  # unsorted: ids would depend on the order of the captions


# ----------------------------------------------------------------------------- encoder


def test_default_config_is_small_and_outputs_match_the_interface():
  model = nnx.eval_shape(lambda: tt.TextTransformer(rngs=nnx.Rngs(0)))
  assert param_count(model) == 634_880  # < 2 M
  tiny = _tiny()
  ids, mask = tiny.config.tokenizer()(['a dark wide pullover', 'bag'])
  out = tiny(jnp.asarray(ids), jnp.asarray(mask))
  chex.assert_shape(out['hidden'], (2, 24, 32))
  chex.assert_shape(out['pooled'], (2, 32))
  chex.assert_type([out['hidden'], out['pooled']], jnp.float32)
  chex.assert_tree_all_finite(out)
  # pooled = the masked mean of hidden.
  expected = (out['hidden'] * mask[..., None]).sum(1) / mask.sum(1)[:, None]
  np.testing.assert_allclose(out['pooled'], expected, rtol=1e-5, atol=1e-6)


def test_bad_configs_are_refused():
  with pytest.raises(errors.ConfigError, match='divisible'):
    _tiny(heads=3)
  with pytest.raises(errors.ConfigError, match='Unknown'):
    _tiny(num_layers=2)
  with pytest.raises(ValueError, match='max_length=24'):
    _tiny()(jnp.zeros((1, 25), jnp.int32))


@pytest.mark.parametrize('position_embedding', ['learned', 'sincos'])
def test_masked_ids_change_nothing_unmasked(position_embedding):
  model = _tiny(position_embedding=position_embedding)
  ids, mask = model.config.tokenizer()(['a photo of a bag', 'tee, light', 'frock'])
  noise = np.random.default_rng(0).integers(0, tt.BYTE_VOCAB_SIZE, ids.shape)
  other_ids = np.where(mask == 1, ids, noise).astype(np.int32)
  assert (other_ids != ids).sum() > 20
  out = model(jnp.asarray(ids), jnp.asarray(mask))
  other = model(jnp.asarray(other_ids), jnp.asarray(mask))
  keep = mask.astype(bool)
  np.testing.assert_allclose(other['hidden'][keep], out['hidden'][keep], atol=1e-6, rtol=0)
  np.testing.assert_allclose(other['pooled'], out['pooled'], atol=1e-6, rtol=0)
  # Padding after the text is invisible: the same text at a shorter padded length.
  short = model(jnp.asarray(ids[:, :18]), jnp.asarray(mask[:, :18]))
  np.testing.assert_allclose(short['pooled'], out['pooled'], atol=1e-6, rtol=0)
  np.testing.assert_allclose(short['hidden'][keep[:, :18]], out['hidden'][:, :18][keep[:, :18]],
                             atol=1e-6, rtol=0)


def test_rows_are_encoded_independently():
  model = _tiny()
  texts = ['sneaker, dark', 'a large coat', 'sneaker, dark', 'boot']
  ids, mask = model.config.tokenizer()(texts)
  out = model(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(out['pooled'][0], out['pooled'][2])
  assert np.abs(out['pooled'][0] - out['pooled'][1]).max() > 1e-3
  order = np.array([3, 0, 1, 2])
  permuted = model(jnp.asarray(ids[order]), jnp.asarray(mask[order]))
  np.testing.assert_allclose(permuted['hidden'], out['hidden'][order], atol=1e-6, rtol=0)
  alone = model(jnp.asarray(ids[1:2]), jnp.asarray(mask[1:2]))
  np.testing.assert_allclose(alone['pooled'][0], out['pooled'][1], atol=1e-6, rtol=0)


def test_jit_matches_eager_and_traces_once():
  model = _tiny()
  tokenizer = model.config.tokenizer()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def encode(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  graphdef, state = nnx.split(model)
  for texts in (['a tee', 'pants, wide'], ['a picture of a gown', 'purse']):
    ids, mask = tokenizer(texts)
    jitted = encode(graphdef, state, ids, mask)
    eager = model(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(jitted['hidden'], eager['hidden'], atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_outputs():
  ids, mask = tt.ByteTokenizer(24)(['a small dark sandal', 'coat'])
  f32 = _tiny()(jnp.asarray(ids), jnp.asarray(mask))
  bf16 = _tiny(dtype='bfloat16')(jnp.asarray(ids), jnp.asarray(mask))
  chex.assert_type([bf16['hidden'], bf16['pooled']], jnp.float32)
  np.testing.assert_allclose(bf16['pooled'], f32['pooled'], atol=0.1)


def test_gradient_reaches_every_parameter():
  model = _tiny()
  # The last text fills all 24 positions (bos, 22 bytes, eos), so every position row is used.
  ids, mask = model.config.tokenizer()(['a photo of a dark tee', 'bag', 'x' * 22])
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  probe = jax.random.normal(jax.random.key(1), (3, 24, 32))

  def loss(m):
    out = m(ids, mask)
    return jnp.sum(out['hidden'] * probe) + jnp.sum(out['pooled'] ** 2)

  grads = nnx.grad(loss)(model)
  norms = {jax.tree_util.keystr(path): float(jnp.linalg.norm(g))
           for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))}
  assert len(norms) == 2 + 2 + 2 * 8  # embeddings, final norm, 4 Linears of 2 blocks
  dead = [name for name, norm in norms.items() if not norm > 0]
  assert not dead, dead


# ----------------------------------------------------------------------------- learning


def test_learns_the_class_nouns_of_fashion_mnist_captions():
  """Encoder + linear probe on the pooled vector, 100 Adam steps of 64 captions: the class of
  held-out captions (760 of the 3,960; ~99 % in ~7 s on a 2-core CPU). One block: two learn
  more slowly (95 % after these 100 steps) and cost twice the time."""
  table = captions.caption_table()
  per_class = 3 * len(captions.TEMPLATES) * captions.NUM_PHRASES
  labels = np.arange(len(table)) // per_class
  ids, mask = tt.ByteTokenizer(64)(table)
  order = np.random.default_rng(0).permutation(len(table))
  train, test = order[:3200], order[3200:]

  class Classifier(nnx.Module):
    def __init__(self, rngs):
      self.encoder = tt.TextTransformer(rngs=rngs, width=32, depth=1, heads=2, max_length=64)
      self.probe = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, ids, mask):
      return self.probe(self.encoder(ids, mask)['pooled'])

  model = Classifier(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, ids, mask, labels):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(ids, mask), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  start = time.perf_counter()
  rng = np.random.default_rng(1)
  for _ in range(100):
    batch = rng.choice(train, 64, replace=False)
    loss = step(model, optimizer, ids[batch], mask[batch], labels[batch])
  predicted = np.asarray(jnp.argmax(nnx.jit(model)(ids[test], mask[test]), axis=-1))
  accuracy = float(np.mean(predicted == labels[test]))
  seconds = time.perf_counter() - start
  print(f'class-noun accuracy {accuracy:.4f} on {len(test)} held-out captions, final loss '
        f'{float(loss):.4f}, {seconds:.1f} s')
  assert accuracy > 0.95
