"""A NumPy forward pass of pytorch-fid's FID Inception-v3, the oracle for guidedflow's network.

Written from pytorch-fid's `src/pytorch_fid/inception.py` (`fid_inception_v3`, `FIDInceptionA`,
`FIDInceptionC`, `FIDInceptionE_1`, `FIDInceptionE_2`, the pool3 block list of `InceptionV3`) and
torchvision's `torchvision/models/inception.py` (`BasicConv2d`, `InceptionB`, `InceptionD`, the
stem of `Inception3`), and deliberately *not* from `guidedflow.models.inception`: it keeps torch's
NCHW layout and OIHW kernels, computes in float64, reads the torch state dict directly (no BN
folding, no layout conversion), and writes each block's branches in pytorch-fid's order, so an
error in guidedflow's port (a swapped branch, a wrong concatenation order, the wrong pool in one
block) cannot be repeated here by construction.

Input: `(B, 3, 299, 299)` in [-1, 1], i.e. after pytorch-fid's `F.interpolate` to 299×299 and
`normalize_input` (`2 * x - 1`); `normalize_input` below maps uint8 NHWC images to that. Output:
the `(B, 2048)` pool3 features (the `AdaptiveAvgPool2d((1, 1))` of Mixed_7c, flattened).

Every block function takes `(state_dict, prefix, x)` and returns the list of branch outputs that
pytorch-fid concatenates along channels, in its order; `fid_inception_v3(..., blocks=...)` can
replace one block's function (tests use this to build deliberately wrong networks).
"""

import functools
from typing import Callable, Mapping, MutableMapping, Sequence

import numpy as np

BN_EPS = 0.001  # torchvision BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)

BlockFn = Callable[[Mapping[str, np.ndarray], str, np.ndarray], list]


# ------------------------------------------------------------------------------------ layers


