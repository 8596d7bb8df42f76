"""DiT (Peebles & Xie, 2023) with adaLN-Zero conditioning on time and class label, in flax.nnx.

The network maps `(x, t, y)` → a prediction with the shape of `x` (velocity, score or noise,
whichever the loss asks for). Conventions (DESIGN.md §1): `t ∈ [0, 1]` with `t = 1` data (DiT
and SiT use the opposite direction; the network does not care, it only sees `t`); labels
`y ∈ {0..K−1}` and the null label `∅ = K`, an extra row of the label table.

Precision: matmuls take `dtype` operands (bf16 on accelerators and on CPUs with bf16 units) and
accumulate in f32, in the forward and the backward pass (`models/precision.py`); the residual stream, LayerNorm
statistics, the adaLN modulation and the attention softmax stay in float32, and the output is
float32 whatever `dtype` is, so the loss is computed in f32.

Blocks are stacked and run by one `nnx.scan` by default (`scan_blocks=True`): every block
parameter has a leading axis of size depth, named 'layers', and XLA compiles one block instead
of depth copies, so compile time does not grow with depth. `scan_blocks=False` keeps one module
per block (`blocks[i]`), the layout of checkpoints written before scanning; `stack_blocks` and
`unstack_blocks` convert parameters between the two layouts.

`unroll_blocks` unrolls that scan ('auto': fully on a CPU, not elsewhere): the parameters keep
their stacked layout, the compiled program has one copy of the block per unrolled step. A fully
unrolled scan stacks no residuals: on a 2-core CPU the scanned train step kept each block's
residuals in depth-stacked buffers, zero-filled, written and read back with dynamic slices,
and unrolled it trains DiT-S/2 and DiT-T/4 1.03–1.15× faster (benchmarks/README.md).

Rematerialisation is a policy (`remat`, see `REMAT_POLICIES`): 'none', 'full' (keep only each
block's input, recompute the rest in the backward pass) or 'dots_with_no_batch_dims_saveable'
(keep the outputs of the weight matmuls, recompute attention scores, norms and activations).

Logical axis names on parameters (mapped to mesh axes by `guidedflow.sharding`):
'layers' (the stacked-block axis, replicated), 'embed' (model width), 'mlp' (MLP hidden,
time-MLP hidden), 'heads' (fused heads × head_dim of q/k/v and of the attention output
projection's input), 'modulation' (the adaLN 6·width / 2·width outputs), 'patch' (p·p·C patch
features), 'classes' (label-table rows), None (small dims). Activations are pinned to the
batch split ('data' × 'fsdp'), heads and MLP hidden to 'tensor' (`layers.constrain`), so that
under FSDP XLA gathers weights and reduce-scatters gradients instead of sharding activations
like the weights (benchmarks/sharding_review.py).
"""

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow.models import attention, fused, precision
from guidedflow.models.layers import (LAYER_AXIS, UNCONSTRAINED, as_hw, constrain, partitioned,
                                      sincos_2d_position_embedding, timestep_embedding)

# Width / depth / heads of each size; the patch size is written after a slash: 'XL/2', 'S/4'.
# S, B, L, XL are the DiT paper's; T is a CPU-sized model for 28×28 Fashion-MNIST (use T/4 —
# 49 tokens — or T/2 — 196 tokens, ~4× the cost), XS a narrower one (XS/1 on the 7×7 latents
# of configs/fashion_mnist_latent.py); 'test' is for unit tests only.
VARIANTS = {
    'test': dict(width=32, depth=1, num_heads=2),
    'XS': dict(width=192, depth=6, num_heads=3),
    'T': dict(width=256, depth=6, num_heads=4),
    'S': dict(width=384, depth=12, num_heads=6),
    'B': dict(width=768, depth=12, num_heads=12),
    'L': dict(width=1024, depth=24, num_heads=16),
    'XL': dict(width=1152, depth=28, num_heads=16),
}
STANDARD_PATCH_SIZES = (2, 4, 8)
TIME_FREQUENCY_DIM = 256  # sinusoid size fed to the time MLP (as in DiT)
TIME_SCALE = 1000.0       # t ∈ [0, 1] is scaled by this before the sinusoid (see timestep_embedding)
# What the backward pass keeps of each block (`jax.checkpoint` policies): 'none' (no remat),
# 'full' (only the block input), 'dots_with_no_batch_dims_saveable' (the weight matmuls' outputs).
REMAT_POLICIES = ('none', 'full', 'dots_with_no_batch_dims_saveable')
# 'einsum' (the default; the name predates its backward pass): `attention.qkv_attention`,
# batched matmuls with f32 logits and softmax and a hand-written backward pass that keeps only
# q, k, v and the probabilities (on a 2-core CPU, DiT-S/2 attention fwd+bwd 1.35× faster than
# JAX's derivative of two einsums; benchmarks/README.md); 'xla': `jax.nn.dot_product_attention`
# (XLA); 'cudnn': its cuDNN flash attention (GPU, bf16); 'auto': 'cudnn' where it runs (an
# NVIDIA GPU from Ampere on, bf16 / f16 compute, a head dimension its kernels take), else 'einsum'. On an H200,
# cuDNN trains DiT-S/2 1.30× faster than 'einsum' at batch 256, and DiT-XL/2 at batch 256 fits
# only with it (benchmarks/README.md, GPU).
ATTENTION_IMPLS = ('auto', 'einsum', 'xla', 'cudnn')
# How many scanned blocks one iteration of the scan runs (`resolve_unroll_blocks`): 'auto' (all of
# them on a CPU, one elsewhere) or a positive int.
UNROLL_AUTO = 'auto'
_SCAN_METADATA = {nnx.PARTITION_NAME: LAYER_AXIS}


