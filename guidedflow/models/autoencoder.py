"""KL autoencoder of the Stable Diffusion VAE family (LDM's AutoencoderKL) in flax.nnx.

Encoder: conv_in; per level `layers_per_block` ResNet blocks (GroupNorm → SiLU → conv, twice,
1×1 shortcut when the width changes) and, on every level but the last, a down-sampler that pads
(0, 1) on H and W and runs a VALID stride-2 3×3 conv; a mid block (ResNet, single-head
self-attention over the H·W positions with a residual, ResNet); GroupNorm → SiLU → conv_out to
2 × latent channels; `quant_conv` (1×1). The moments are (mean, log-variance), the log-variance
clipped to [−30, 20]. Decoder: `post_quant_conv` (1×1); conv_in; the mid block; per level, in
reverse, `layers_per_block + 1` ResNet blocks and, on every level but the last, nearest ×2 up
then a 3×3 conv; GroupNorm → SiLU → conv_out. GroupNorm ε = 1e-6, 32 groups in the SD-VAE
(`norm_groups`). With channels (128, 256, 512, 512), 2 blocks and 4 latent channels this is
`sd-vae-ft-ema/mse` (83.7M parameters, 256×256×3 → 32×32×4).

Images are NHWC in [−1, 1]; latents NHWC. `scale_factor` / `shift_factor` (SD: 0.18215 / 0;
SD3, Flux: a shift too) map moments to the generator's latents: z = (sample − shift) · scale.

Logical axis names: conv kernels (None, None, 'conv_in', 'conv_out'); attention projections
('embed', 'mlp') and ('mlp', 'embed').
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow.models.layers import partitioned

LOGVAR_RANGE = (-30.0, 20.0)
RECONSTRUCTION_LOSSES = ('l1', 'l2')  # per-pixel error of a training objective
GROUPNORM_EPS = 1e-6


def _conv(c_in, c_out, kernel, *, strides=1, padding='SAME', dtype, param_dtype, rngs):
  return nnx.Conv(c_in, c_out, (kernel, kernel), strides=strides, padding=padding, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs,
                  kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                          (None, None, 'conv_in', 'conv_out')),
                  bias_init=partitioned(nnx.initializers.zeros_init(), ('conv_out',)))


def _norm(channels, groups, *, dtype, param_dtype, rngs):
  if channels % groups:
    raise ValueError(f'Autoencoder: {channels} channels do not split into {groups} GroupNorm '
                     'groups; use widths divisible by norm_groups.')
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=GROUPNORM_EPS, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs,
                       scale_init=partitioned(nnx.initializers.ones_init(), (None,)),
                       bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))


def _linear(d_in, d_out, names, *, dtype, param_dtype, rngs):
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=partitioned(nnx.initializers.lecun_normal(), names),
                    bias_init=partitioned(nnx.initializers.zeros_init(), (names[1],)))


class ResnetBlock(nnx.Module):
  """x' + conv2(silu(norm2(conv1(silu(norm1(x)))))), x' = x or its 1×1 `shortcut`."""

  def __init__(self, c_in, c_out, *, groups, **kw):
    self.norm1 = _norm(c_in, groups, **kw)
    self.conv1 = _conv(c_in, c_out, 3, **kw)
    self.norm2 = _norm(c_out, groups, **kw)
    self.conv2 = _conv(c_out, c_out, 3, **kw)
    self.shortcut = _conv(c_in, c_out, 1, **kw) if c_in != c_out else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (x if self.shortcut is None else self.shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over the H·W positions, scale 1/√C, with a residual."""

  def __init__(self, channels, *, groups, **kw):
    self.norm = _norm(channels, groups, **kw)
    self.query = _linear(channels, channels, ('embed', 'mlp'), **kw)
    self.key = _linear(channels, channels, ('embed', 'mlp'), **kw)
    self.value = _linear(channels, channels, ('embed', 'mlp'), **kw)
    self.proj = _linear(channels, channels, ('mlp', 'embed'), **kw)

  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = self.norm(x).reshape(batch, height * width, channels)  # (B, T, C)
    q, k, v = self.query(h), self.key(h), self.value(h)
    logits = jnp.einsum('btc,bsc->bts', q, k).astype(jnp.float32) / math.sqrt(channels)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.proj(jnp.einsum('bts,bsc->btc', weights, v))
    return x + out.reshape(x.shape)


class MidBlock(nnx.Module):
  def __init__(self, channels, *, groups, **kw):
    self.block1 = ResnetBlock(channels, channels, groups=groups, **kw)
    self.attention = Attention(channels, groups=groups, **kw)
    self.block2 = ResnetBlock(channels, channels, groups=groups, **kw)

  def __call__(self, x):
    return self.block2(self.attention(self.block1(x)))


