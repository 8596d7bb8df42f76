"""A small text transformer trained with the generator (the offline default encoder) and its
two tokenizers.

`ByteTokenizer` turns prompts into ids with no vocabulary file (UTF-8 bytes, shifted past three
special ids: pad 0, bos 1, eos 2; byte b → b + 3; 259 ids); `WordTokenizer` into the ids of a
caption vocabulary (pad 0, bos 1, eos 2, unk 3, then the sorted words; a text is lowercased and
split by `WORD_PATTERN`), 4–5× fewer tokens per caption. `TextTransformer` encodes either. They
follow the interface of the frozen encoders (CLIP, T5), so that one text cache and one generator
take any of them:

* `tokenizer(texts) → (ids int32 (B, L), mask int32 (B, L))`, L = `max_length`: each text is
  `[bos, bytes..., eos]` followed by pad ids under mask 0. A text longer than L is cut to its
  first whole UTF-8 characters (or words) that fit, its eos kept, and each call that cuts logs
  one warning naming the limit and how many texts were cut; a word outside a `WordTokenizer`'s
  vocabulary is unk, and each call that meets new ones logs one warning naming them.
* `encoder(ids, mask) → {'hidden': (B, L, D) float32, 'pooled': (B, D) float32}`: the last hidden
  states after the final LayerNorm (rows of padded tokens are not zeroed: consumers use the
  mask), and their mean over the unmasked tokens (bos and eos included).

The network: token embedding + position embedding (learned, or fixed 1-D sin-cos) → `depth`
pre-LN blocks (LayerNorm → bidirectional multi-head self-attention → residual, LayerNorm → GeLU
MLP → residual) → final LayerNorm with a learned gain and bias. Padded keys are masked out of
every softmax (probability exactly 0), so ids at masked positions change neither the hidden
states of the unmasked ones nor the pooled vector. The blocks' LayerNorms have no gain or bias:
the Linear after each absorbs them (as in DiT), and `layers.layer_norm_f32` keeps less for the
backward pass than a LayerNorm module.

Precision: as in `dit.py`, matmuls take `dtype` operands and accumulate in f32; the residual
stream, LayerNorm statistics and the attention logits and softmax (`jax.nn.dot_product_attention`,
XLA) are f32, and the outputs are f32 whatever `dtype` is.

Logical axis names on parameters (`guidedflow.sharding`): 'vocab' (embedding rows; no mesh rule,
so replicated), 'embed' (width), 'heads' (fused heads × head_dim of q/k/v and the attention
output projection's input), 'mlp' (MLP hidden), None (position rows).
"""

import dataclasses
import re
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow.models import fused, precision
from guidedflow.models.layers import UNCONSTRAINED, constrain, layer_norm_f32, partitioned

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3                     # byte b has id b + 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET  # 259
POSITION_EMBEDDINGS = ('learned', 'sincos')
UNK_ID = 3
WORD_OFFSET = 4                     # the i-th word of the sorted vocabulary has id i + 4
# A word (letters, digits, '_'; inner hyphens and apostrophes kept: 't-shirt', 'button-up',
# "don't"), or any other non-space character alone (',' '.' '!').
WORD_PATTERN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")
_WORD_START = re.compile(r'\w')
# config.text.tokenizer_kind → (max_length when config.text.max_length is None). Fashion-MNIST's
# longest caption is 60 bytes and 12 words; 64 and 16 fit each with bos and eos.
TOKENIZER_KINDS = {'bytes': 64, 'words': 16}


