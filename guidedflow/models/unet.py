"""The lecture's simplified U-Net (MIT 6.S184 lab style), conditioned on time t and label y.

Encoders (residual blocks, then a stride-2 conv: channels up, resolution down), a midcoder,
and decoders (2× bilinear upsampling + conv, then residual blocks) with the encoder outputs
added back as skip connections. Each residual block adds a per-channel bias computed from the
time embedding (Gaussian Fourier features) and one from the label embedding (a table with
K + 1 rows, row K = null label ∅). With channels (32, 64, 128) a 28×28 image goes
28 → 14 → 7 and back. With `text_dim > 0` the same network is conditioned on text instead
(`unet_text`: pooled text into the label adapters, cross-attention at the low resolutions).

Differences from the lab, on purpose: GroupNorm (statistics in f32) instead of BatchNorm, so
the network has no batch state and treats conditional/unconditional halves of a CFG batch
independently; pre-activation order norm → SiLU → conv; and a zero-initialised final conv, so
the output is exactly 0 at initialisation (as the DiT's). The output is float32.

Logical axis names: conv kernels (None, None, 'conv_in', 'conv_out'); dense kernels
('embed', 'conv_out') for the adapters; label table ('classes', None); the text pieces' in
`unet_text`.
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow.models import unet_text
from guidedflow.models.layers import as_hw, partitioned


NORMS = ('group', 'none')  # normalisation in the residual blocks


def conv3x3(c_in: int, c_out: int, *, strides: int = 1, dtype, param_dtype, rngs: nnx.Rngs,
            zero: bool = False) -> nnx.Conv:
  """3×3 'SAME' conv (lecun-normal, or zero-initialised with `zero`), with logical axis names."""
  kernel_init = nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal()
  return nnx.Conv(c_in, c_out, (3, 3), strides=strides, padding='SAME', dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs,
                  kernel_init=partitioned(kernel_init, (None, None, 'conv_in', 'conv_out')),
                  bias_init=partitioned(nnx.initializers.zeros_init(), ('conv_out',)))


def _norm(channels: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Up to 8 groups; flax computes GroupNorm statistics in at least float32.
  groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
  return nnx.GroupNorm(channels, num_groups=groups, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs,
                       scale_init=partitioned(nnx.initializers.ones_init(), (None,)),
                       bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))


class Adapter(nnx.Module):
  """Embedding → per-channel bias: Linear, SiLU, Linear (one per residual block)."""

  def __init__(self, embed_dim: int, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(embed_dim, embed_dim, **kw,
                          kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None)),
                          bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))
    self.fc2 = nnx.Linear(embed_dim, channels, **kw,
                          kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                                  (None, 'conv_out')),
                          bias_init=partitioned(nnx.initializers.zeros_init(), ('conv_out',)))

  def __call__(self, emb: jax.Array) -> jax.Array:
    return self.fc2(nnx.silu(self.fc1(emb)))[:, None, None, :]  # (B, 1, 1, C)


def maybe_norm(norm: str, channels: int, **kw) -> nnx.GroupNorm | None:
  """A GroupNorm for norm='group', None (identity) for norm='none'."""
  return _norm(channels, **kw) if norm == 'group' else None


def apply_norm(norm: nnx.GroupNorm | None, x: jax.Array) -> jax.Array:
  """`norm(x)`, or x when `norm` is None."""
  return x if norm is None else norm(x)


class ResidualLayer(nnx.Module):
  """x + conv(silu(norm(conv(silu(norm(x))) + t_bias + y_bias))).

  With norm='none' the norms are identities and conv2 starts at zero (SkipInit): every block is
  the identity at initialisation, so the residual stream keeps its scale without normalisation.
  With y_embed_dim=0 the block has no label adapter (no y_bias; call it with y_emb=None): the
  noise-aware classifier's blocks see only the time.
  """

  def __init__(self, channels: int, t_embed_dim: int, y_embed_dim: int, *, dtype, param_dtype,
               rngs: nnx.Rngs, norm: str = 'group'):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = maybe_norm(norm, channels, **kw)
    self.conv1 = conv3x3(channels, channels, **kw)
    self.t_adapter = Adapter(t_embed_dim, channels, **kw)
    # Built in this order so that a generator's parameters (and their random init) are those of
    # checkpoints written before the adapter became optional.
    self.y_adapter = Adapter(y_embed_dim, channels, **kw) if y_embed_dim > 0 else None
    self.norm2 = maybe_norm(norm, channels, **kw)
    self.conv2 = conv3x3(channels, channels, zero=norm == 'none', **kw)

  def __call__(self, x: jax.Array, t_emb: jax.Array, y_emb: jax.Array | None = None
               ) -> jax.Array:
    h = self.conv1(nnx.silu(apply_norm(self.norm1, x)))
    h = h + self.t_adapter(t_emb)
    if self.y_adapter is not None:
      h = h + self.y_adapter(y_emb)
    h = self.conv2(nnx.silu(apply_norm(self.norm2, h)))
    return x + h


def cross_attention_blocks(channels: int, count: int, text_dim: int, text_heads: int,
                           **kw) -> nnx.List | None:
  """`count` text cross-attention blocks at `channels` (one after each residual block of a
  stage), or None for text_dim=0."""
  if not text_dim:
    return None
  heads = unet_text.heads_for(channels, text_heads)
  return nnx.List([unet_text.CrossAttention(channels, text_dim, heads, **kw)
                   for _ in range(count)])


def attend_text(blocks: nnx.List | None, i: int, x: jax.Array, text) -> jax.Array:
  """x after the i-th cross-attention block of a stage (x itself in a stage without)."""
  return x if blocks is None else blocks[i](x, *text)


class Encoder(nnx.Module):
  """Residual blocks at `c_in`, then a stride-2 conv to `c_out` (resolution halves).

  y_embed_dim=0: no label adapters (y_emb=None), as in every block class here. text_dim > 0:
  text cross-attention after each residual block (called with text = (hidden, mask)).
  """

  def __init__(self, c_in: int, c_out: int, num_residual_layers: int, t_embed_dim: int,
               y_embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, norm: str = 'group',
               text_dim: int = 0, text_heads: int = 4):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.res_blocks = nnx.List([ResidualLayer(c_in, t_embed_dim, y_embed_dim, norm=norm, **kw)
                                for _ in range(num_residual_layers)])
    self.downsample = conv3x3(c_in, c_out, strides=2, **kw)
    self.cross_attention = cross_attention_blocks(c_in, num_residual_layers, text_dim,
                                                  text_heads, **kw)

  def __call__(self, x, t_emb, y_emb=None, text=None):
    for i, block in enumerate(self.res_blocks):
      x = attend_text(self.cross_attention, i, block(x, t_emb, y_emb), text)
    return self.downsample(x)


class SelfAttention(nnx.Module):
  """x + out(attention(LayerNorm(x))) over the H·W positions, `num_heads` heads; the output
  projection starts at zero, so the block is the identity at initialisation (as the residual
  blocks without norm). At the lowest resolution (7×7 for 28×28 images) it gives every position
  the whole image (a bag's handle and its body) for a few % of the step."""

  def __init__(self, channels: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    if channels % num_heads:
      raise ValueError(f'U-Net attention: {channels} channels do not split into {num_heads} '
                       'heads.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.norm = nnx.LayerNorm(channels, **kw,
                              scale_init=partitioned(nnx.initializers.ones_init(), (None,)),
                              bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))
    self.qkv = nnx.Linear(channels, 3 * channels, **kw,
                          kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                                  ('conv_out', None)),
                          bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))
    self.out = nnx.Linear(channels, channels, **kw,
                          kernel_init=partitioned(nnx.initializers.zeros_init(),
                                                  (None, 'conv_out')),
                          bias_init=partitioned(nnx.initializers.zeros_init(), ('conv_out',)))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.norm(x.reshape(b, h * w, c))  # (B, T, C)
    q, k, v = jnp.split(self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, -1), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))  # (B, T, heads, C / heads)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    attended = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, h * w, c)
    return x + self.out(attended).reshape(b, h, w, c)


