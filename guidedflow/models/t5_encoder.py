"""The T5 v1.1 encoder (PixArt-α and SD3 use T5-XXL's) in flax.nnx, laid out like transformers'
`T5EncoderModel` so that its weights load key for key (`t5_weights`).

The network: token embedding (no scaling, no position embedding) → `num_layers` pre-norm blocks
(RMS norm → self-attention → residual, RMS norm → gated-GELU feed-forward → residual) → final
RMS norm. As in transformers' T5:
  * RMS norm: x · rsqrt(mean(x²) + ε) · weight, the mean in f32, no mean subtraction, no bias;
  * attention logits are q·k without the 1/√d_kv scaling (T5 folds it into the initialisation),
    plus a learned bias per head and relative-position bucket (bidirectional buckets, half for
    each direction, exact below `num_buckets / 4`, logarithmic up to `max_distance`), computed by
    the first block's table and shared by every block, plus the padding mask as a large negative
    bias (f32 min) on the padded keys: padded queries still attend to the real tokens, so every
    output row is finite;
  * feed-forward: wo(gelu_new(wi_0 x) · wi_1 x), gelu_new being GELU's tanh approximation;
  * no bias anywhere, no dropout (inference only).
The output is the last hidden state (B, L, D), float32, and the mask it was computed with; rows
of padded tokens are not zeroed (as in transformers): consumers use the mask.

Precision: matmuls take `dtype` operands and accumulate in f32; the residual stream, norms and
softmax stay in f32. Parameters carry logical axis names ('vocab', 'embed', 'heads', 'mlp'), so
`guidedflow.sharding` shards the XXL encoder over 'fsdp' ('embed') and 'tensor' ('heads', 'mlp')
like the DiT; 'vocab' and the position-bias table are replicated.
"""

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow.models import precision
from guidedflow.models.layers import UNCONSTRAINED, constrain, gelu_tanh, partitioned