def _windows(x: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
  """(B, C, H, W) → (B, C, OH, OW, kh, kw) views of every `kh×kw` window at `stride`."""
  view = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  return view[:, :, ::stride, ::stride]


def conv2d(x: np.ndarray, weight: np.ndarray, *, stride: int = 1,
           padding: tuple[int, int] = (0, 0)) -> np.ndarray:
  """torch `F.conv2d` without bias (cross-correlation), NCHW input, OIHW weight, via im2col."""
  out_channels, in_channels, kh, kw = weight.shape
  assert x.shape[1] == in_channels, (x.shape, weight.shape)
  ph, pw = padding
  x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  if kh == kw == 1 and stride == 1:
    return np.einsum('bchw,oc->bohw', x, weight[:, :, 0, 0], optimize=True)
  cols = _windows(x, kh, kw, stride)                        # (B, C, OH, OW, kh, kw)
  batch, _, oh, ow = cols.shape[:4]
  cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(batch * oh * ow, in_channels * kh * kw)
  out = cols @ weight.reshape(out_channels, -1).T           # (B·OH·OW, O)
  return out.reshape(batch, oh, ow, out_channels).transpose(0, 3, 1, 2)


def batch_norm_eval(x: np.ndarray, weight, bias, running_mean, running_var) -> np.ndarray:
  """torch `BatchNorm2d` in eval mode: per-channel (x − mean)/√(var + eps)·weight + bias."""
  def channel(v):
    return np.asarray(v, np.float64)[None, :, None, None]
  return (x - channel(running_mean)) / np.sqrt(channel(running_var) + BN_EPS) * channel(
      weight) + channel(bias)


def basic_conv2d(state_dict: Mapping[str, np.ndarray], prefix: str, x: np.ndarray, *,
                 kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> np.ndarray:
  """torchvision `BasicConv2d`: Conv2d(bias=False) → BatchNorm2d(eps=0.001) → ReLU.

  `kernel_size` is checked against the stored weight, so a state dict whose layers do not have
  torchvision's shapes fails here instead of silently running another network.
  """
  kernel_size = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
  padding = (padding,) * 2 if isinstance(padding, int) else tuple(padding)
  weight = np.asarray(state_dict[f'{prefix}.conv.weight'], np.float64)
  assert weight.shape[2:] == kernel_size, (prefix, weight.shape, kernel_size)
  y = conv2d(x, weight, stride=stride, padding=padding)
  y = batch_norm_eval(y, *(state_dict[f'{prefix}.bn.{name}']
                           for name in ('weight', 'bias', 'running_mean', 'running_var')))
  return np.maximum(y, 0.0)


def max_pool2d(x: np.ndarray, *, kernel_size: int = 3, stride: int = 2,
               padding: int = 0) -> np.ndarray:
  """torch `F.max_pool2d` (ceil_mode=False): padding is −inf, so it never wins."""
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
             constant_values=-np.inf)
  return _windows(x, kernel_size, kernel_size, stride).max(axis=(4, 5))


def avg_pool2d_3x3(x: np.ndarray, *, count_include_pad: bool) -> np.ndarray:
  """torch `F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=...)`.

  pytorch-fid's FID blocks use `count_include_pad=False` (TF's average pool: divide each window
  sum by the number of in-image pixels); torchvision's own blocks use the default `True` (÷ 9).
  """
  padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  sums = _windows(padded, 3, 3, 1).sum(axis=(4, 5))
  if count_include_pad:
    return sums / 9.0
  inside = np.pad(np.ones(x.shape[2:]), 1)                  # 1 on image pixels, 0 on padding
  counts = np.lib.stride_tricks.sliding_window_view(inside, (3, 3)).sum(axis=(2, 3))
  return sums / counts


fid_avg_pool = functools.partial(avg_pool2d_3x3, count_include_pad=False)
torchvision_avg_pool = functools.partial(avg_pool2d_3x3, count_include_pad=True)


def fid_e2_max_pool(x: np.ndarray) -> np.ndarray:
  """FIDInceptionE_2's pool branch: `F.max_pool2d(x, kernel_size=3, stride=1, padding=1)`."""
  return max_pool2d(x, kernel_size=3, stride=1, padding=1)


# ------------------------------------------------------------------------------------ blocks


def fid_inception_a(sd, prefix, x, *, pool=fid_avg_pool) -> list:
  """FIDInceptionA (Mixed_5b/c/d): [branch1x1, branch5x5, branch3x3dbl, branch_pool]."""
  conv = functools.partial(basic_conv2d, sd)
  branch1x1 = conv(f'{prefix}.branch1x1', x, kernel_size=1)
  branch5x5 = conv(f'{prefix}.branch5x5_1', x, kernel_size=1)
  branch5x5 = conv(f'{prefix}.branch5x5_2', branch5x5, kernel_size=5, padding=2)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_1', x, kernel_size=1)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_2', branch3x3dbl, kernel_size=3, padding=1)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_3', branch3x3dbl, kernel_size=3, padding=1)
  branch_pool = conv(f'{prefix}.branch_pool', pool(x), kernel_size=1)
  return [branch1x1, branch5x5, branch3x3dbl, branch_pool]


def inception_b(sd, prefix, x) -> list:
  """torchvision InceptionB (Mixed_6a): [branch3x3, branch3x3dbl, max_pool2d(3, stride 2)]."""
  conv = functools.partial(basic_conv2d, sd)
  branch3x3 = conv(f'{prefix}.branch3x3', x, kernel_size=3, stride=2)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_1', x, kernel_size=1)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_2', branch3x3dbl, kernel_size=3, padding=1)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_3', branch3x3dbl, kernel_size=3, stride=2)
  branch_pool = max_pool2d(x, kernel_size=3, stride=2)
  return [branch3x3, branch3x3dbl, branch_pool]