class Midcoder(nnx.Module):
  """Residual blocks at the lowest resolution; with `attention_heads`, self-attention after
  each of them but the last; with text_dim > 0, text cross-attention after each of them."""

  def __init__(self, channels: int, num_residual_layers: int, t_embed_dim: int,
               y_embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, norm: str = 'group',
               attention_heads: int = 0, text_dim: int = 0, text_heads: int = 4):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.res_blocks = nnx.List([
        ResidualLayer(channels, t_embed_dim, y_embed_dim, norm=norm, **kw)
        for _ in range(num_residual_layers)])
    self.attention = (nnx.List([SelfAttention(channels, attention_heads, **kw)
                                for _ in range(max(num_residual_layers - 1, 1))])
                      if attention_heads else None)
    self.cross_attention = cross_attention_blocks(channels, num_residual_layers, text_dim,
                                                  text_heads, **kw)

  def __call__(self, x, t_emb, y_emb=None, text=None):
    for i, block in enumerate(self.res_blocks):
      x = block(x, t_emb, y_emb)
      if self.attention is not None and i < len(self.attention):
        x = self.attention[i](x)
      x = attend_text(self.cross_attention, i, x, text)
    return x


class Decoder(nnx.Module):
  """2× bilinear upsampling + conv to `c_out`, then residual blocks at `c_out`."""

  def __init__(self, c_in: int, c_out: int, num_residual_layers: int, t_embed_dim: int,
               y_embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, norm: str = 'group',
               text_dim: int = 0, text_heads: int = 4):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.upsample_conv = conv3x3(c_in, c_out, **kw)
    self.res_blocks = nnx.List([ResidualLayer(c_out, t_embed_dim, y_embed_dim, norm=norm, **kw)
                                for _ in range(num_residual_layers)])
    self.cross_attention = cross_attention_blocks(c_out, num_residual_layers, text_dim,
                                                  text_heads, **kw)

  def __call__(self, x, t_emb, y_emb=None, text=None):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method='bilinear')
    x = self.upsample_conv(x)
    for i, block in enumerate(self.res_blocks):
      x = attend_text(self.cross_attention, i, block(x, t_emb, y_emb), text)
    return x


