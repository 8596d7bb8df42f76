"""The CLIP text transformer of the Stable Diffusion family (SD 1.x: OpenAI ViT-L/14; SD 2.x:
OpenCLIP ViT-H/14; SDXL: both ViT-L/14 and OpenCLIP ViT-bigG/14) in flax.nnx, laid out like
transformers' `CLIPTextModel(WithProjection)` so that its weights load key for key
(`clip_text_weights`, which reads OpenCLIP's layout too).

The network, as transformers 5's `CLIPTextModel`: token embedding + learned position embedding
→ `layers` pre-norm blocks (LayerNorm → causal multi-head self-attention with biases →
residual, LayerNorm → fc1 → quick-GELU x·σ(1.702x) or exact (erf) GELU → fc2 → residual) →
final LayerNorm. The attention mask is causal, combined with the optional padding mask
(masked logits set to f32's min, as transformers' additive mask does): with right padding only
the padded positions' outputs change. Outputs (`ClipTextOutput`):
  * `last_hidden_state` (B, L, D): after the final LayerNorm (SD 1.x's conditioning);
  * `penultimate_hidden_state` (B, L, D): the output of the second-to-last block, *without* the
    final LayerNorm — transformers' `hidden_states[-2]`, what SDXL feeds its U-Net from both
    encoders; SD 2.x uses it *with* the final LayerNorm (`model.final_layer_norm(...)`);
  * `pooled` (B, D): the last hidden state at one token per row: at argmax(input_ids) when
    `eos_token_id == 2` (the legacy configs of the published checkpoints, and OpenCLIP: the
    end-of-text token has the largest id of CLIP's vocab), else at the first `eos_token_id`;
  * `text_embeds` (B, P): `pooled @ text_projection` where the config has `projection_dim`
    (SDXL's pooled condition from bigG), else None.

Precision: matmuls take `dtype` operands and accumulate in f32; the residual stream, norms,
attention logits and softmax stay in f32; outputs are f32. Parameters carry logical axis names
('vocab', 'embed', 'heads', 'mlp'; 'vocab' and the position table are replicated by
`guidedflow.sharding`'s rules, 'embed' goes to 'fsdp', 'heads' and 'mlp' to 'tensor').
"""

import dataclasses
import json
import math
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow import errors
from guidedflow.models import precision
from guidedflow.models.layers import layer_norm_f32, partitioned

MAX_LENGTH = 77  # CLIP's context: <|startoftext|>, 75 tokens, <|endoftext|>
ACTIVATIONS = ('quick_gelu', 'gelu')
LEGACY_EOS_TOKEN_ID = 2  # transformers' marker of "pool at argmax(input_ids)"


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """Sizes of a CLIP text transformer (names as in guidedflow; `config_from_hf` maps
  transformers' `CLIPTextConfig`)."""
  width: int = 768
  layers: int = 12
  heads: int = 12
  vocab_size: int = 49408
  max_length: int = MAX_LENGTH
  mlp_dim: int = 3072
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = None
  eos_token_id: int = LEGACY_EOS_TOKEN_ID

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def pools_at_argmax(self) -> bool:
    """transformers' rule: configs with eos_token_id 2 (written before its fix of the eos id)
    pool at argmax(input_ids), others at the first eos_token_id."""
    return self.eos_token_id == LEGACY_EOS_TOKEN_ID


# The text encoders of the SD family. The published checkpoints' configs say eos_token_id 2, so
# they pool at argmax(input_ids), the end-of-text token (49407, the largest id); OpenCLIP does
# the same. `projection_dim`: the text projection of CLIPTextModelWithProjection / OpenCLIP.
CONFIGS = {
    'openai-vit-l-14': ClipTextConfig(width=768, layers=12, heads=12, mlp_dim=3072,
                                      activation='quick_gelu', projection_dim=768),
    'openclip-vit-h-14': ClipTextConfig(width=1024, layers=24, heads=16, mlp_dim=4096,
                                        activation='gelu', projection_dim=1024),
    'openclip-vit-bigg-14': ClipTextConfig(width=1280, layers=32, heads=20, mlp_dim=5120,
                                           activation='gelu', projection_dim=1280),
    'test': ClipTextConfig(width=32, layers=2, heads=4, vocab_size=160, max_length=16,
                           mlp_dim=64, projection_dim=16),
}
# Parameters of the published text encoders (transformers' CLIPTextModel, without / with the
# text projection; counted by tests/fixtures/make_clip_fixtures.py on the meta device).
PUBLISHED_PARAMETERS = {
    'openai-vit-l-14': (123_060_480, 123_650_304),
    'openclip-vit-h-14': (352_984_064, 354_032_640),
    'openclip-vit-bigg-14': (693_021_440, 694_659_840),
}


