"""The text pieces of the U-Net (`UNet(text_dim > 0)`): pooled text in, cross-attention blocks.

A text U-Net takes `cond = {'hidden': (B, L, D) float32, 'mask': (B, L) int (1 = token),
'pooled': (B, D) float32}` (any text encoder's outputs, D = its width) where the class U-Net
takes labels y:

* the pooled vector replaces the label table: `TextEmbed` maps it by a Linear D → y_embed_dim
  into the same per-block label adapters (the class model's `y_emb`);
* `CrossAttention` blocks at the resolutions chosen by `text_attention_levels` (default the two
  lowest, 14×14 and 7×7 for 28×28 images) let image positions attend to the text tokens.

Padded tokens get probability exactly 0. A row with no token at all (mask all zeros) attends to
nothing: its cross-attention output is 0, so the block is the identity for it and the sample is
conditioned by its pooled vector only (no NaN: the masked logits are f32-min, not −inf). The
output projection starts at zero, so at initialisation the hidden states change nothing.

Logical axis names: the text width 'text' (as in `dit_text`: not the model's width, and not in
`sharding.DEFAULT_RULES`, so replicated); q/k/v and the output projection's input 'heads' (fused
heads × head_dim); image channels 'conv_in' (into q) and 'conv_out' (out of the block).
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow.models.layers import partitioned

MIN_HEAD_DIM = 16
COND_KEYS = ('hidden', 'mask', 'pooled')


def heads_for(channels: int, text_heads: int) -> int:
  """The heads of a cross-attention block at `channels`: the most, up to `text_heads`, that
  divide the channels into heads of at least MIN_HEAD_DIM (one head below that width)."""
  fits = [h for h in range(1, max(text_heads, 1) + 1)
          if channels % h == 0 and channels // h >= MIN_HEAD_DIM]
  return max(fits, default=1)


def resolve_levels(levels: Sequence[int], num_levels: int) -> frozenset[int]:
  """Indices into the U-Net's channels (negative from the end) → a set in [0, num_levels)."""
  resolved = set()
  for level in levels:
    if not -num_levels <= int(level) < num_levels:
      raise ValueError(f'text_attention_levels={tuple(levels)}: {level} is not a level of a '
                       f'U-Net with {num_levels} resolutions (use 0..{num_levels - 1}, or -1 '
                       'for the lowest).')
    resolved.add(int(level) % num_levels)
  return frozenset(resolved)


def check_cond(cond, text_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(hidden (B, L, D), mask (B, L) bool, pooled (B, D)) of a text condition dict."""
  if not isinstance(cond, Mapping) or any(k not in cond for k in COND_KEYS):
    raise ValueError(f'a text U-Net (text_dim={text_dim}) takes a dict with keys {COND_KEYS} '
                     f'as its third argument, got {type(cond).__name__}.')
  hidden, mask, pooled = (jnp.asarray(cond[k]) for k in COND_KEYS)
  if hidden.ndim != 3 or hidden.shape[-1] != text_dim or pooled.shape != (hidden.shape[0],
                                                                           text_dim):
    raise ValueError(f'text U-Net built for text width {text_dim}: got hidden {hidden.shape}, '
                     f'pooled {pooled.shape}.')
  if mask.shape != hidden.shape[:2]:
    raise ValueError(f'text mask {mask.shape} does not match hidden {hidden.shape}.')
  return hidden, mask.astype(bool), pooled


class TextEmbed(nnx.Module):
  """Pooled text (B, D) → the label embedding (B, y_embed_dim): pooled·W + b."""

  def __init__(self, text_dim: int, y_embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.proj = nnx.Linear(text_dim, y_embed_dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs,
                           kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                                   ('text', None)),
                           bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))

  def __call__(self, pooled: jax.Array) -> jax.Array:
    return self.proj(pooled.astype(self.dtype))


class CrossAttention(nnx.Module):
  """x + out(attention(q = LayerNorm(x)·W_q, k, v = hidden·W_kv)) over the H·W positions.

  Queries from the image tokens (C channels), keys and values from the text hidden states
  (D → C), `num_heads` heads, logits and softmax in f32, padded keys left out; the output
  projection is zero-initialised (the block starts as the identity).
  """

  def __init__(self, channels: int, text_dim: int, num_heads: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f'U-Net cross-attention: {channels} channels do not split into '
                       f'{num_heads} heads.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.dtype = dtype
    self.norm = nnx.LayerNorm(channels, **kw,
                              scale_init=partitioned(nnx.initializers.ones_init(), (None,)),
                              bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))
    self.query = nnx.Linear(channels, channels, **kw,
                            kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                                    ('conv_in', 'heads')),
                            bias_init=partitioned(nnx.initializers.zeros_init(), ('heads',)))
    # Keys and values fused as (heads, 2, head_dim) along the output: a 'tensor' split of it
    # keeps a head's keys and values on one device.
    self.key_value = nnx.Linear(text_dim, 2 * channels, **kw,
                                kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                                        ('text', 'heads')),
                                bias_init=partitioned(nnx.initializers.zeros_init(), ('heads',)))
    self.out = nnx.Linear(channels, channels, **kw,
                          kernel_init=partitioned(nnx.initializers.zeros_init(),
                                                  ('heads', 'conv_out')),
                          bias_init=partitioned(nnx.initializers.zeros_init(), ('conv_out',)))

  def __call__(self, x: jax.Array, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    # x: (B, H, W, C); hidden: (B, L, D); mask: (B, L) bool.
    b, h, w, c = x.shape
    heads, length = self.num_heads, hidden.shape[1]
    head_dim = c // heads
    q = self.query(self.norm(x.reshape(b, h * w, c))).reshape(b, h * w, heads, head_dim)
    kv = self.key_value(hidden.astype(self.dtype)).reshape(b, length, heads, 2, head_dim)
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]                                  # (B, L, heads, Dh)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    keep = mask[:, None, None, :]                                          # (B, 1, 1, L)
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # A row without tokens got uniform weights over its padding: it attends to nothing instead.
    probs = jnp.where(jnp.any(keep, axis=-1, keepdims=True), probs, 0.0)
    attended = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v,
                          preferred_element_type=jnp.float32)
    attended = attended.astype(self.dtype).reshape(b, h * w, c)
    return x + self.out(attended).reshape(b, h, w, c).astype(x.dtype)

  def flops_per_example(self, tokens: int, length: int) -> int:
    """Forward FLOPs for one image of `tokens` positions and `length` text tokens."""
    c = self.out.kernel.shape[0]
    d = self.key_value.kernel.shape[0]
    return 2 * (2 * tokens * c * c + length * d * 2 * c + 2 * tokens * length * c)
