"""A small CNN image classifier whose penultimate layer is guidedflow's feature network.

Fashion-MNIST has no standard feature network (Inception features of 28×28 grey garments are
not meaningful), so guidedflow trains this one (`guidedflow.train_classifier`) and uses its
penultimate activations for FD and precision/recall, and its logits for the class accuracy of
generated samples.

Layout for channels (32, 64, 128) and 28×28 inputs: conv3×3(32) → pool → 14×14,
conv3×3(64) → pool → 7×7, conv3×3(128), each conv followed by GroupNorm (optional) and GELU;
flatten → Dense(feature_dim) → GELU (the *features*) → Dense(num_classes) (the logits).
Pooling is a 2×2 max-pool after every stage but the last. No BatchNorm (optional GroupNorm
instead; off by default, it costs ~20% of CPU time for no accuracy gain at this depth) and no
dropout: the network has no batch statistics or random state, so it is a pure function of its
parameters and its outputs do not depend on what else is in the batch. GELU rather than ReLU
so that the features have no dead (identically zero) units, which would make the feature
covariance in FD singular.

`arch='gap'` is a second, different network for a second feature space: two 3×3 convs per
stage, the second with stride 2 instead of the max-pool (none after the last stage), GELU after
each, then a global average over the spatial positions (not a flatten) → Dense(feature_dim) →
GELU (the features) → Dense(num_classes). Its features are invariant to where a garment sits,
where the default's flattened ones are not.

Logical axis names: conv kernels (None, None, 'conv_in', 'conv_out'), dense kernels
('embed', 'mlp') and ('mlp', None).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow.models.layers import partitioned

ARCHS = ('cnn', 'gap')  # conv + max-pool + flatten (default) | strided convs + global average


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max-pool, stride 2, of (B, H, W, C) with even H and W.

  A reshape and a max rather than `nnx.max_pool`: same values, but its gradient is a
  comparison mask instead of XLA's select-and-scatter, which is slow on CPU.
  """
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class Classifier(nnx.Module):
  """CNN classifier for (B, H, W, C) images in [−1, 1].

  Args:
    num_classes: K, number of logits.
    in_channels: image channels C.
    feature_dim: width of the penultimate (feature) layer.
    channels: conv widths, one 3×3 conv per stage; a 2×2 max-pool follows every stage but the
      last, so H and W must be divisible by 2 ** (len(channels) − 1).
    input_size: image height = width (needed for the flattened Dense layer).
    group_norm: GroupNorm (up to 8 groups, statistics in f32) after each conv.
    arch: 'cnn' (one conv per stage, max-pool, flatten) | 'gap' (two convs per stage, the
      second strided, global average pooling).
    dtype: compute dtype; logits and features are returned as float32.
    param_dtype: parameter dtype.
    rngs: parameter initialisation.
  """

  def __init__(self, *, num_classes: int, in_channels: int = 1, feature_dim: int = 128,
               channels: Sequence[int] = (32, 64, 128), input_size: int = 28,
               group_norm: bool = False, arch: str = 'cnn', dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    channels = tuple(int(c) for c in channels)
    if not channels:
      raise ValueError('Classifier needs at least one conv stage (channels is empty).')
    if arch not in ARCHS:
      raise ValueError(f'Classifier: arch {arch!r} is not one of {ARCHS}.')
    downsample = 2 ** (len(channels) - 1)
    if arch == 'cnn' and input_size % downsample:
      raise ValueError(f'Classifier: input size {input_size} is not divisible by '
                       f'{downsample} (2 ** (len(channels) - 1) for channels {channels}); use '
                       'fewer stages.')
    self.num_classes = int(num_classes)
    self.in_channels = int(in_channels)
    self.feature_dim = int(feature_dim)
    self.channels = channels
    self.input_size = int(input_size)
    self.dtype = dtype
    self.arch = arch
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    convs, norms = [], []
    c_in = self.in_channels
    # (output channels, stride) of each conv: 'gap' doubles every stage, its second conv strided.
    layout = [(c, 1) for c in channels] if arch == 'cnn' else [
        (c, s) for i, c in enumerate(channels)
        for s in ((1, 2) if i < len(channels) - 1 else (1, 1))]
    for c_out, stride in layout:
      convs.append(nnx.Conv(
          c_in, c_out, (3, 3), strides=stride, padding='SAME', **kw,
          kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                  (None, None, 'conv_in', 'conv_out')),
          bias_init=partitioned(nnx.initializers.zeros_init(), ('conv_out',))))
      if group_norm:
        groups = next(g for g in (8, 4, 2, 1) if c_out % g == 0)
        norms.append(nnx.GroupNorm(
            c_out, num_groups=groups, **kw,
            scale_init=partitioned(nnx.initializers.ones_init(), ('conv_out',)),
            bias_init=partitioned(nnx.initializers.zeros_init(), ('conv_out',))))
      c_in = c_out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if group_norm else None
    side = self.input_size // downsample if arch == 'cnn' else 1  # 'gap': averaged positions
    self.feature_layer = nnx.Linear(
        side * side * channels[-1], self.feature_dim, **kw,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), ('embed', 'mlp')),
        bias_init=partitioned(nnx.initializers.zeros_init(), ('mlp',)))
    self.head = nnx.Linear(
        self.feature_dim, self.num_classes, **kw,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), ('mlp', None)),
        bias_init=partitioned(nnx.initializers.zeros_init(), (None,)))

  def features(self, x: jax.Array) -> jax.Array:
    """Penultimate activations (B, feature_dim), float32, of images x (B, H, W, C) in [−1, 1]."""
    h = x.astype(self.dtype)
    for i, conv in enumerate(self.convs):
      h = conv(h)  # (B, H_i, W_i, C_i)
      if self.norms is not None:
        h = self.norms[i](h)
      h = nnx.gelu(h)
      if self.arch == 'cnn' and i < len(self.convs) - 1:
        h = _max_pool_2x2(h)
    if self.arch == 'gap':
      h = jnp.mean(h, axis=(1, 2))  # (B, C_last)
    h = h.reshape((h.shape[0], -1))  # (B, side·side·C_last)
    return nnx.gelu(self.feature_layer(h)).astype(jnp.float32)  # (B, feature_dim)

  def logits_from_features(self, features: jax.Array) -> jax.Array:
    """The last layer alone: features (B, feature_dim) → logits (B, num_classes), float32."""
    return self.head(features.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits (B, num_classes), float32."""
    return self.logits_from_features(self.features(x))

  def features_and_logits(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both outputs from one forward pass."""
    features = self.features(x)
    return features, self.logits_from_features(features)