def get_config(name: str = 'openai-vit-l-14', **overrides: Any) -> ClipTextConfig:
  """The config named `name` (`CONFIGS`), with `overrides` (e.g. projection_dim=None)."""
  if name not in CONFIGS:
    raise errors.ConfigError(f'Unknown CLIP text encoder {name!r}; allowed: {sorted(CONFIGS)}.')
  return check_config(dataclasses.replace(CONFIGS[name], **overrides))


def check_config(config: ClipTextConfig) -> ClipTextConfig:
  """`config`, or a ConfigError naming the bad field."""
  if config.activation not in ACTIVATIONS:
    raise errors.ConfigError(f'CLIP text activation={config.activation!r} is not one of '
                             f'{ACTIVATIONS}.')
  if config.width % config.heads:
    raise errors.ConfigError(f'CLIP text width {config.width} is not divisible by heads '
                             f'{config.heads}.')
  return config


def config_from_hf(source: str | os.PathLike | Mapping[str, Any], **overrides: Any
                   ) -> ClipTextConfig:
  """The config of a transformers `CLIPTextConfig` (a dict, or a `config.json` path; a full
  `CLIPConfig`'s `text_config` is used)."""
  if not isinstance(source, Mapping):
    with open(source) as f:
      source = json.load(f)
  hf = source.get('text_config', source)
  act = hf.get('hidden_act', 'quick_gelu')
  fields = dict(width=hf.get('hidden_size', 512), layers=hf.get('num_hidden_layers', 12),
                heads=hf.get('num_attention_heads', 8), vocab_size=hf.get('vocab_size', 49408),
                max_length=hf.get('max_position_embeddings', MAX_LENGTH),
                mlp_dim=hf.get('intermediate_size', 2048), activation=act,
                layer_norm_eps=hf.get('layer_norm_eps', 1e-5),
                projection_dim=hf.get('projection_dim', 512),
                eos_token_id=hf.get('eos_token_id', 49407))
  if 'CLIPTextModel' in hf.get('architectures', ()):
    fields['projection_dim'] = None
  fields.update(overrides)
  return check_config(ClipTextConfig(**fields))


class ClipTextOutput(NamedTuple):
  """What `ClipTextEncoder` returns (module docstring); float32."""
  last_hidden_state: jax.Array         # (B, L, D), final LayerNorm applied
  penultimate_hidden_state: jax.Array  # (B, L, D), hidden_states[-2]: no final LayerNorm
  pooled: jax.Array                    # (B, D)
  text_embeds: jax.Array | None        # (B, P) or None without a projection


def causal_mask(length: int) -> jax.Array:
  """(1, 1, L, L) bool: query i attends to keys 0..i."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


def combined_mask(length: int, padding_mask: jax.Array | None) -> jax.Array:
  """(B or 1, 1, L, L) bool: the causal mask, and the keys `padding_mask` (B, L) marks real."""
  mask = causal_mask(length)
  if padding_mask is not None:
    mask = mask & jnp.asarray(padding_mask).astype(bool)[:, None, None, :]
  return mask


def pool_indices(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """(B,) the token each row is pooled at: transformers' rule (`ClipTextConfig.pools_at_argmax`);
  a row without eos pools at 0, as transformers' argmax of all-zeros does."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x·σ(1.702x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  return quick_gelu if name == 'quick_gelu' else lambda x: jax.nn.gelu(x, approximate=False)