def _padded(rows: list[list[int]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 (B, L), mask int32 (B, L)) of token rows, padded with PAD_ID under mask 0."""
  ids = np.full((len(rows), max_length), PAD_ID, np.int32)
  mask = np.zeros((len(rows), max_length), np.int32)
  for row, tokens in enumerate(rows):
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask


def _warn_cut(name: str, num_cut: int, num: int, max_length: int, unit: str) -> None:
  if num_cut:
    logging.warning('%s: %d of %d texts are longer than max_length=%d tokens (%d %s after bos) '
                    'and were truncated.', name, num_cut, num, max_length, max_length - 2, unit)


class ByteTokenizer:
  """Texts → (ids, mask): UTF-8 bytes + 3, between bos and eos, padded to `max_length`.

  Args:
    max_length: L, the length of every row (bos and eos included, so L − 2 bytes fit).
    lowercase: lowercase each text first (off: the bytes are the text's own).
  """

  def __init__(self, max_length: int = 64, *, lowercase: bool = False):
    if max_length < 2:
      raise errors.ConfigError(f'ByteTokenizer max_length must be at least 2 (bos and eos), '
                               f'got {max_length}.')
    self.max_length = int(max_length)
    self.lowercase = bool(lowercase)
    self.vocab_size = BYTE_VOCAB_SIZE

  def encode(self, text: str) -> tuple[list[int], bool]:
    """(ids of one text, bos and eos included, at most `max_length`; whether it was cut)."""
    data = (text.lower() if self.lowercase else text).encode('utf-8')
    room = self.max_length - 2
    cut = len(data) > room
    if cut:
      end = room
      while end > 0 and data[end] & 0xC0 == 0x80:  # a continuation byte: keep whole characters
        end -= 1
      data = data[:end]
    return [BOS_ID] + [b + BYTE_OFFSET for b in data] + [EOS_ID], cut

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (B, L), mask int32 (B, L): 1 for bos, bytes and eos, 0 for padding)."""
    if isinstance(texts, str):
      raise TypeError('ByteTokenizer takes a sequence of texts; wrap a single prompt in a list.')
    encoded = [self.encode(text) for text in texts]
    _warn_cut('ByteTokenizer', sum(cut for _, cut in encoded), len(texts), self.max_length,
              'UTF-8 bytes')
    return _padded([tokens for tokens, _ in encoded], self.max_length)

  def decode(self, ids: Any, mask: Any = None) -> list[str]:
    """The texts of rows of `ids` (B, L): bytes between bos and eos (or padding), as UTF-8."""
    ids = np.asarray(ids)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    texts = []
    for row, row_mask in zip(ids, mask):
      data = bytearray()
      for token, keep in zip(row.tolist(), row_mask.tolist()):
        if not keep or token == EOS_ID:
          break
        if token >= BYTE_OFFSET:
          data.append(token - BYTE_OFFSET)
      texts.append(data.decode('utf-8', errors='replace'))
    return texts


def split_words(text: str) -> list[str]:
  """The lowercased words and punctuation of `text` (`WORD_PATTERN`), in order."""
  return WORD_PATTERN.findall(text.lower())


def vocabulary(texts: Sequence[str]) -> tuple[str, ...]:
  """Every word of `texts`, sorted: a `WordTokenizer`'s vocabulary, the same for the same set
  of texts whatever their order."""
  return tuple(sorted({word for text in texts for word in split_words(text)}))


class WordTokenizer:
  """Texts → (ids, mask): the ids of their words in `words`, between bos and eos, padded to
  `max_length`; a word outside `words` is unk (one warning per call naming such words not
  named before).

  Args:
    words: the vocabulary, sorted and unique (`vocabulary(texts)`); word i has id i + 4.
    max_length: L, the length of every row (bos and eos included, so L − 2 words fit).
  """

  def __init__(self, words: Sequence[str], max_length: int = TOKENIZER_KINDS['words']):
    words = tuple(words)
    if list(words) != sorted(set(words)) or any(split_words(w) != [w] for w in words):
      raise errors.ConfigError('A WordTokenizer vocabulary must be sorted, unique, lowercase '
                               'words of WORD_PATTERN: build it with vocabulary(texts).')
    if max_length < 2:
      raise errors.ConfigError(f'WordTokenizer max_length must be at least 2 (bos and eos), '
                               f'got {max_length}.')
    self.words, self.max_length = words, int(max_length)
    self.ids = {word: i + WORD_OFFSET for i, word in enumerate(words)}
    self.vocab_size = len(words) + WORD_OFFSET
    self._warned = set()  # unknown words already named in a warning

  def encode(self, text: str) -> tuple[list[int], bool, list[str]]:
    """(ids of one text, bos and eos included, at most `max_length`; whether it was cut; its
    words outside the vocabulary)."""
    words = split_words(text)
    cut = len(words) > self.max_length - 2
    words = words[:self.max_length - 2]
    unknown = [w for w in words if w not in self.ids]
    return [BOS_ID] + [self.ids.get(w, UNK_ID) for w in words] + [EOS_ID], cut, unknown

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (B, L), mask int32 (B, L): 1 for bos, words and eos, 0 for padding)."""
    if isinstance(texts, str):
      raise TypeError('WordTokenizer takes a sequence of texts; wrap a single prompt in a list.')
    encoded = [self.encode(text) for text in texts]
    _warn_cut('WordTokenizer', sum(cut for _, cut, _ in encoded), len(texts), self.max_length,
              'words')
    unknown = sorted({w for _, _, words in encoded for w in words} - self._warned)
    self._warned.update(unknown)  # a grid and its samples tokenize the same prompts twice
    if unknown:
      shown = ', '.join(repr(w) for w in unknown[:20]) + (' ...' if len(unknown) > 20 else '')
      logging.warning('WordTokenizer: %d word(s) outside the %d-word caption vocabulary are unk: '
                      '%s.', len(unknown), len(self.words), shown)
    return _padded([tokens for tokens, _, _ in encoded], self.max_length)

  def decode(self, ids: Any, mask: Any = None) -> list[str]:
    """The texts of rows of `ids` (B, L): words between bos and eos (or padding), joined by
    spaces, none before punctuation; unk as '<unk>'."""
    ids = np.asarray(ids)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    texts = []
    for row, row_mask in zip(ids, mask):
      text = ''
      for token, keep in zip(row.tolist(), row_mask.tolist()):
        if not keep or token == EOS_ID:
          break
        if token == UNK_ID or token >= WORD_OFFSET:
          word = '<unk>' if token == UNK_ID else self.words[token - WORD_OFFSET]
          punctuation = token != UNK_ID and not _WORD_START.match(word)
          text += word if not text or punctuation else ' ' + word
      texts.append(text)
    return texts


def tokenizer(kind: str, max_length: int | None = None,
              words: Sequence[str] | None = None) -> 'ByteTokenizer | WordTokenizer':
  """The trained encoder's tokenizer of `kind` ('bytes' | 'words': `words` is its vocabulary),
  `max_length` tokens (None: the kind's default, `TOKENIZER_KINDS`)."""
  if kind not in TOKENIZER_KINDS:
    raise errors.ConfigError(f'config.text.tokenizer_kind={kind!r} is not one of '
                             f'{tuple(TOKENIZER_KINDS)}.')
  length = int(max_length or TOKENIZER_KINDS[kind])
  if kind == 'bytes':
    return ByteTokenizer(length)
  if words is None:
    raise errors.ConfigError("config.text.tokenizer_kind='words' needs the run's caption "
                             'vocabulary: build the model and prompts through the text task, '
                             'which keeps it in <workdir>/text_vocabulary.json.')
  return WordTokenizer(words, length)


@dataclasses.dataclass(frozen=True)
class TextTransformerConfig:
  """Sizes of a `TextTransformer`; dtypes by name ('float32', 'bfloat16') or as dtypes."""
  vocab_size: int = BYTE_VOCAB_SIZE
  width: int = 128
  depth: int = 3
  heads: int = 4
  mlp_ratio: int = 4
  max_length: int = 64
  position_embedding: str = 'learned'
  dtype: Any = 'float32'        # matmul operands
  param_dtype: Any = 'float32'

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  def tokenizer(self, **kwargs) -> ByteTokenizer:
    """The `ByteTokenizer` of this encoder's length."""
    return ByteTokenizer(self.max_length, **kwargs)


def check_config(config: TextTransformerConfig) -> TextTransformerConfig:
  """`config` if its sizes fit together, else `errors.ConfigError` saying what to change."""
  if min(config.width, config.depth, config.heads, config.mlp_ratio, config.vocab_size) < 1:
    raise errors.ConfigError(f'TextTransformer sizes must be positive: {config}.')
  if config.width % config.heads:
    raise errors.ConfigError(f'TextTransformer width {config.width} is not divisible by heads '
                             f'{config.heads}.')
  if config.max_length < 2:
    raise errors.ConfigError(f'TextTransformer max_length must be at least 2 (bos and eos), '
                             f'got {config.max_length}.')
  if config.position_embedding not in POSITION_EMBEDDINGS:
    raise errors.ConfigError(f'TextTransformer position_embedding={config.position_embedding!r} '
                             f'is not one of {POSITION_EMBEDDINGS}.')
  if config.position_embedding == 'sincos' and config.width % 2:
    raise errors.ConfigError(f'sin-cos positions need an even width, got {config.width}.')
  return config


def sincos_1d_position_embedding(dim: int, length: int) -> np.ndarray:
  """Fixed 1-D sin-cos embedding (Vaswani et al.), (length, dim) float32, [sin | cos]."""
  omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.arange(length, dtype=np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def _dense(d_in: int, d_out: int, names: tuple, *, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear with f32 accumulation and logical names on kernel and bias."""
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    dot_general=precision.mixed_dot_general,
                    kernel_init=partitioned(nnx.initializers.xavier_uniform(), names),
                    bias_init=partitioned(nnx.initializers.zeros_init(), names[1:]))


class TextBlock(nnx.Module):
  """Pre-LN block: x + attn(LN(x)) under the key mask, then x + MLP(LN(x))."""

  def __init__(self, config: TextTransformerConfig, *, rngs: nnx.Rngs):
    d = config.width
    kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
              rngs=rngs)
    self.dtype = kw['dtype']
    self.heads = config.heads
    # Fused q/k/v as (heads, 3, head_dim) along the output, as in dit.Attention: splitting the
    # output over 'tensor' keeps whole heads on one device.
    self.qkv = _dense(d, 3 * d, ('embed', 'heads'), **kw)
    self.proj = _dense(d, d, ('heads', 'embed'), **kw)
    self.fc1 = _dense(d, config.mlp_dim, ('embed', 'mlp'), **kw)
    self.fc2 = _dense(config.mlp_dim, d, ('mlp', 'embed'), **kw)

  def attention(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Self-attention of LN(x) (B, L, D) with keys where key_mask (B, L) is False left out."""
    batch, length, width = x.shape
    head_dim = width // self.heads
    qkv = self.qkv(layer_norm_f32(x).astype(self.dtype)).astype(self.dtype)
    qkv = constrain(qkv.reshape(batch, length, self.heads, 3, head_dim),
                    'batch', None, 'heads', None, None)                     # (B, L, H, 3, Dh)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]             # (B, L, H, Dh)
    # f32 logits and softmax; a masked key gets probability exactly 0 (jnp.where, not a bias).
    out = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :],
                                       implementation='xla')
    out = constrain(out, 'batch', None, 'heads', None).reshape(batch, length, width)
    return self.proj(out.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    # x: (B, L, D) float32 residual stream; key_mask: (B, L) bool.
    x = x + self.attention(x, key_mask)
    h = self.fc1(layer_norm_f32(x).astype(self.dtype)).astype(jnp.float32)  # (B, L, F)
    h = fused.gelu_dense(constrain(h, 'batch', None, 'mlp'), *fused.linear_weights(self.fc2))
    return constrain(x + h, 'batch', UNCONSTRAINED, UNCONSTRAINED)


class TextTransformer(nnx.Module):
  """Token ids → {'hidden': (B, L, D), 'pooled': (B, D)}, both float32 (module docstring).

  Args:
    config: the sizes (default `TextTransformerConfig()`: width 128, depth 3, 4 heads, 64
      tokens; 0.66 M parameters).
    rngs: initialisation randomness.
    **overrides: fields of `config` to replace (`width=32, depth=2`).

  Call: `encoder(ids, mask)` with ids (B, L) int in [0, vocab_size) and mask (B, L) (1 or True
  for tokens, 0 for padding; default all tokens), L ≤ max_length with learned positions.
  """

  def __init__(self, config: TextTransformerConfig | None = None, *, rngs: nnx.Rngs,
               **overrides: Any):
    fields = {f.name for f in dataclasses.fields(TextTransformerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise errors.ConfigError(f'Unknown TextTransformer setting(s) {unknown}; allowed: '
                               f'{sorted(fields)}.')
    self.config = check_config(dataclasses.replace(config or TextTransformerConfig(),
                                                   **overrides))
    cfg = self.config
    param_dtype = jnp.dtype(cfg.param_dtype)
    small_normal = nnx.initializers.normal(0.02)
    self.token_embed = nnx.Embed(cfg.vocab_size, cfg.width, dtype=jnp.float32,
                                 param_dtype=param_dtype, rngs=rngs,
                                 embedding_init=partitioned(small_normal, ('vocab', 'embed')))
    if cfg.position_embedding == 'learned':
      self.position_embed = nnx.Param(partitioned(small_normal, (None, 'embed'))(
          rngs.params(), (cfg.max_length, cfg.width), param_dtype))
    self.blocks = nnx.List([TextBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_scale = nnx.Param(partitioned(nnx.initializers.ones_init(), ('embed',))(
        rngs.params(), (cfg.width,), param_dtype))
    self.final_bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), ('embed',))(
        rngs.params(), (cfg.width,), param_dtype))

  def positions(self, length: int) -> jax.Array:
    """(length, D) float32 position embedding of the first `length` positions."""
    cfg = self.config
    if cfg.position_embedding == 'sincos':
      return jnp.asarray(sincos_1d_position_embedding(cfg.width, length))
    if length > cfg.max_length:
      raise ValueError(f'TextTransformer got {length} tokens, more than its max_length='
                       f'{cfg.max_length} learned positions; tokenize with '
                       f'ByteTokenizer({cfg.max_length}).')
    return self.position_embed[:length].astype(jnp.float32)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    batch, length = ids.shape
    mask = (jnp.ones((batch, length), bool) if mask is None
            else jnp.asarray(mask).astype(bool))                            # (B, L)
    x = self.token_embed(ids).astype(jnp.float32) + self.positions(length)[None]  # (B, L, D)
    x = constrain(x, 'batch', UNCONSTRAINED, UNCONSTRAINED)
    for block in self.blocks:
      x = block(x, mask)
    hidden = (layer_norm_f32(x) * self.final_scale[...].astype(jnp.float32)
              + self.final_bias[...].astype(jnp.float32))                   # (B, L, D)
    weights = mask.astype(jnp.float32)[:, :, None]                          # (B, L, 1)
    pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return {'hidden': hidden, 'pooled': pooled}