def fid_inception_c(sd, prefix, x, *, pool=fid_avg_pool) -> list:
  """FIDInceptionC (Mixed_6b–e): [branch1x1, branch7x7, branch7x7dbl, branch_pool]."""
  conv = functools.partial(basic_conv2d, sd)
  branch1x1 = conv(f'{prefix}.branch1x1', x, kernel_size=1)
  branch7x7 = conv(f'{prefix}.branch7x7_1', x, kernel_size=1)
  branch7x7 = conv(f'{prefix}.branch7x7_2', branch7x7, kernel_size=(1, 7), padding=(0, 3))
  branch7x7 = conv(f'{prefix}.branch7x7_3', branch7x7, kernel_size=(7, 1), padding=(3, 0))
  branch7x7dbl = conv(f'{prefix}.branch7x7dbl_1', x, kernel_size=1)
  branch7x7dbl = conv(f'{prefix}.branch7x7dbl_2', branch7x7dbl, kernel_size=(7, 1),
                      padding=(3, 0))
  branch7x7dbl = conv(f'{prefix}.branch7x7dbl_3', branch7x7dbl, kernel_size=(1, 7),
                      padding=(0, 3))
  branch7x7dbl = conv(f'{prefix}.branch7x7dbl_4', branch7x7dbl, kernel_size=(7, 1),
                      padding=(3, 0))
  branch7x7dbl = conv(f'{prefix}.branch7x7dbl_5', branch7x7dbl, kernel_size=(1, 7),
                      padding=(0, 3))
  branch_pool = conv(f'{prefix}.branch_pool', pool(x), kernel_size=1)
  return [branch1x1, branch7x7, branch7x7dbl, branch_pool]


def inception_d(sd, prefix, x) -> list:
  """torchvision InceptionD (Mixed_7a): [branch3x3, branch7x7x3, max_pool2d(3, stride 2)]."""
  conv = functools.partial(basic_conv2d, sd)
  branch3x3 = conv(f'{prefix}.branch3x3_1', x, kernel_size=1)
  branch3x3 = conv(f'{prefix}.branch3x3_2', branch3x3, kernel_size=3, stride=2)
  branch7x7x3 = conv(f'{prefix}.branch7x7x3_1', x, kernel_size=1)
  branch7x7x3 = conv(f'{prefix}.branch7x7x3_2', branch7x7x3, kernel_size=(1, 7), padding=(0, 3))
  branch7x7x3 = conv(f'{prefix}.branch7x7x3_3', branch7x7x3, kernel_size=(7, 1), padding=(3, 0))
  branch7x7x3 = conv(f'{prefix}.branch7x7x3_4', branch7x7x3, kernel_size=3, stride=2)
  branch_pool = max_pool2d(x, kernel_size=3, stride=2)
  return [branch3x3, branch7x7x3, branch_pool]


def fid_inception_e(sd, prefix, x, *, pool) -> list:
  """FIDInceptionE_1 (`pool=fid_avg_pool`, Mixed_7b) / _2 (`pool=fid_e2_max_pool`, Mixed_7c).

  Returns [branch1x1, cat(branch3x3_2a, branch3x3_2b), cat(branch3x3dbl_3a, branch3x3dbl_3b),
  branch_pool], the inner concatenations done as in pytorch-fid.
  """
  conv = functools.partial(basic_conv2d, sd)
  branch1x1 = conv(f'{prefix}.branch1x1', x, kernel_size=1)
  branch3x3 = conv(f'{prefix}.branch3x3_1', x, kernel_size=1)
  branch3x3 = np.concatenate([
      conv(f'{prefix}.branch3x3_2a', branch3x3, kernel_size=(1, 3), padding=(0, 1)),
      conv(f'{prefix}.branch3x3_2b', branch3x3, kernel_size=(3, 1), padding=(1, 0)),
  ], axis=1)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_1', x, kernel_size=1)
  branch3x3dbl = conv(f'{prefix}.branch3x3dbl_2', branch3x3dbl, kernel_size=3, padding=1)
  branch3x3dbl = np.concatenate([
      conv(f'{prefix}.branch3x3dbl_3a', branch3x3dbl, kernel_size=(1, 3), padding=(0, 1)),
      conv(f'{prefix}.branch3x3dbl_3b', branch3x3dbl, kernel_size=(3, 1), padding=(1, 0)),
  ], axis=1)
  branch_pool = conv(f'{prefix}.branch_pool', pool(x), kernel_size=1)
  return [branch1x1, branch3x3, branch3x3dbl, branch_pool]


