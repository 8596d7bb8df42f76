"""The noise-aware classifier p_t(y|x) of classifier guidance: the U-Net's encoder half.

As ADM's classifier (Dhariwal & Nichol 2021, `EncoderUNetModel`), it is the downsampling half
of the generator's U-Net (`models.unet`) ending in a pooled linear head: init conv →
encoders (residual blocks with a time adapter each, then a stride-2 conv) → midcoder →
norm → SiLU → global mean pool → Linear to K logits. The blocks are the U-Net's own, built
with y_embed_dim=0 (no label adapter: the label is what it predicts). ADM pools with an
attention layer; we use a global mean pool (ADM's 'adaptive' option) — at 7×7 the two differ
little and the mean pool is cheaper on a CPU. The head is zero-initialised, like ADM's, so the
classifier starts at the uniform distribution (logits 0).

Time: t ∈ [0, 1], t = 0 pure noise, t = 1 clean data (this project's convention; ADM's integer
steps run the other way).

Logical axis names: as the U-Net's (conv kernels (None, None, 'conv_in', 'conv_out'), adapter
kernels (None, 'conv_out')); head kernel ('conv_in', None).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow.models import unet
from guidedflow.models.layers import as_hw, partitioned


class NoisyClassifier(nnx.Module):
  """Logits of p_t(y|x) for noisy images x (B, H, W, C) in [−1, 1] at times t (B,).

  Args:
    input_size: image height = width, or (height, width); each must be divisible by
      2**(len(channels) − 1).
    in_channels: image channels C.
    num_classes: K, the number of logits (no null label: it is not a generator).
    channels: channels per resolution level, e.g. (32, 64, 128): 28 → 14 → 7.
    num_residual_layers: residual blocks per encoder and in the midcoder.
    t_embed_dim: size of the time embedding (Gaussian Fourier features; even).
    norm: 'group' (GroupNorm before each conv of a residual block, and before the pool) or
      'none' (no normalisation; residual blocks start as identities).
    dtype, param_dtype: compute and parameter dtypes; logits are float32.
    rngs: initialisation randomness.
  """

  def __init__(self, *, input_size: int | Sequence[int], in_channels: int, num_classes: int,
               channels: Sequence[int] = (32, 64, 128), num_residual_layers: int = 1,
               t_embed_dim: int = 40, norm: str = 'group', dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if norm not in unet.NORMS:
      raise ValueError(f'NoisyClassifier norm must be one of {unet.NORMS}, got {norm!r}.')
    self.channels = tuple(int(c) for c in channels)
    if not self.channels or min(self.channels) < 1:
      raise ValueError(f'NoisyClassifier channels must be positive widths, got {channels!r}.')
    self.input_size = as_hw(input_size)
    self.in_channels = int(in_channels)
    self.num_classes = int(num_classes)
    self.num_residual_layers = int(num_residual_layers)
    self.t_embed_dim = int(t_embed_dim)
    self.dtype = dtype
    factor = 2 ** (len(self.channels) - 1)
    h, w = self.input_size
    if h % factor or w % factor:
      fits = [n for n in range(1, len(self.channels) + 1) if h % 2 ** (n - 1) == 0
              and w % 2 ** (n - 1) == 0]
      raise ValueError(f'NoisyClassifier input size {h}×{w} is not divisible by {factor} = '
                       f'2^(number of downsamplings) for channels={self.channels}; use at most '
                       f'{max(fits)} channel levels or a size divisible by it.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    block_kw = dict(norm=norm, **kw)
    c0, c_last = self.channels[0], self.channels[-1]
    self.init_conv = unet.conv3x3(self.in_channels, c0, **kw)
    self.init_norm = unet.maybe_norm(norm, c0, **kw)
    self.time_embedder = unet.FourierEncoder(self.t_embed_dim, param_dtype=param_dtype,
                                             rngs=rngs)
    self.encoders = nnx.List([
        unet.Encoder(a, b, self.num_residual_layers, self.t_embed_dim, 0, **block_kw)
        for a, b in zip(self.channels[:-1], self.channels[1:])])
    self.midcoder = unet.Midcoder(c_last, self.num_residual_layers, self.t_embed_dim, 0,
                                  **block_kw)
    self.out_norm = unet.maybe_norm(norm, c_last, **kw)
    self.head = nnx.Linear(
        c_last, self.num_classes, **kw,
        kernel_init=partitioned(nnx.initializers.zeros_init(), ('conv_in', None)),
        bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))

  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """Logits (B, num_classes), float32, of x (B, H, W, C) at times t (B,)."""
    if tuple(x.shape[1:3]) != self.input_size or x.shape[3] != self.in_channels:
      raise ValueError(f'NoisyClassifier built for {self.input_size}×{self.in_channels}, got x '
                       f'of shape {x.shape}.')
    t_emb = self.time_embedder(t).astype(self.dtype)  # (B, t_embed_dim)
    h = nnx.silu(unet.apply_norm(self.init_norm, self.init_conv(x.astype(self.dtype))))
    for encoder in self.encoders:
      h = encoder(h, t_emb)  # (B, H/2^i, W/2^i, C_i)
    h = self.midcoder(h, t_emb)
    h = nnx.silu(unet.apply_norm(self.out_norm, h))
    pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)  # (B, C_last)
    return self.head(pooled).astype(jnp.float32)  # (B, K)

  def flops_per_example(self) -> int:
    """Forward FLOPs for one image: 2 × multiply-adds of convs and dense layers."""
    t_dim = self.t_embed_dim
    hw = self.input_size[0] * self.input_size[1]

    def res(hw, c):
      return 2 * hw * 9 * c * c + t_dim * t_dim + t_dim * c

    nr = self.num_residual_layers
    macs = hw * 9 * self.in_channels * self.channels[0]
    for c_in, c_out in zip(self.channels[:-1], self.channels[1:]):
      macs += nr * res(hw, c_in) + (hw // 4) * 9 * c_in * c_out
      hw //= 4
    macs += nr * res(hw, self.channels[-1]) + self.channels[-1] * self.num_classes
    return 2 * macs