class FourierEncoder(nnx.Module):
  """Gaussian Fourier features of t ∈ [0, 1]: √2·[sin(2πwt), cos(2πwt)], w ~ N(0, 1) learned."""

  def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs):
    if dim % 2:
      raise ValueError(f't_embed_dim must be even, got {dim}.')
    self.weights = nnx.Param(
        partitioned(nnx.initializers.normal(1.0), (None,))(rngs.params(), (dim // 2,),
                                                           param_dtype))

  def __call__(self, t: jax.Array) -> jax.Array:
    freqs = 2.0 * jnp.pi * t.astype(jnp.float32)[:, None] * self.weights[...].astype(jnp.float32)
    return jnp.sqrt(2.0) * jnp.concatenate([jnp.sin(freqs), jnp.cos(freqs)], axis=-1)  # (B, dim)


class UNet(nnx.Module):
  """Simplified U-Net for `(x, t, y)` → prediction of the shape of x, float32.

  With text_dim > 0 (a text U-Net, `unet_text`) y is the text condition
  {'hidden': (B, L, text_dim), 'mask': (B, L), 'pooled': (B, text_dim)} instead of labels.

  Args:
    input_size: image height = width, or (height, width); each must be divisible by
      2**(len(channels) − 1).
    in_channels: image channels (the output has the same number).
    num_classes: K; the label table has K + 1 rows, row K is the null label ∅.
    dtype, param_dtype: compute and parameter dtypes.
    rngs: initialisation randomness.
    channels: channels per resolution level, e.g. (32, 64, 128): 28 → 14 → 7.
    num_residual_layers: residual blocks per encoder, midcoder and decoder.
    t_embed_dim, y_embed_dim: sizes of the time and label embeddings.
    norm: 'group' (GroupNorm before each conv of a residual block) or 'none' (no normalisation;
      residual blocks start as identities). On a CPU 'none' trains ~2× faster (GroupNorm is
      elementwise work that XLA:CPU runs on one core).
    attention_heads: > 0: self-attention with this many heads in the midcoder (the lowest
      resolution), between its residual blocks; 0: none (the lecture's U-Net).
    text_dim: 0: class-conditional (the label table; num_classes used). > 0: text-conditional
      with hidden states of this width: pooled text · W + b replaces the label table, and
      cross-attention follows every residual block at the `text_attention_levels`.
    text_attention_levels: resolutions with text cross-attention, as indices into `channels`
      (negative from the end): default the two lowest (14×14 and 7×7 for 28×28 images).
    text_heads: most heads per cross-attention block; fewer where the head width would fall
      below 16 channels (`unet_text.heads_for`).
  """

  def __init__(self, *, input_size: int | Sequence[int], in_channels: int, num_classes: int,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
               channels: Sequence[int] = (32, 64, 128), num_residual_layers: int = 2,
               t_embed_dim: int = 40, y_embed_dim: int = 40, norm: str = 'group',
               attention_heads: int = 0, text_dim: int = 0,
               text_attention_levels: Sequence[int] = (-2, -1), text_heads: int = 4):
    if norm not in NORMS:
      raise ValueError(f"U-Net norm must be 'group' or 'none', got {norm!r}.")
    self.norm = norm
    self.input_size = as_hw(input_size)
    self.in_channels = int(in_channels)
    self.num_classes = int(num_classes)
    self.channels = tuple(int(c) for c in channels)
    self.num_residual_layers = int(num_residual_layers)
    self.dtype = dtype
    self.text_dim = int(text_dim)
    levels = unet_text.resolve_levels(text_attention_levels, len(self.channels))
    factor = 2 ** (len(self.channels) - 1)
    h, w = self.input_size
    if h % factor or w % factor:
      fits = [n for n in range(1, len(self.channels) + 1) if h % 2 ** (n - 1) == 0
              and w % 2 ** (n - 1) == 0]
      raise ValueError(f'U-Net input size {h}×{w} is not divisible by {factor} = 2^(number of '
                       f'downsamplings) for channels={self.channels}; use at most {max(fits)} '
                       'channel levels or a size divisible by it.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c0 = self.channels[0]
    self.init_conv = conv3x3(self.in_channels, c0, **kw)
    self.init_norm = maybe_norm(norm, c0, **kw)
    self.time_embedder = FourierEncoder(t_embed_dim, param_dtype=param_dtype, rngs=rngs)
    if self.text_dim:
      self.text_embed = unet_text.TextEmbed(self.text_dim, y_embed_dim, **kw)
    else:
      self.label_embed = nnx.Embed(
          self.num_classes + 1, y_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
          embedding_init=partitioned(nnx.initializers.normal(1.0), ('classes', None)))
    pairs = list(zip(self.channels[:-1], self.channels[1:]))
    block_kw = dict(norm=norm, **kw)

    def text_kw(level):  # cross-attention in the stages at resolution level `level`
      return (dict(text_dim=self.text_dim, text_heads=int(text_heads)) if level in levels
              else {})

    n = len(self.channels)
    self.encoders = nnx.List([Encoder(a, b, num_residual_layers, t_embed_dim, y_embed_dim,
                                      **text_kw(i), **block_kw)
                              for i, (a, b) in enumerate(pairs)])
    self.midcoder = Midcoder(self.channels[-1], num_residual_layers, t_embed_dim, y_embed_dim,
                             attention_heads=int(attention_heads), **text_kw(n - 1), **block_kw)
    self.decoders = nnx.List([Decoder(b, a, num_residual_layers, t_embed_dim, y_embed_dim,
                                      **text_kw(i), **block_kw)
                              for i, (a, b) in reversed(list(enumerate(pairs)))])
    self.final_conv = conv3x3(c0, self.in_channels, zero=True, **kw)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    if tuple(x.shape[1:3]) != self.input_size or x.shape[3] != self.in_channels:
      raise ValueError(f'U-Net built for {self.input_size}×{self.in_channels}, got x of shape '
                       f'{x.shape}.')
    t_emb = self.time_embedder(t).astype(self.dtype)  # (B, t_embed_dim)
    if self.text_dim:
      hidden, mask, pooled = unet_text.check_cond(y, self.text_dim)
      y_emb = self.text_embed(pooled)                 # (B, y_embed_dim)
      text = (hidden, mask)
    else:
      if isinstance(y, Mapping):
        raise ValueError('a class-conditional U-Net (text_dim=0) takes labels, got a dict.')
      y_emb = self.label_embed(y)                     # (B, y_embed_dim)
      text = None
    x = nnx.silu(apply_norm(self.init_norm, self.init_conv(x.astype(self.dtype))))
    residuals = []
    for encoder in self.encoders:
      x = encoder(x, t_emb, y_emb, text)
      residuals.append(x)
    x = self.midcoder(x, t_emb, y_emb, text)
    for decoder in self.decoders:
      x = decoder(x + residuals.pop(), t_emb, y_emb, text)
    return self.final_conv(x).astype(jnp.float32)

  def flops_per_example(self, text_length: int = 24) -> int:
    """Forward FLOPs for one image: 2 × multiply-adds of convs and dense layers (a text
    U-Net's with `text_length` text tokens)."""
    h, w = self.input_size
    t_dim = self.time_embedder.weights.shape[0] * 2
    y_dim = (self.text_embed.proj.kernel.shape[1] if self.text_dim
             else self.label_embed.embedding.shape[1])

    def conv(hw, c_in, c_out):
      return hw * 9 * c_in * c_out

    def res(hw, c):
      return 2 * conv(hw, c, c) + t_dim * t_dim + t_dim * c + y_dim * y_dim + y_dim * c

    nr = self.num_residual_layers
    hw = h * w
    macs = conv(hw, self.in_channels, self.channels[0])
    for c_in, c_out in zip(self.channels[:-1], self.channels[1:]):
      macs += nr * res(hw, c_in) + conv(hw // 4, c_in, c_out)
      hw //= 4
    macs += nr * res(hw, self.channels[-1])
    if self.midcoder.attention is not None:  # qkv and output projections, scores and sums
      c = self.channels[-1]
      macs += len(self.midcoder.attention) * (4 * hw * c * c + 2 * hw * hw * c)
    for c_in, c_out in zip(self.channels[::-1][:-1], self.channels[::-1][1:]):
      hw *= 4
      macs += conv(hw, c_in, c_out) + nr * res(hw, c_out)
    macs += conv(hw, self.channels[0], self.in_channels)
    flops = 2 * macs
    if self.text_dim:
      flops += 2 * self.text_dim * y_dim
      stages = [(e, h * w // 4**i) for i, e in enumerate(self.encoders)]
      stages += [(self.midcoder, h * w // 4**len(self.encoders))]
      stages += [(d, h * w // 4**(len(self.decoders) - 1 - j))
                 for j, d in enumerate(self.decoders)]
      for stage, tokens in stages:
        for block in stage.cross_attention or ():
          flops += block.flops_per_example(tokens, text_length)
    return flops