# pytorch-fid's `fid_inception_v3()` after its patches, in forward order (torchvision's
# `Inception3._forward` from Mixed_5b to Mixed_7c).
BLOCKS: dict[str, BlockFn] = {
    'Mixed_5b': fid_inception_a,
    'Mixed_5c': fid_inception_a,
    'Mixed_5d': fid_inception_a,
    'Mixed_6a': inception_b,
    'Mixed_6b': fid_inception_c,
    'Mixed_6c': fid_inception_c,
    'Mixed_6d': fid_inception_c,
    'Mixed_6e': fid_inception_c,
    'Mixed_7a': inception_d,
    'Mixed_7b': functools.partial(fid_inception_e, pool=fid_avg_pool),
    'Mixed_7c': functools.partial(fid_inception_e, pool=fid_e2_max_pool),
}


# ------------------------------------------------------------------------------------ network


def normalize_input(images: np.ndarray) -> np.ndarray:
  """uint8 NHWC 299×299 images → float64 NCHW in [-1, 1], as pytorch-fid feeds its network.

  pytorch-fid's data loader gives `ToTensor()` images (uint8 / 255, NCHW) and `InceptionV3`
  applies `2 * x - 1` (`normalize_input=True`); at 299×299 its bilinear resize is the identity.
  """
  assert images.dtype == np.uint8 and images.shape[1:] == (299, 299, 3), images.shape
  return 2.0 * (images.transpose(0, 3, 1, 2).astype(np.float64) / 255.0) - 1.0


def stem(sd: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """pytorch-fid's blocks 0 and 1: Conv2d_1a_3x3 … Conv2d_4a_3x3 with two 3×3/2 max pools."""
  x = basic_conv2d(sd, 'Conv2d_1a_3x3', x, kernel_size=3, stride=2)    # 32 × 149 × 149
  x = basic_conv2d(sd, 'Conv2d_2a_3x3', x, kernel_size=3)              # 32 × 147 × 147
  x = basic_conv2d(sd, 'Conv2d_2b_3x3', x, kernel_size=3, padding=1)   # 64 × 147 × 147
  x = max_pool2d(x, kernel_size=3, stride=2)                           # 64 × 73 × 73
  x = basic_conv2d(sd, 'Conv2d_3b_1x1', x, kernel_size=1)              # 80 × 73 × 73
  x = basic_conv2d(sd, 'Conv2d_4a_3x3', x, kernel_size=3)              # 192 × 71 × 71
  return max_pool2d(x, kernel_size=3, stride=2)                        # 192 × 35 × 35


def run_blocks(sd: Mapping[str, np.ndarray], x: np.ndarray, names: Sequence[str], *,
               blocks: Mapping[str, BlockFn] | None = None,
               trace: MutableMapping[str, list] | None = None) -> np.ndarray:
  """Runs the Mixed blocks `names` (consecutive, in order) on NCHW `x`.

  `blocks` replaces the function of some blocks; `trace[name]` receives each block's list of
  branch outputs (before concatenation).
  """
  functions = {**BLOCKS, **(blocks or {})}
  for name in names:
    branches = functions[name](sd, name, x)
    if trace is not None:
      trace[name] = branches
    x = np.concatenate(branches, axis=1)
  return x


def pool3(x: np.ndarray) -> np.ndarray:
  """`nn.AdaptiveAvgPool2d(output_size=(1, 1))` then flatten: (B, 2048, 8, 8) → (B, 2048)."""
  return x.mean(axis=(2, 3))


def fid_inception_v3(sd: Mapping[str, np.ndarray], x: np.ndarray, *,
                     blocks: Mapping[str, BlockFn] | None = None,
                     trace: MutableMapping[str, list] | None = None) -> np.ndarray:
  """pytorch-fid `InceptionV3(output_blocks=[3])` on NCHW `x` in [-1, 1] → (B, 2048) float64.

  `trace`, if given, receives `trace['stem'] = [stem output]` and each block's branch outputs
  (see `run_blocks`), so a block's input is the concatenation of the previous entry.
  """
  assert x.ndim == 4 and x.shape[1] == 3, x.shape
  x = stem(sd, np.asarray(x, np.float64))
  if trace is not None:
    trace['stem'] = [x]
  x = run_blocks(sd, x, list(BLOCKS), blocks=blocks, trace=trace)
  assert x.shape[1:] == (2048, 8, 8), x.shape
  return pool3(x)
