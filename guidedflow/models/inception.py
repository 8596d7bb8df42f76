"""Inception-v3 pool3 features for FID (the TF/pytorch-fid "FID Inception"), in flax.nnx.

This is the network that TensorFlow's original FID code and pytorch-fid use, not torchvision's
ImageNet Inception-v3: the same layers, but the TF graph's quirks (pytorch-fid's
`FIDInceptionA/C/E_1/E_2`): the pool branches of the 35×35, 17×17 and first 8×8 blocks average
without counting the zero padding (TF's 'SAME' average pool), and the last block (Mixed_7c)
max-pools in its pool branch. BatchNorm (eps 1e-3) is inference only: the stored mean/var are
folded into one affine per channel. Input NHWC in [-1, 1] at 299×299; output the 2048-d pool3
features (global average of the last block). Parameters: 21,785,568 (conv kernels + BN
scale/bias; mean/var are `nnx.BatchStat`) — torchvision's documented 27,161,264 for Inception3
minus its aux classifier (3,326,696) and 1000-way fc (2,049,000).

Weights: pytorch-fid's port of TF's `inception-2015-12-05` graph, the de-facto standard file
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  (sha256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2, ~91 MiB).
Point the config key `eval.inception_weights` at it (`--config.eval.inception_weights=PATH`).
Without the official file the features are valid but FIDs are not comparable with published ones;
`InceptionFeatures.meta['official_weights']` says which case holds.

File format: a `torch.save`d state dict (zip or legacy layout), read and written *without torch*
by `torch_weights`, whose restricted unpickler cannot run code from the file. `save_weights`
writes the same format (tests use it with `init_state_dict`'s random weights).

Name mapping (torch state dict → nnx): module paths are the same (`Mixed_5b.branch1x1`, ...);
`X.conv.weight` (O, I, H, W) → `X.conv.kernel` (H, W, I, O); `X.bn.weight/bias/running_mean/
running_var` → `X.bn.scale/bias/mean/var`. `fc.*` (1008 classes) and `*.num_batches_tracked` are
not used (pool3 only) and may be absent.
"""

import functools
import hashlib
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow import images as images_lib
from guidedflow.models import torch_weights

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
FID_WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
WEIGHTS_CONFIG_KEY = 'eval.inception_weights'
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax size; `fc` is in the file but not used here
BN_EPSILON = 1e-3
PARAM_COUNT = 21_785_568


class InceptionWeightsNotFoundError(errors.UserError, FileNotFoundError):
  """The FID Inception weights file is not where the config says."""


# ----------------------------------------------------------------------------------------------
# Network.