def resolve_attention_impl(impl: str, dtype, head_dim: int, backend: str | None = None,
                           capability: tuple[int, ...] | None = None) -> str:
  """The attention implementation that `impl` names: 'auto' → 'cudnn' on an NVIDIA GPU of
  compute capability ≥ 8.0 (cuDNN's flash attention: Ampere and later) computing in bf16 / f16
  with a head dimension its kernels take (a multiple of 8, ≤ 128), else 'einsum'; any other
  name is itself. `backend` / `capability`: the running JAX's when `backend` is None.
  """
  if impl != 'auto':
    return impl
  if backend is None:
    backend = jax.default_backend()
    capability = _cuda_capability() if backend == 'gpu' else None
  if (backend in ('gpu', 'cuda') and capability is not None and capability >= (8, 0)
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return 'cudnn'
  return 'einsum'


def _cuda_capability() -> tuple[int, ...] | None:
  """The first GPU's CUDA compute capability, e.g. (9, 0); None without an NVIDIA GPU."""
  try:
    device = jax.local_devices(backend='gpu')[0]
    return tuple(int(part) for part in device.compute_capability.split('.'))
  except (RuntimeError, AttributeError, ValueError, IndexError):  # no GPU, or not CUDA (ROCm)
    return None


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Resolved architecture of one DiT instance."""
  width: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: float
  input_size: tuple[int, int]
  in_channels: int
  num_classes: int

  @property
  def grid(self) -> tuple[int, int]:
    return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.in_channels


def resolve_config(variant: str = 'S/2', *, input_size: int | Sequence[int], in_channels: int,
                   num_classes: int, width: int | None = None, depth: int | None = None,
                   num_heads: int | None = None, patch_size: int | None = None,
                   mlp_ratio: float | None = None) -> DiTConfig:
  """Parses `variant` ('S/2', 'T/4', 'test/7'), applies overrides and checks the shapes."""
  match = re.fullmatch(r'(\w+?)(?:/(\d+))?', variant)
  if match is None or match.group(1) not in VARIANTS:
    raise ValueError(f"Unknown DiT variant {variant!r}; expected NAME or NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)} (e.g. 'S/2', 'XL/2', 'T/4').")
  name = match.group(1)
  sizes = dict(VARIANTS[name])
  if match.group(2) is not None:
    sizes['patch_size'] = int(match.group(2))
  overrides = dict(width=width, depth=depth, num_heads=num_heads, patch_size=patch_size,
                   mlp_ratio=mlp_ratio)
  sizes.update({k: v for k, v in overrides.items() if v is not None})
  sizes.setdefault('mlp_ratio', 4.0)
  if 'patch_size' not in sizes:
    raise ValueError(f"DiT variant {variant!r} has no patch size: write '{name}/2' or pass "
                     'patch_size=...')
  config = DiTConfig(input_size=as_hw(input_size), in_channels=int(in_channels),
                     num_classes=int(num_classes), **sizes)

  h, w = config.input_size
  p = config.patch_size
  if p < 1 or h % p or w % p:
    fits = [q for q in range(1, min(h, w) + 1) if h % q == 0 and w % q == 0 and q > 1]
    standard = [q for q in STANDARD_PATCH_SIZES if q in fits]
    hint = (f"; e.g. variant '{name}/{(standard or fits)[0]}'" if (standard or fits) else '')
    raise ValueError(f'DiT input size {h}×{w} is not divisible by patch size {p} (variant '
                     f'{variant!r}). Patch sizes that divide {h}×{w}: {fits or "none > 1"}{hint}.')
  if config.width % config.num_heads:
    raise ValueError(f'DiT width {config.width} is not divisible by num_heads {config.num_heads}.')
  if config.width % 4:
    raise ValueError(f'DiT width must be divisible by 4 (2-D sin-cos embedding), got '
                     f'{config.width}.')
  return config


def dense(d_in: int, d_out: int, names: tuple, *, dtype, param_dtype, rngs: nnx.Rngs,
          kernel_init=nnx.initializers.xavier_uniform(), zero: bool = False) -> nnx.Linear:
  """nnx.Linear with logical names on kernel and bias; `zero` zero-initialises both."""
  kernel_init = nnx.initializers.zeros_init() if zero else kernel_init
  # bf16 compute: bf16 operands, f32 accumulation and output, bf16 gradient dots (precision.py).
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    dot_general=precision.mixed_dot_general,
                    kernel_init=partitioned(kernel_init, names),
                    bias_init=partitioned(nnx.initializers.zeros_init(), names[1:]))


class Attention(nnx.Module):
  """Multi-head self-attention; logits and softmax in f32 whatever the compute dtype."""

  def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               impl: str = 'einsum'):
    self.num_heads = num_heads
    self.dtype = dtype
    self.impl = impl
    # Fused q/k/v laid out as (heads, 3, head_dim) along the output so that splitting the output
    # over a 'tensor' mesh axis keeps whole heads (q, k and v of a head) on one device.
    self.qkv = dense(width, 3 * width, ('embed', 'heads'), dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.proj = dense(width, width, ('heads', 'embed'), dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)

  def __call__(self, x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Attention of the modulated LayerNorm of the residual stream x (B, N, D) → f32 (B, N, D)."""
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = fused.norm_modulate_dense(x, shift, scale, *fused.linear_weights(self.qkv))
    qkv = qkv.astype(self.dtype)
    qkv = qkv.reshape(batch, tokens, self.num_heads, 3, head_dim)           # (B, N, H, 3, Dh)
    qkv = constrain(qkv, 'batch', None, 'heads', None, None)
    if self.impl == 'einsum':  # f32 logits and softmax inside
      out = attention.qkv_attention(qkv, 1.0 / math.sqrt(head_dim)).astype(self.dtype)
    else:  # f32 logits (scaled in f32) and softmax, probabilities cast to the compute dtype.
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]            # (B, N, H, Dh)
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
    out = constrain(out, 'batch', None, 'heads', None)
    return self.proj(out.reshape(batch, tokens, width)).astype(jnp.float32)