def _dense(d_in: int, d_out: int, names: tuple, *, dtype, param_dtype, rngs: nnx.Rngs,
           use_bias: bool = True) -> nnx.Linear:
  init = nnx.initializers.normal(1.0 / math.sqrt(d_in))
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    dot_general=precision.mixed_dot_general, rngs=rngs,
                    kernel_init=partitioned(init, names),
                    bias_init=partitioned(nnx.initializers.zeros_init(), names[1:]))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with `scale` and `bias`; statistics and result in f32
  (two-pass variance, as torch's)."""

  def __init__(self, dim: int, eps: float, *, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(partitioned(nnx.initializers.ones_init(), ('embed',))(
        None, (dim,), param_dtype))
    self.bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), ('embed',))(
        None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm_f32(x, self.eps)
    return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class ClipAttention(nnx.Module):
  """Multi-head self-attention with biased q/k/v/out projections and a boolean mask."""

  def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = _dense(width, width, ('embed', 'heads'), **kw)
    self.k_proj = _dense(width, width, ('embed', 'heads'), **kw)
    self.v_proj = _dense(width, width, ('embed', 'heads'), **kw)
    self.out_proj = _dense(width, width, ('heads', 'embed'), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, L, D) → f32 (B, L, D); `mask` (B or 1, 1, L, L) bool, True where attended."""
    batch, length, width = x.shape
    head_dim = width // self.heads
    x = x.astype(self.dtype)
    split = lambda y: y.astype(self.dtype).reshape(batch, length, self.heads, head_dim)  # noqa: E731
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, L, H, Dh)
    logits = precision.einsum('bqhd,bkhd->bhqk', q, k) * (head_dim ** -0.5)  # (B, H, L, L) f32
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = precision.einsum('bhqk,bkhd->bqhd', probs, v)                      # (B, L, H, Dh)
    return self.out_proj(out.reshape(batch, length, width).astype(self.dtype)).astype(jnp.float32)


class ClipMlp(nnx.Module):
  """fc1 → activation (in f32) → fc2."""

  def __init__(self, width: int, mlp_dim: int, activation: str, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.activation = activation
    self.fc1 = _dense(width, mlp_dim, ('embed', 'mlp'), dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
    self.fc2 = _dense(mlp_dim, width, ('mlp', 'embed'), dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = _activation(self.activation)(self.fc1(x.astype(self.dtype)).astype(jnp.float32))
    return self.fc2(h.astype(self.dtype)).astype(jnp.float32)


class ClipEncoderLayer(nnx.Module):
  """Pre-norm block: x + attn(LN1(x)), then + mlp(LN2(x))."""

  def __init__(self, config: ClipTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(config.width, config.layer_norm_eps, param_dtype=param_dtype)
    self.self_attn = ClipAttention(config.width, config.heads, **kw)
    self.layer_norm2 = LayerNorm(config.width, config.layer_norm_eps, param_dtype=param_dtype)
    self.mlp = ClipMlp(config.width, config.mlp_dim, config.activation, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class ClipTextEncoder(nnx.Module):
  """CLIP's text transformer (module docstring).

  Args:
    config: a `ClipTextConfig` or the name of one in `CONFIGS`.
    dtype: compute dtype of the matmuls (float32 or bfloat16).
    param_dtype: dtype of the parameters.
    rngs: initialisation randomness (weights are normally loaded: `clip_text_weights`).

  Call: `model(input_ids, attention_mask=None)` with int input_ids (B, L), L ≤ max_length, and
  an optional padding mask (B, L) (1: token, 0: padding) → `ClipTextOutput`.
  """

  def __init__(self, config: ClipTextConfig | str = 'openai-vit-l-14', *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    config = get_config(config) if isinstance(config, str) else check_config(config)
    self.config = config
    self.dtype = dtype
    d = config.width
    self.token_embedding = nnx.Embed(
        config.vocab_size, d, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs,
        embedding_init=partitioned(nnx.initializers.normal(0.02), ('vocab', 'embed')))
    self.position_embedding = nnx.Param(partitioned(nnx.initializers.normal(0.01), (
        None, 'embed'))(rngs.params(), (config.max_length, d), param_dtype))
    self.layers = nnx.List([ClipEncoderLayer(config, dtype=dtype, param_dtype=param_dtype,
                                             rngs=rngs) for _ in range(config.layers)])
    self.final_layer_norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype)
    self.text_projection = nnx.data(None if not config.projection_dim else _dense(
        d, config.projection_dim, ('embed', None), dtype=dtype, param_dtype=param_dtype,
        rngs=rngs, use_bias=False))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
               ) -> ClipTextOutput:
    batch, length = input_ids.shape
    if length > self.config.max_length:
      raise ValueError(f'CLIP text input of {length} tokens is longer than the model\'s '
                       f'{self.config.max_length} positions; tokenize with that max_length.')
    x = self.token_embedding(input_ids).astype(jnp.float32)
    x = x + self.position_embedding[...][:length].astype(jnp.float32)[None]  # (B, L, D)
    mask = combined_mask(length, attention_mask)  # (B or 1, 1, L, L)
    penultimate = x
    for layer in self.layers:
      penultimate = x
      x = layer(x, mask)
    last = self.final_layer_norm(x)
    pooled = last[jnp.arange(batch), pool_indices(input_ids, self.config.eos_token_id)]  # (B, D)
    text_embeds = None
    if self.text_projection is not None:
      text_embeds = self.text_projection(pooled.astype(self.dtype)).astype(jnp.float32)
    return ClipTextOutput(last, penultimate, pooled, text_embeds)