class FrozenBatchNorm(nnx.Module):
  """Inference BatchNorm: `scale·(x − mean)/√(var + eps) + bias`, applied as one affine in f32."""

  def __init__(self, num_features: int, *, param_dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
    self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    multiplier = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(
        self.var[...].astype(jnp.float32) + BN_EPSILON)
    shift = self.bias[...].astype(jnp.float32) - self.mean[...].astype(jnp.float32) * multiplier
    return (x.astype(jnp.float32) * multiplier + shift).astype(x.dtype)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nnx.Module):
  """Conv without bias → frozen BatchNorm → ReLU (torchvision's `BasicConv2d`)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int | tuple[int, int], *,
               strides: int = 1, padding: int | tuple[int, int] = 0, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST):
    pad_h, pad_w = _pair(padding)
    self.conv = nnx.Conv(
        in_features, out_features, _pair(kernel_size), strides=strides,
        padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, dtype=dtype,
        param_dtype=param_dtype, precision=precision,
        kernel_init=nnx.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal'),
        rngs=rngs)
    self.bn = FrozenBatchNorm(out_features, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, *, window: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
  """Max pool over H, W of NHWC `x`; padded positions never win (torch `max_pool2d`)."""
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
                               (1, window, window, 1), (1, stride, stride, 1), pads)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """3×3 stride-1 'same' average pool that divides by the number of in-image pixels.

  This is TF's average pool (torch `count_include_pad=False`); torchvision's Inception counts the
  zero padding, which is one of the differences pytorch-fid patches out.
  """
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  sums = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                               pads)

  def counts(n):  # in-image window size per position, a static numpy vector
    i = np.arange(n)
    return np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1

  count = np.outer(counts(x.shape[1]), counts(x.shape[2])).astype(np.float32)
  return sums / jnp.asarray(count, x.dtype)[None, :, :, None]


class InceptionA(nnx.Module):
  """35×35 block (Mixed_5b/c/d): 64 + 64 + 96 + `pool_features` channels out."""

  def __init__(self, in_features: int, pool_features: int, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any, precision: jax.lax.PrecisionLike):
    conv = functools.partial(ConvBN, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             precision=precision)
    self.branch1x1 = conv(in_features, 64, 1)
    self.branch5x5_1 = conv(in_features, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(in_features, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(in_features, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
  """35×35 → 17×17 reduction (Mixed_6a): 384 + 96 + `in_features` channels out."""

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any,
               precision: jax.lax.PrecisionLike):
    conv = functools.partial(ConvBN, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             precision=precision)
    self.branch3x3 = conv(in_features, 384, 3, strides=2)
    self.branch3x3dbl_1 = conv(in_features, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, strides=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), branch3x3dbl, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
  """17×17 block with factorised 7×7 convolutions (Mixed_6b–e): 4 × 192 channels out."""

  def __init__(self, in_features: int, channels_7x7: int, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any, precision: jax.lax.PrecisionLike):
    conv = functools.partial(ConvBN, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             precision=precision)
    c7 = channels_7x7
    self.branch1x1 = conv(in_features, 192, 1)
    self.branch7x7_1 = conv(in_features, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_features, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_features, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl)
    branch_pool = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
  """17×17 → 8×8 reduction (Mixed_7a): 320 + 192 + `in_features` channels out."""

  def __init__(self, in_features: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any,
               precision: jax.lax.PrecisionLike):
    conv = functools.partial(ConvBN, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             precision=precision)
    self.branch3x3_1 = conv(in_features, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, strides=2)
    self.branch7x7x3_1 = conv(in_features, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, strides=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """8×8 block with split 1×3/3×1 outputs (Mixed_7b/c): 2048 channels out.

  `pool='avg'` for Mixed_7b; `pool='max'` for Mixed_7c, where the FID graph max-pools (pytorch-fid
  `FIDInceptionE_2`; the paper and torchvision average).
  """

  def __init__(self, in_features: int, *, pool: str, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any, precision: jax.lax.PrecisionLike):
    if pool not in ('avg', 'max'):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}.")
    conv = functools.partial(ConvBN, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             precision=precision)
    self.pool = pool
    self.branch1x1 = conv(in_features, 320, 1)
    self.branch3x3_1 = conv(in_features, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_features, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_features, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_1(x)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    if self.pool == 'max':
      pooled = max_pool(x, stride=1, padding=1)
    else:
      pooled = avg_pool_3x3_exclude_pad(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
        self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
        self.branch_pool(pooled),
    ], axis=-1)


class InceptionV3(nnx.Module):
  """FID Inception-v3 up to pool3: `(B, 299, 299, 3)` in [-1, 1] → `(B, 2048)` float32.

  Attribute names are the torch module names, so a state-dict key is a path in this module.
  The network is fully convolutional (it runs on any size ≥ 75), but FID features are only
  standard at 299×299. `precision` defaults to HIGHEST so that accelerators do not silently run
  the f32 convolutions in bf16/TF32 and shift the features.
  """

  def __init__(self, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, strides=2, **kw)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, pool='avg', **kw)
    self.Mixed_7c = InceptionE(2048, pool='max', **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)                                  # (B, 299, 299, 3)
    x = self.Conv2d_1a_3x3(x)                                 # (B, 149, 149, 32)
    x = self.Conv2d_2a_3x3(x)                                 # (B, 147, 147, 32)
    x = self.Conv2d_2b_3x3(x)                                 # (B, 147, 147, 64)
    x = max_pool(x)                                           # (B, 73, 73, 64)
    x = self.Conv2d_3b_1x1(x)                                 # (B, 73, 73, 80)
    x = self.Conv2d_4a_3x3(x)                                 # (B, 71, 71, 192)
    x = max_pool(x)                                           # (B, 35, 35, 192)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
      x = block(x)                                            # (B, 35, 35, 256 | 288 | 288)
    x = self.Mixed_6a(x)                                      # (B, 17, 17, 768)
    for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
      x = block(x)                                            # (B, 17, 17, 768)
    x = self.Mixed_7a(x)                                      # (B, 8, 8, 1280)
    x = self.Mixed_7c(self.Mixed_7b(x))                       # (B, 8, 8, 2048)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))       # (B, 2048)


# ----------------------------------------------------------------------------------------------
# torch state dict ↔ nnx variables.

_BN_NAMES = (('weight', 'scale'), ('bias', 'bias'), ('running_mean', 'mean'),
             ('running_var', 'var'))


def torch_variables(model: InceptionV3) -> dict[str, nnx.Variable]:
  """Maps each state-dict key that the network uses to its nnx variable, in network order.

  Conv kernels are stored HWIO here and OIHW in the file (see `_to_torch_shape`).
  """
  table = {}
  layers = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, ConvBN)]
  # Sorted paths follow the network's block order (Conv2d_1a < ... < Conv2d_4a < Mixed_5b < ...
  # < Mixed_7c), so the first missing tensor reported is the earliest one in the network.
  for path, layer in sorted(layers, key=lambda item: tuple(map(str, item[0]))):
    prefix = '.'.join(map(str, path))
    table[f'{prefix}.conv.weight'] = layer.conv.kernel
    for torch_name, attr in _BN_NAMES:
      table[f'{prefix}.bn.{torch_name}'] = getattr(layer.bn, attr)
  return table


def _to_torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if name.endswith('.conv.weight'):
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  return tuple(shape)


def _abstract_model() -> InceptionV3:
  return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Names and torch-layout shapes of every tensor in the pytorch-fid weights file."""
  shapes = {}
  for name, variable in torch_variables(_abstract_model()).items():
    shapes[name] = _to_torch_shape(name, variable.get_value().shape)
    if name.endswith('.bn.running_var'):
      shapes[name.replace('running_var', 'num_batches_tracked')] = ()
  shapes['fc.weight'] = (NUM_CLASSES, FEATURE_DIM)
  shapes['fc.bias'] = (NUM_CLASSES,)
  return shapes