class Downsample(nnx.Module):
  """Pad (0, 1) on H and W, then a VALID stride-2 3×3 conv (the SD-VAE's asymmetric pad)."""

  def __init__(self, channels, **kw):
    self.conv = _conv(channels, channels, 3, strides=2, padding='VALID', **kw)

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour ×2, then a 3×3 conv."""

  def __init__(self, channels, **kw):
    self.conv = _conv(channels, channels, 3, **kw)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """The ResNet blocks of one resolution and its resampler (None on the last level)."""

  def __init__(self, widths, resample, *, groups, **kw):
    self.blocks = nnx.List([ResnetBlock(a, b, groups=groups, **kw)
                            for a, b in zip(widths[:-1], widths[1:])])
    self.resample = resample

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x if self.resample is None else self.resample(x)


class Encoder(nnx.Module):
  def __init__(self, in_channels, channels, layers_per_block, latent_channels, *, groups, **kw):
    self.conv_in = _conv(in_channels, channels[0], 3, **kw)
    levels, width = [], channels[0]
    for i, c in enumerate(channels):
      last = i == len(channels) - 1
      levels.append(Level([width] + [c] * layers_per_block,
                          None if last else Downsample(c, **kw), groups=groups, **kw))
      width = c
    self.levels = nnx.List(levels)
    self.mid = MidBlock(width, groups=groups, **kw)
    self.norm_out = _norm(width, groups, **kw)
    self.conv_out = _conv(width, 2 * latent_channels, 3, **kw)

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.levels:
      h = level(h)
    return self.conv_out(nnx.silu(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
  def __init__(self, out_channels, channels, layers_per_block, latent_channels, *, groups,
               **kw):
    reversed_channels = tuple(reversed(channels))
    width = reversed_channels[0]
    self.conv_in = _conv(latent_channels, width, 3, **kw)
    self.mid = MidBlock(width, groups=groups, **kw)
    levels = []
    for i, c in enumerate(reversed_channels):
      last = i == len(channels) - 1
      levels.append(Level([width] + [c] * (layers_per_block + 1),
                          None if last else Upsample(c, **kw), groups=groups, **kw))
      width = c
    self.levels = nnx.List(levels)
    self.norm_out = _norm(width, groups, **kw)
    self.conv_out = _conv(width, out_channels, 3, **kw)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for level in self.levels:
      h = level(h)
    return self.conv_out(nnx.silu(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
  """Images (B, H, W, C) in [−1, 1] ↔ latents (B, H/f, W/f, latent_channels), f = 2^(levels − 1).

  Args:
    in_channels: image channels (3 for the SD-VAE, 1 for Fashion-MNIST).
    channels: width per level (SD-VAE: (128, 256, 512, 512)).
    layers_per_block: ResNet blocks per encoder level (the decoder has one more).
    latent_channels: channels of the latent (SD-VAE: 4).
    norm_groups: GroupNorm groups (SD-VAE: 32); every width must divide by it.
    scale_factor, shift_factor: latent = (sample − shift) · scale (SD-VAE: 0.18215, 0).
    dtype, param_dtype, rngs: as the other models.
  """

  def __init__(self, *, in_channels: int = 3, channels: Sequence[int] = (128, 256, 512, 512),
               layers_per_block: int = 2, latent_channels: int = 4, norm_groups: int = 32,
               scale_factor: float = 0.18215, shift_factor: float = 0.0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    channels = tuple(int(c) for c in channels)
    if not channels or layers_per_block < 1:
      raise ValueError('Autoencoder needs at least one level and one ResNet block per level.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_channels, self.latent_channels = int(in_channels), int(latent_channels)
    self.channels, self.downsample_factor = channels, 2 ** (len(channels) - 1)
    self.scale_factor, self.shift_factor = float(scale_factor), float(shift_factor)
    self.encoder = Encoder(in_channels, channels, layers_per_block, latent_channels,
                           groups=norm_groups, **kw)
    self.quant_conv = _conv(2 * latent_channels, 2 * latent_channels, 1, **kw)
    self.post_quant_conv = _conv(latent_channels, latent_channels, 1, **kw)
    self.decoder = Decoder(in_channels, channels, layers_per_block, latent_channels,
                           groups=norm_groups, **kw)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, log-variance) of q(z|x), float32, each (B, H/f, W/f, latent_channels)."""
    moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Images (float32) from unscaled latent samples z (B, H/f, W/f, latent_channels)."""
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, x: jax.Array, key: jax.Array | None = None):
    """(reconstruction, mean, log-variance); samples z = mean + std·ε with `key`, else the mean."""
    mean, logvar = self.encode(x)
    z = mean if key is None else sample(mean, logvar, key)
    return self.decode(z), mean, logvar

  def to_latent(self, z: jax.Array) -> jax.Array:
    """Generator space: (z − shift) · scale."""
    return (z - self.shift_factor) * self.scale_factor

  def from_latent(self, latent: jax.Array) -> jax.Array:
    return latent / self.scale_factor + self.shift_factor


def sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """z = mean + exp(logvar / 2) · ε, ε ~ N(0, I)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) ‖ N(0, I)) per example, summed over the latent (B,), as LDM:
  0.5 · Σ (mean² + var − 1 − logvar)."""
  terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)