# Prompt lengths of the text-to-image models that use T5-XXL.
MAX_LENGTH_PIXART_ALPHA = 120
MAX_LENGTH_SD3 = 256


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5 v1.1 encoder (names as in transformers' `T5Config`) and the prompt length."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  max_length: int = MAX_LENGTH_PIXART_ALPHA

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv


# The google/t5-v1_1-* encoders (T5-XXL: 4,762,310,656 parameters in `T5EncoderModel`), and a
# tiny one for tests (tests/fixtures/make_t5_fixtures.py builds the same in transformers).
PRESETS = {
    't5-v1_1-xxl': T5Config(),
    't5-v1_1-xl': T5Config(d_model=2048, d_ff=5120, num_heads=32),
    't5-v1_1-large': T5Config(d_model=1024, d_ff=2816, num_heads=16),
    't5-v1_1-base': T5Config(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    't5-v1_1-small': T5Config(d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    'test': T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16),
}

# transformers config.json keys read by `config_from_hf`; everything else is T5 v1.1 as above.
_HF_KEYS = ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads',
            'relative_attention_num_buckets', 'relative_attention_max_distance',
            'layer_norm_epsilon')


def get_config(name: str = 't5-v1_1-xxl', **overrides: Any) -> T5Config:
  """The preset `name` (see `PRESETS`) with `overrides`, e.g. `max_length=256` for SD3.

  Raises:
    errors.ConfigError: unknown preset or field, or a non-positive max_length.
  """
  if name not in PRESETS:
    raise errors.ConfigError(f'Unknown T5 encoder {name!r}; allowed: {sorted(PRESETS)}.')
  fields = {f.name for f in dataclasses.fields(T5Config)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise errors.ConfigError(f'Unknown T5 encoder setting(s) {unknown}; allowed: {sorted(fields)}.')
  config = dataclasses.replace(PRESETS[name], **overrides)
  if config.max_length < 1:
    raise errors.ConfigError(f'T5 max_length must be positive (120 for PixArt-α, 256 for SD3), '
                             f'got {config.max_length}.')
  return config


def config_from_hf(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> T5Config:
  """A `T5Config` from a transformers `config.json` (its path, its directory, or the dict).

  Raises:
    errors.ConfigError: not a T5 v1.1 encoder config (a ReLU feed-forward, a missing size).
  """
  name = 'config'
  if not isinstance(source, Mapping):
    name = os.fspath(source)
    if os.path.isdir(name):
      name = os.path.join(name, 'config.json')
    with open(name, encoding='utf-8') as f:
      source = json.load(f)
  projection = source.get('feed_forward_proj', 'relu')
  if projection != 'gated-gelu':
    raise errors.ConfigError(f"{name}: feed_forward_proj is {projection!r}; this encoder is "
                             "T5 v1.1 ('gated-gelu', e.g. google/t5-v1_1-xxl).")
  missing = [k for k in _HF_KEYS if k not in source and k != 'relative_attention_max_distance']
  if missing:
    raise errors.ConfigError(f'{name}: no {missing} in the T5 config.')
  values = {k: source[k] for k in _HF_KEYS if k in source}
  return dataclasses.replace(T5Config(), **values, **overrides)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of each (query i, key j), as int32 (query_length, key_length).

  Half the buckets for keys after the query (j > i), half for the others; in each half, exact
  distances below a quarter of `num_buckets`, then logarithmic bins up to `max_distance`, beyond
  which all distances share the last bucket. Float32 arithmetic truncated to int, as
  transformers computes it, so that bin edges fall on the same distances.
  """
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # (Lq, Lk)
  half = num_buckets // 2
  max_exact = half // 2
  distance = np.abs(relative)
  with np.errstate(divide='ignore'):  # log(0) for the exact buckets, discarded below
    log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  buckets = (relative > 0) * half + np.where(distance < max_exact, distance, large)
  return buckets.astype(np.int32)


def rms_norm_f32(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """T5's layer norm: x / √(mean(x²) + ε) · weight in f32; no mean subtraction, no bias."""
  x32 = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return x32 * jax.lax.rsqrt(variance + eps) * weight.astype(jnp.float32)


def _init(fan_in: int):
  """T5's initialisation scale (transformers' `_init_weights`: normal, std fan_in^-1/2)."""
  return nnx.initializers.normal(stddev=fan_in ** -0.5)


def _dense(d_in: int, d_out: int, names: tuple, fan_in: int, *, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    dot_general=precision.mixed_dot_general, rngs=rngs,
                    kernel_init=partitioned(_init(fan_in), names))


class RMSNorm(nnx.Module):
  """T5LayerNorm: a learned per-channel `weight` (ones at init), ε from the config."""

  def __init__(self, dim: int, eps: float, *, param_dtype):
    self.eps = eps
    self.weight = nnx.Param(partitioned(nnx.initializers.ones_init(), ('embed',))(
        None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm_f32(x, self.weight[...], self.eps)


class T5Attention(nnx.Module):
  """Self-attention without logit scaling; `position_bias` (1, H, L, L) and the key mask added."""

  def __init__(self, config: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, inner = config.d_model, config.inner_dim
    self.num_heads, self.d_kv, self.dtype = config.num_heads, config.d_kv, dtype
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = _dense(d, inner, ('embed', 'heads'), d * config.d_kv, **common)
    self.k = _dense(d, inner, ('embed', 'heads'), d, **common)
    self.v = _dense(d, inner, ('embed', 'heads'), d, **common)
    self.o = _dense(inner, d, ('heads', 'embed'), inner, **common)

  def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array) -> jax.Array:
    # x: (B, L, D) normed; position_bias: (1, H, L, L) f32; mask_bias: (B, 1, 1, L) f32.
    batch, length, _ = x.shape
    split = lambda t: constrain(t.reshape(batch, length, self.num_heads, self.d_kv),  # noqa: E731
                                'batch', None, 'heads', None).astype(self.dtype)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))          # (B, L, H, Dh)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + position_bias + mask_bias, axis=-1)  # (B, H, L, L) f32
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(self.dtype), v,
                     preferred_element_type=jnp.float32)
    out = constrain(out, 'batch', None, 'heads', None).reshape(batch, length, -1)
    return self.o(out.astype(self.dtype)).astype(jnp.float32)


class T5GatedFeedForward(nnx.Module):
  """wo(gelu_new(wi_0 x) · wi_1 x): T5 v1.1's 'gated-gelu' DenseReluDense."""

  def __init__(self, config: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, d_ff = config.d_model, config.d_ff
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.wi_0 = _dense(d, d_ff, ('embed', 'mlp'), d, **common)
    self.wi_1 = _dense(d, d_ff, ('embed', 'mlp'), d, **common)
    self.wo = _dense(d_ff, d, ('mlp', 'embed'), d_ff, **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = gelu_tanh(self.wi_0(x).astype(jnp.float32))
    hidden = constrain(gate * self.wi_1(x).astype(jnp.float32), 'batch', None, 'mlp')
    return self.wo(hidden.astype(self.dtype)).astype(jnp.float32)


class T5Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ff(norm(x))."""

  def __init__(self, config: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.attention_norm = RMSNorm(config.d_model, config.layer_norm_epsilon,
                                  param_dtype=param_dtype)
    self.attention = T5Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.feed_forward_norm = RMSNorm(config.d_model, config.layer_norm_epsilon,
                                     param_dtype=param_dtype)
    self.feed_forward = T5GatedFeedForward(config, dtype=dtype, param_dtype=param_dtype,
                                           rngs=rngs)

  def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array) -> jax.Array:
    # x: (B, L, D) f32 residual stream.
    x = x + self.attention(self.attention_norm(x).astype(self.dtype), position_bias, mask_bias)
    x = x + self.feed_forward(self.feed_forward_norm(x).astype(self.dtype))
    return constrain(x, 'batch', UNCONSTRAINED, UNCONSTRAINED)


class T5Encoder(nnx.Module):
  """transformers' `T5EncoderModel` (v1.1, gated-GELU): token ids → last hidden state.

  Args:
    config: a `T5Config` or a preset name ('t5-v1_1-xxl', ..., 'test'; see `PRESETS`).
    dtype: matmul operand dtype (f32 on CPU, bf16 on accelerators); norms, softmax and the
      residual stream are f32 whatever it is.
    param_dtype: parameter dtype (f32; bf16 halves the XXL encoder's 19 GB).
    rngs: initialisation (the weights come from `t5_weights.load_into` in practice).
  """

  def __init__(self, config: T5Config | str = 't5-v1_1-xxl', *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = get_config(config) if isinstance(config, str) else config
    cfg = self.config
    self.dtype = dtype
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32,
                           param_dtype=param_dtype, rngs=rngs,
                           embedding_init=partitioned(nnx.initializers.normal(1.0),
                                                      ('vocab', 'embed')))
    # The first block's relative-position bias table (buckets, heads), shared by all blocks.
    self.relative_attention_bias = nnx.Param(partitioned(_init(cfg.d_model), (None, 'heads'))(
        rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), param_dtype))
    self.blocks = nnx.List([T5Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, param_dtype=param_dtype)

  def position_bias(self, length: int) -> jax.Array:
    """(1, H, L, L) f32: the bias of each head for each (query, key) bucket."""
    cfg = self.config
    buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    table = self.relative_attention_bias[...].astype(jnp.float32)       # (buckets, H)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]                # (1, H, L, L)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes token ids (B, L) under the mask (B, L) (1 = token, 0 = padding; default all 1).

    Returns:
      (last hidden state (B, L, D) float32, the mask (B, L) int32).
    """
    batch, length = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
    # transformers adds (1 − mask) · f32 min to the logits of padded keys.
    mask_bias = ((1 - attention_mask).astype(jnp.float32)
                 * jnp.finfo(jnp.float32).min)[:, None, None, :]         # (B, 1, 1, L)
    position_bias = self.position_bias(length)
    x = constrain(self.embed(input_ids).astype(jnp.float32), 'batch', None, UNCONSTRAINED)
    for block in self.blocks:
      x = block(x, position_bias, mask_bias)
    return self.final_norm(x), attention_mask