def init_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights with the names, shapes and dtypes of the real file (for tests).

  He-scaled kernels and BN statistics near (0, 1) keep activations O(1) through all 94 layers,
  so features of the random network are finite and not all zero.
  """
  rng = np.random.default_rng(seed)
  state_dict = {}
  for name, shape in state_dict_shapes().items():
    if name.endswith('num_batches_tracked'):
      value = np.array(0, np.int64)
    elif name.endswith('.conv.weight'):
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif name.endswith(('.bn.weight', '.bn.running_var')):
      value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif name == 'fc.weight':
      value = 0.01 * rng.standard_normal(shape, dtype=np.float32)
    else:  # bn.bias, bn.running_mean, fc.bias
      value = 0.1 * rng.standard_normal(shape, dtype=np.float32)
    state_dict[name] = value
  return state_dict


def _is_floating(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or dtype == np.dtype(jnp.bfloat16)


def load_state_dict(model: InceptionV3, state_dict: Mapping[str, np.ndarray], *,
                    source: str = 'state dict') -> list[str]:
  """Copies torch-layout tensors into `model` (in place); returns the unused keys.

  Raises:
    ValueError: on the first missing or mis-shaped tensor (with its expected shape), or if the
      file is torchvision's ImageNet Inception (it has an aux classifier; the FID net has not).
  """
  if any(key.startswith('AuxLogits.') for key in state_dict):
    raise ValueError(
        f'{source} holds torchvision\'s ImageNet Inception-v3 (it has AuxLogits.*), not the FID '
        f'Inception weights; download {FID_WEIGHTS_URL}')
  variables = torch_variables(model)
  for name, variable in variables.items():
    current = variable.get_value()
    expected = _to_torch_shape(name, current.shape)
    if name not in state_dict:
      raise ValueError(f"{source} is missing tensor '{name}' (expected shape {expected}); "
                       f'is it the FID Inception weights file {FID_WEIGHTS_URL}?')
    value = np.asarray(state_dict[name])
    if value.shape != expected or not _is_floating(value.dtype):
      raise ValueError(f"{source}: tensor '{name}' has shape {value.shape} and dtype "
                       f'{value.dtype}; expected shape {expected}, floating point.')
    if name.endswith('.conv.weight'):
      value = value.transpose(2, 3, 1, 0)  # OIHW → HWIO
    variable.set_value(jnp.asarray(value, dtype=current.dtype))
  return sorted(set(state_dict) - set(variables))


# ----------------------------------------------------------------------------------------------
# Weight files (the `.pth` format itself lives in `torch_weights`).


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict (zip or legacy format) as numpy arrays, without torch."""
  return torch_weights.read_state_dict(path)