class DiTBlock(nnx.Module):
  """Transformer block with adaLN-Zero: shift/scale before, gate after attention and MLP."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype, param_dtype,
               rngs: nnx.Rngs, attention_impl: str = 'einsum'):
    self.dtype = dtype
    self.attn = Attention(width, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          impl=attention_impl)
    self.fc1 = dense(width, mlp_dim, ('embed', 'mlp'), dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.fc2 = dense(mlp_dim, width, ('mlp', 'embed'), dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    # adaLN-Zero: zero modulation makes every block the identity at initialisation.
    self.modulation = dense(width, 6 * width, ('embed', 'modulation'), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs, zero=True)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    # x: (B, N, D) float32 residual stream; c: (B, D) conditioning.
    x = constrain(x, 'batch', UNCONSTRAINED, UNCONSTRAINED)
    mod = self.modulation(nnx.silu(c)).astype(jnp.float32)[:, None, :]  # (B, 1, 6D)
    mod = constrain(mod, 'batch', None, UNCONSTRAINED)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    # LayerNorm → modulate → Linear and GeLU → Linear as single ops (models/fused.py): their
    # derivatives keep the LayerNorm outputs and fc1's output (in the compute dtype), not the
    # matmul inputs computed from them (benchmarks/memory.py).
    x = x + gate_a * self.attn(x, shift_a, scale_a)
    h = fused.norm_modulate_dense(x, shift_m, scale_m, *fused.linear_weights(self.fc1))
    h = fused.gelu_dense(constrain(h, 'batch', None, 'mlp'), *fused.linear_weights(self.fc2))
    return constrain(x + gate_m * h, 'batch', UNCONSTRAINED, UNCONSTRAINED)


class DiT(nnx.Module):
  """Diffusion Transformer with adaLN-Zero, conditioned on time t ∈ [0, 1] and label y.

  Args:
    variant: 'S/2', 'B/4', 'XL/2', 'T/4', 'test/2', ... (see `VARIANTS`; any patch size that
      divides the image works, e.g. 'S/7' on 28×28).
    input_size: image height = width, or (height, width).
    in_channels: image channels (the output has the same number).
    num_classes: K; the label table has K + 1 rows, row K is the null label ∅.
    dtype: compute dtype of the matmuls (float32 or bfloat16).
    param_dtype: dtype of the parameters.
    rngs: initialisation randomness.
    width, depth, num_heads, patch_size, mlp_ratio: override the variant's values.
    remat: what the backward pass keeps of each block (`REMAT_POLICIES`; True / False mean
      'full' / 'none'). 'full' keeps only the block inputs: ~13× less activation memory for
      DiT-XL/2 (benchmarks/memory.py) for ~1/3 more compute. 'dots_with_no_batch_dims_saveable'
      keeps the weight matmuls' outputs and recomputes the rest (attention scores, norms,
      GeLU). Same gradients whatever the policy.
    scan_blocks: stack the blocks' parameters on a leading 'layers' axis and run them with one
      `nnx.scan` (compile time independent of depth). False: one module per block, the layout
      of older checkpoints (`stack_blocks` converts). Same outputs and gradients.
    unroll_blocks: blocks per iteration of that scan (`resolve_unroll_blocks`): 'auto' (all of
      them on a CPU, where it trains faster; one elsewhere, where compile time stays flat in
      depth) or a positive int. Same outputs and gradients; no effect with scan_blocks=False.
    attention_impl: 'einsum' (einsums and an f32 softmax written here), 'xla'
      (`jax.nn.dot_product_attention`), 'cudnn' (its cuDNN flash attention: GPU, bfloat16
      compute; the (N, N) scores are never materialised) or 'auto' (`resolve_attention_impl`:
      'cudnn' where it runs, else 'einsum'; the choice is `self.attention_impl`).

  Call: `model(x, t, y)` with x (B, H, W, C), t (B,) in [0, 1], y (B,) int in [0, K] → float32
  (B, H, W, C). All-zero at initialisation (adaLN-Zero and zero final projection).
  """

  def __init__(self, variant: str = 'S/2', *, input_size: int | Sequence[int], in_channels: int,
               num_classes: int, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
               width: int | None = None, depth: int | None = None,
               num_heads: int | None = None, patch_size: int | None = None,
               mlp_ratio: float | None = None, remat: str | bool = 'none',
               scan_blocks: bool = True, unroll_blocks: str | int = UNROLL_AUTO,
               attention_impl: str = 'einsum'):
    cfg = resolve_config(variant, input_size=input_size, in_channels=in_channels,
                         num_classes=num_classes, width=width, depth=depth, num_heads=num_heads,
                         patch_size=patch_size, mlp_ratio=mlp_ratio)
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={attention_impl!r} is not one of {ATTENTION_IMPLS}.')
    attention_impl = resolve_attention_impl(attention_impl, dtype, cfg.width // cfg.num_heads)
    self.attention_impl = attention_impl
    if attention_impl == 'cudnn' and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError("attention_impl='cudnn' needs bfloat16 (or float16) compute on a GPU; "
                       f"got dtype={jnp.dtype(dtype).name}. Use 'einsum' or 'xla'.")
    self.config = cfg
    self.dtype = dtype
    self.remat = remat_policy_name(remat)
    self.scan_blocks = bool(scan_blocks)
    self.unroll_blocks = check_unroll_blocks(unroll_blocks)
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Linear on flattened p×p×C patches: the same map (and parameter count) as DiT's p×p conv.
    self.patch_embed = dense(cfg.patch_dim, d, ('patch', 'embed'), **kw)
    small_normal = nnx.initializers.normal(0.02)
    self.time_mlp1 = dense(TIME_FREQUENCY_DIM, d, (None, 'mlp'), kernel_init=small_normal, **kw)
    self.time_mlp2 = dense(d, d, ('mlp', 'embed'), kernel_init=small_normal, **kw)
    self.label_embed = nnx.Embed(cfg.num_classes + 1, d, dtype=dtype, param_dtype=param_dtype,
                                 embedding_init=partitioned(small_normal, ('classes', 'embed')),
                                 rngs=rngs)

    def make_block(block_rngs):
      return DiTBlock(d, cfg.num_heads, cfg.mlp_dim, dtype=dtype, param_dtype=param_dtype,
                      rngs=block_rngs, attention_impl=attention_impl)

    if self.scan_blocks:
      self.blocks = stacked(make_block, cfg.depth, rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(cfg.depth)])
    self.final_modulation = dense(d, 2 * d, ('embed', 'modulation'), zero=True, **kw)
    self.final_proj = dense(d, cfg.patch_dim, ('embed', 'patch'), zero=True, **kw)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
    cfg = self.config
    batch, height, width, channels = x.shape
    if (height, width) != cfg.input_size or channels != cfg.in_channels:
      raise ValueError(f'DiT built for {cfg.input_size}×{cfg.in_channels}, got x of shape '
                       f'{x.shape}.')
    gh, gw = cfg.grid
    x = patchify(x, cfg.patch_size).astype(self.dtype)                     # (B, N, p·p·C)
    pos = sincos_2d_position_embedding(cfg.width, gh, gw)                  # (N, D) constant
    h = self.patch_embed(x).astype(jnp.float32) + pos[None]                # (B, N, D) f32
    # Split over the batch, not like the FSDP-sharded weights (layers.constrain).
    h = constrain(h, 'batch', UNCONSTRAINED, UNCONSTRAINED)

    t_emb = timestep_embedding(t, TIME_FREQUENCY_DIM, time_scale=TIME_SCALE)  # (B, 256) f32
    t_emb = self.time_mlp2(nnx.silu(self.time_mlp1(t_emb.astype(self.dtype))))
    c = t_emb.astype(jnp.float32) + self.label_embed(y).astype(jnp.float32)  # (B, D)
    c = constrain(c, 'batch', None)

    if self.scan_blocks:
      h = run_stacked_blocks(self.blocks, h, c, self.remat,
                             resolve_unroll_blocks(self.unroll_blocks, cfg.depth))
    else:
      run_block = checkpointed(call_block, self.remat, prevent_cse=True)
      for block in self.blocks:
        h = run_block(block, h, c)

    shift, scale = jnp.split(self.final_modulation(nnx.silu(c)).astype(jnp.float32)[:, None],
                             2, axis=-1)
    out = fused.norm_modulate_dense(h, shift, scale, *fused.linear_weights(self.final_proj))
    out = constrain(out, 'batch', None, None)                               # (B, N, p·p·C)
    return unpatchify(out, cfg.grid, cfg.patch_size, channels)

  def flops_per_example(self) -> int:
    """Forward FLOPs for one image: 2 × multiply-adds of all matmuls, attention included."""
    return dit_flops(self.config)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) → (B, gh·gw, p·p·C) patches in row-major grid order."""
  batch, height, width, channels = x.shape
  p = patch_size
  x = x.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], patch_size: int,
               channels: int) -> jax.Array:
  """(B, gh·gw, p·p·C) → (B, gh·p, gw·p, C), the inverse of `patchify`."""
  (gh, gw), p = grid, patch_size
  out = tokens.reshape(tokens.shape[0], gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(tokens.shape[0], gh * p, gw * p, channels)


# ----------------------------------------------------------------------------- blocks


def remat_policy_name(remat: str | bool | None) -> str:
  """The `REMAT_POLICIES` entry for `remat`; True / False (older configs) are 'full' / 'none'."""
  if remat is True:
    return 'full'
  if remat is False or remat is None:
    return 'none'
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat={remat!r} is not one of {REMAT_POLICIES} (or True / False).')
  return remat


def checkpointed(fn, remat: str, *, prevent_cse: bool):
  """`fn` under `nnx.remat` with the named policy ('none': `fn` itself)."""
  if remat == 'none':
    return fn
  policy = None if remat == 'full' else getattr(jax.checkpoint_policies, remat)
  return nnx.remat(fn, policy=policy, prevent_cse=prevent_cse, graph=False)


def call_block(block: nnx.Module, h: jax.Array, c) -> jax.Array:
  return block(h, c)


def stacked(make_block, depth: int, rngs: nnx.Rngs) -> nnx.Module:
  """`depth` blocks as one block (`make_block`'s) whose parameters have a leading 'layers' axis
  (prepended to their logical names by `transform_metadata`)."""
  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
  def create(block_rngs):
    return make_block(block_rngs)

  return create(rngs)


def resolve_unroll_blocks(unroll: str | int, depth: int, platform: str | None = None) -> int:
  """Blocks per iteration of the block scan: 'auto' → `depth` (fully unrolled) on 'cpu', else 1;
  an int n ≥ 1 → min(n, depth). `platform`: the traced program's (`precision.target_platform`)
  when None.

  Unrolled on XLA:CPU the train step stacks no residuals: DiT-S/2 (batch 32) trains 1.11× (f32)
  and 1.15× (bf16) faster on a 2-core Xeon, DiT-T/4 1.13× and 1.03×, sampling unchanged, for a
  train-step compile of 4.2 instead of 1.9 s (DiT-XL/2: 9.0 instead of 1.8 s; f32) and a 1.5×
  larger footprint (benchmarks/README.md). Accelerators keep the rolled scan: compile time flat
  in depth, the smaller footprint.
  """
  if check_unroll_blocks(unroll) == UNROLL_AUTO:
    platform = platform or precision.target_platform()
    return depth if platform == 'cpu' else 1
  return min(unroll, depth)


def check_unroll_blocks(unroll: str | int) -> str | int:
  """`unroll` if it is 'auto' or a positive int, else ValueError saying what to use."""
  if unroll != UNROLL_AUTO and (isinstance(unroll, bool) or not isinstance(unroll, int)
                                or unroll < 1):
    raise ValueError(f'unroll_blocks={unroll!r}: use {UNROLL_AUTO!r} or a positive number of '
                     'blocks per scan iteration (1: not unrolled).')
  return unroll


def run_stacked_blocks(blocks: nnx.Module, h: jax.Array, c, remat: str,
                       unroll: int = 1) -> jax.Array:
  """h (B, N, D) through the stacked blocks in order (`block(h, c)`; c: any pytree, the same
  for every block), with one `nnx.scan` over 'layers' running `unroll` blocks per iteration.

  Tree mode (`graph=False`: the module is a pytree, sliced like `jax.lax.scan` slices its xs):
  graph mode refuses Variables from an outer trace, and the samplers call the model inside
  their own `lax.scan` with parameters merged outside it.
  """
  # Under scan, CSE cannot merge the recomputation with the forward pass: no need to prevent it.
  body = checkpointed(call_block, remat, prevent_cse=False)
  scan = nnx.scan(lambda carry, block, cond: body(block, carry, cond), unroll=unroll,
                  in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry, graph=False)
  return scan(h, blocks, c)


def _block_items(blocks) -> list:
  """Per-block subtrees of an unscanned `blocks` mapping, in order (keys 0.. or '0'..)."""
  keys = sorted(blocks, key=int)
  if [int(k) for k in keys] != list(range(len(keys))):
    raise ValueError(f'Unscanned blocks must be numbered 0..depth−1, got keys {keys}.')
  return [blocks[k] for k in keys]


def stack_blocks(params):
  """Unscanned → scanned parameters: `params['blocks'][i]` (i = 0..depth−1) become one subtree
  whose leaves are stacked on a leading axis, as `DiT(scan_blocks=True)` holds them.

  Args:
    params: nested dict (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`, or an nnx.State) of
      a `DiT(scan_blocks=False)`.

  Returns:
    A nested dict for `nnx.replace_by_pure_dict` on a scanned model's state.
  """
  params = _pure(params)
  blocks = _block_items(params['blocks'])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, 'blocks': stacked}


def unstack_blocks(params):
  """Scanned → unscanned parameters (the inverse of `stack_blocks`); keys of blocks are ints."""
  params = _pure(params)
  stacked = params['blocks']
  depth = jax.tree.leaves(stacked)[0].shape[0]
  blocks = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}
  return {**params, 'blocks': blocks}


def _pure(params) -> dict:
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else dict(params)


def dit_flops(cfg: DiTConfig) -> int:
  """Analytic forward FLOPs (2·MACs of matmuls; norms, softmax, activations not counted)."""
  n, d, f, pd = cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.patch_dim
  per_block = (n * d * 3 * d      # q, k, v
               + 2 * n * n * d    # q·kᵀ and probs·v over all heads
               + n * d * d        # attention output projection
               + 2 * n * d * f    # MLP
               + d * 6 * d)       # adaLN modulation (once per example, not per token)
  macs = (n * pd * d                                  # patch embedding
          + TIME_FREQUENCY_DIM * d + d * d            # time MLP
          + cfg.depth * per_block
          + d * 2 * d + n * d * pd)                   # final modulation and projection
  return 2 * macs