def save_weights(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                 legacy_format: bool = False) -> None:
  """Writes `state_dict` as `torch.save(state_dict, path)` would, without torch.

  The default is torch ≥ 1.6's zip archive; `legacy_format=True` writes the pre-1.6
  single-stream format instead (see `torch_weights.save_state_dict`).
  """
  torch_weights.save_state_dict(state_dict, path, legacy_format=legacy_format)


# ----------------------------------------------------------------------------------------------
# Feature extractor for evaluation.


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 NHWC (1 or 3 channels, any size) → float32 (N, 299, 299, 3) in [-1, 1].

  Bilinear with half-pixel centres and no antialiasing, as pytorch-fid's `F.interpolate(...,
  mode='bilinear', align_corners=False)`; grayscale is repeated to 3 channels.
  """
  x = images_lib.to_model(images)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), 'bilinear', antialias=False)
  return x


def load_model(path: str | os.PathLike | None, *, batch_size: int = 50,
               dtype: Any = jnp.float32) -> tuple[InceptionV3, dict[str, Any]]:
  """The FID Inception with the pytorch-fid weights file at `path`, and facts about the file.

  `guidedflow.feature_networks.load_inception` wraps it as a feature network (`batch_size`
  is recorded in the facts).

  Raises:
    InceptionWeightsNotFoundError (a FileNotFoundError): no file at `path`; the message says
      where to download it and which config key to set.
    ValueError: the file is not a torch state dict, or a tensor is missing or mis-shaped.
  """
  if not path or not os.path.isfile(path):
    raise InceptionWeightsNotFoundError(
        f'FID Inception-v3 weights not found at {path!r}. Download {FID_WEIGHTS_URL} '
        f'(sha256 {FID_WEIGHTS_SHA256[:16]}…) and set the config key `{WEIGHTS_CONFIG_KEY}` to '
        f'its path, e.g. --config.{WEIGHTS_CONFIG_KEY}=/data/pt_inception-2015-12-05-6726825d.pth')
  path = os.fspath(path)
  state_dict = read_weights(path)
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), dtype=dtype))
  unused = load_state_dict(model, state_dict, source=path)
  sha256 = _sha256(path)
  meta = dict(
      weights_path=path, weights_sha256=sha256, official_weights=sha256 == FID_WEIGHTS_SHA256,
      weights_url=FID_WEIGHTS_URL, feature_layer='pool3', feature_dim=FEATURE_DIM,
      input_size=INPUT_SIZE, resize='bilinear, half-pixel, no antialias (pytorch-fid)',
      batch_size=batch_size, dtype=jnp.dtype(dtype).name,
      unused_tensors=[k for k in unused if not k.endswith('num_batches_tracked')])
  return model, meta
