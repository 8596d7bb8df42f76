"""Text-conditioned DiT: PixArt-α's cross-attention block with adaLN-single, in flax.nnx.

The network maps `(x, t, cond)` → a prediction with the shape of `x`, where `cond` is a text
encoder's output for the caption (`guidedflow.text_cache` / `text_encoders`):
`{'hidden': (B, L, text_dim) f32, 'mask': (B, L) int (1: a token, 0: padding),
'pooled': (B, text_dim) f32}`.

Architecture (Chen et al., PixArt-α, 2023, §2.3; its `PixArtBlock`, `T2IFinalLayer`):

* The caption projection (PixArt's `y_embedder`): Linear text_dim → width, tanh-GeLU, Linear
  width → width, applied to every token's hidden state once, shared by all blocks.
* The condition c = time MLP(t) + pooled MLP(pooled) (B, width): the pooled text vector added
  to the time embedding as SD3 adds its pooled CLIP vector (Esser et al. 2024, `y_embedder`:
  Linear, SiLU, Linear). PixArt-α has no pooled path.
* adaLN-single: one shared `t_block` (SiLU, Linear width → 6·width) computes the modulation
  from c once; each block adds its own learnable `scale_shift_table` (6, width), initialised
  to randn / √width as PixArt's, and splits the sum into shift/scale/gate of attention and MLP.
* The block: x += gate_msa · SelfAttn(modulate(LN(x))); x += CrossAttn(x, text, mask) (no norm
  and no modulation, as PixArt-α); x += gate_mlp · MLP(modulate(LN(x))). The cross-attention
  output projection is zero-initialised (PixArt), so the caption tokens act only through what
  training writes there; the pooled vector acts from the first step.
* The final layer: LN, modulated by its own table (2, width) + c (not through t_block),
  Linear width → p·p·C, zero-initialised: the output is zero at initialisation.

Cross-attention masks padded caption tokens with f32-min logits: their probability is exactly
0, so hidden states at padded positions change nothing. A row with no token at all (an
all-zero mask, e.g. a dropped caption) has uniform, finite probabilities over the padding;
its cross-attention output is set to zero (then the projection's bias), so such a row neither
produces NaN nor depends on what the padding holds.

Everything else is the class-conditional DiT's (`models/dit.py`), reused, not copied: the
variants (`dit.VARIANTS`: 'XL/2', 'S/2', 'test/1'), patchify, the 2-D sin-cos positions, the
self-attention (`dit.Attention` and its `attention_impl`s), the fused LayerNorm-modulate-Linear
and GeLU-Linear ops, precision (bf16 matmul operands with f32 accumulation; residual stream,
norms, modulation and softmax in f32; f32 output), the stacked 'layers' scan with its unroll
and remat policies, `stack_blocks` / `unstack_blocks`, and the logical axis names ('embed',
'mlp', 'heads', 'modulation', 'patch', 'layers') with the activation constraints. The text
width axis is named 'text', a name `sharding.DEFAULT_RULES` does not list, i.e. replicated;
the text MLPs' first kernels (text_dim × width) are therefore named ('text', 'embed'), so that
FSDP splits their width.
"""

import math
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow import errors
from guidedflow.models import dit, fused, precision
from guidedflow.models.layers import (UNCONSTRAINED, constrain, partitioned,
                                      sincos_2d_position_embedding, timestep_embedding)

TEXT_AXIS = 'text'  # logical name of the text encoder's width (unmapped: replicated)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     impl: str = 'einsum') -> jax.Array:
  """softmax(q·kᵀ/√Dh) · v over the keys where `mask` is True → float32 (B, N, H, Dh).

  Args:
    q: (B, N, H, Dh) queries; k, v: (B, L, H, Dh) keys and values (compute dtype).
    mask: (B, L) bool, True for real tokens. Masked logits are f32-min (probability exactly 0);
      a row without any True key returns zeros (not the padding's mean, not NaN).
    impl: 'einsum' (logits and softmax in f32, `precision.einsum` dots) or 'xla'
      (`jax.nn.dot_product_attention` with the mask).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  if impl == 'einsum':
    logits = precision.einsum('bnhd,blhd->bhnl', q, k) * scale               # (B, H, N, L) f32
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = precision.einsum('bhnl,blhd->bnhd', probs.astype(v.dtype), v)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], scale=scale,
                                       implementation='xla')
  has_tokens = jnp.any(mask, axis=-1)[:, None, None, None]
  return jnp.where(has_tokens, out.astype(jnp.float32), 0.0)


class CrossAttention(nnx.Module):
  """Multi-head attention of the image tokens to the caption tokens (PixArt's
  `MultiHeadCrossAttention`); the output projection is zero-initialised."""

  def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               impl: str = 'einsum'):
    self.num_heads = num_heads
    self.dtype = dtype
    self.impl = impl
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = dit.dense(width, width, ('embed', 'heads'), **kw)
    # Fused k/v laid out as (heads, 2, head_dim), so a 'tensor' split keeps whole heads.
    self.kv = dit.dense(width, 2 * width, ('embed', 'heads'), **kw)
    self.proj = dit.dense(width, width, ('heads', 'embed'), zero=True, **kw)

  def __call__(self, x: jax.Array, text: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, N, D) f32 residual stream, text (B, L, D), mask (B, L) bool → f32 (B, N, D)."""
    batch, tokens, width = x.shape
    heads, head_dim = self.num_heads, width // self.num_heads
    q = self.q(x.astype(self.dtype)).astype(self.dtype).reshape(batch, tokens, heads, head_dim)
    kv = self.kv(text).astype(self.dtype).reshape(batch, text.shape[1], heads, 2, head_dim)
    q = constrain(q, 'batch', None, 'heads', None)
    kv = constrain(kv, 'batch', None, 'heads', None, None)
    impl = 'einsum' if self.impl == 'einsum' else 'xla'  # (N, L) scores: small, no cuDNN needed
    out = masked_attention(q, kv[:, :, :, 0], kv[:, :, :, 1], mask, impl).astype(self.dtype)
    out = constrain(out, 'batch', None, 'heads', None)
    return self.proj(out.reshape(batch, tokens, width)).astype(jnp.float32)


def _table(rows: int, width: int, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
  """A (rows, width) adaLN-single table, randn / √width as PixArt's `scale_shift_table`."""
  init = partitioned(nnx.initializers.normal(width ** -0.5), (None, 'embed'))
  return nnx.Param(init(rngs.params(), (rows, width), param_dtype))


class TextDiTBlock(nnx.Module):
  """PixArt-α block: modulated self-attention, cross-attention, modulated MLP."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype, param_dtype,
               rngs: nnx.Rngs, attention_impl: str = 'einsum'):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = dit.Attention(width, num_heads, impl=attention_impl, **kw)
    self.cross_attn = CrossAttention(width, num_heads, impl=attention_impl, **kw)
    self.fc1 = dit.dense(width, mlp_dim, ('embed', 'mlp'), **kw)
    self.fc2 = dit.dense(mlp_dim, width, ('mlp', 'embed'), **kw)
    self.scale_shift_table = _table(6, width, param_dtype, rngs)

  def __call__(self, x: jax.Array, cond: tuple) -> jax.Array:
    """x (B, N, D) f32; cond = (shared modulation (B, 6, D) f32, text (B, L, D), mask (B, L))
    (one argument: `dit.run_stacked_blocks` broadcasts it to every block)."""
    shared, text, mask = cond
    x = constrain(x, 'batch', UNCONSTRAINED, UNCONSTRAINED)
    mod = shared + self.scale_shift_table[...].astype(jnp.float32)[None]     # (B, 6, D)
    mod = constrain(mod, 'batch', None, UNCONSTRAINED)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=1)  # (B, 1, D)
    x = x + gate_a * self.attn(x, shift_a, scale_a)
    x = x + self.cross_attn(x, text, mask)
    h = fused.norm_modulate_dense(x, shift_m, scale_m, *fused.linear_weights(self.fc1))
    h = fused.gelu_dense(constrain(h, 'batch', None, 'mlp'), *fused.linear_weights(self.fc2))
    return constrain(x + gate_m * h, 'batch', UNCONSTRAINED, UNCONSTRAINED)


class TextDiT(nnx.Module):
  """DiT with cross-attention to caption tokens and adaLN-single (PixArt-α), pooled text in c.

  Args:
    variant: 'XL/2', 'S/2', 'test/1', ... (`dit.VARIANTS`; any patch size dividing the image).
    input_size: image height = width, or (height, width).
    in_channels: image channels (the output has the same number).
    text_dim: the text encoder's width (4096 T5-XXL, 768 CLIP-L, 128 the trained encoder).
    dtype, param_dtype, rngs, width, depth, num_heads, patch_size, mlp_ratio, remat,
      scan_blocks, unroll_blocks, attention_impl: as `dit.DiT`'s. `attention_impl` picks the
      self-attention; cross-attention runs 'einsum' for 'einsum', else XLA's attention with
      the mask (its (N, L) scores are small).

  Call: `model(x, t, cond)` with x (B, H, W, C), t (B,) in [0, 1], cond {'hidden': (B, L,
  text_dim), 'mask': (B, L) int, 'pooled': (B, text_dim)} → float32 (B, H, W, C); all zeros at
  initialisation (zero final projection).
  """

  def __init__(self, variant: str = 'S/2', *, input_size: int | Sequence[int], in_channels: int,
               text_dim: int, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
               width: int | None = None, depth: int | None = None,
               num_heads: int | None = None, patch_size: int | None = None,
               mlp_ratio: float | None = None, remat: str | bool = 'none',
               scan_blocks: bool = True, unroll_blocks: str | int = dit.UNROLL_AUTO,
               attention_impl: str = 'einsum'):
    cfg = dit.resolve_config(variant, input_size=input_size, in_channels=in_channels,
                             num_classes=0, width=width, depth=depth, num_heads=num_heads,
                             patch_size=patch_size, mlp_ratio=mlp_ratio)
    if attention_impl not in dit.ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={attention_impl!r} is not one of {dit.ATTENTION_IMPLS}.')
    attention_impl = dit.resolve_attention_impl(attention_impl, dtype, cfg.width // cfg.num_heads)
    if attention_impl == 'cudnn' and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError("attention_impl='cudnn' needs bfloat16 (or float16) compute on a GPU; "
                       f"got dtype={jnp.dtype(dtype).name}. Use 'einsum' or 'xla'.")
    if text_dim < 1:
      raise ValueError(f'text_dim must be positive, got {text_dim}.')
    self.config = cfg
    self.text_dim = int(text_dim)
    self.attention_impl = attention_impl
    self.dtype = dtype
    self.remat = dit.remat_policy_name(remat)
    self.scan_blocks = bool(scan_blocks)
    self.unroll_blocks = dit.check_unroll_blocks(unroll_blocks)
    d = cfg.width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    small_normal = nnx.initializers.normal(0.02)  # PixArt's init of its embedding MLPs
    self.patch_embed = dit.dense(cfg.patch_dim, d, ('patch', 'embed'), **kw)
    self.time_mlp1 = dit.dense(dit.TIME_FREQUENCY_DIM, d, (None, 'mlp'),
                               kernel_init=small_normal, **kw)
    self.time_mlp2 = dit.dense(d, d, ('mlp', 'embed'), kernel_init=small_normal, **kw)
    self.pooled_mlp1 = dit.dense(text_dim, d, (TEXT_AXIS, 'embed'), kernel_init=small_normal,
                                 **kw)
    self.pooled_mlp2 = dit.dense(d, d, ('mlp', 'embed'), kernel_init=small_normal, **kw)
    self.caption_fc1 = dit.dense(text_dim, d, (TEXT_AXIS, 'embed'), kernel_init=small_normal,
                                 **kw)
    self.caption_fc2 = dit.dense(d, d, ('mlp', 'embed'), kernel_init=small_normal, **kw)
    self.t_block = dit.dense(d, 6 * d, ('embed', 'modulation'), kernel_init=small_normal, **kw)

    def make_block(block_rngs):
      return TextDiTBlock(d, cfg.num_heads, cfg.mlp_dim, dtype=dtype, param_dtype=param_dtype,
                          rngs=block_rngs, attention_impl=attention_impl)

    if self.scan_blocks:
      self.blocks = dit.stacked(make_block, cfg.depth, rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(cfg.depth)])
    self.final_scale_shift_table = _table(2, d, param_dtype, rngs)
    self.final_proj = dit.dense(d, cfg.patch_dim, ('embed', 'patch'), zero=True, **kw)

  def __call__(self, x: jax.Array, t: jax.Array, cond: dict) -> jax.Array:
    cfg = self.config
    batch, height, width, channels = x.shape
    hidden, mask, pooled = cond['hidden'], cond['mask'], cond['pooled']
    if (height, width) != cfg.input_size or channels != cfg.in_channels:
      raise ValueError(f'TextDiT built for {cfg.input_size}×{cfg.in_channels}, got x of shape '
                       f'{x.shape}.')
    if (hidden.ndim != 3 or hidden.shape[::2] != (batch, self.text_dim)
        or mask.shape != hidden.shape[:2] or pooled.shape != (batch, self.text_dim)):
      raise ValueError(f'TextDiT built for text_dim={self.text_dim} and batch {batch}: got '
                       f'hidden {hidden.shape}, mask {mask.shape}, pooled {pooled.shape}.')
    gh, gw = cfg.grid
    h = self.patch_embed(dit.patchify(x, cfg.patch_size).astype(self.dtype))
    h = h.astype(jnp.float32) + sincos_2d_position_embedding(cfg.width, gh, gw)[None]
    h = constrain(h, 'batch', UNCONSTRAINED, UNCONSTRAINED)                 # (B, N, D) f32

    t_emb = timestep_embedding(t, dit.TIME_FREQUENCY_DIM, time_scale=dit.TIME_SCALE)
    t_emb = self.time_mlp2(nnx.silu(self.time_mlp1(t_emb.astype(self.dtype))))
    pooled_emb = self.pooled_mlp2(nnx.silu(self.pooled_mlp1(pooled.astype(self.dtype))))
    c = t_emb.astype(jnp.float32) + pooled_emb.astype(jnp.float32)         # (B, D)
    c = constrain(c, 'batch', None)
    shared = self.t_block(nnx.silu(c)).astype(jnp.float32).reshape(batch, 6, cfg.width)

    text = self.caption_fc1(hidden.astype(self.dtype))                      # (B, L, D) f32
    text = fused.gelu_dense(text, *fused.linear_weights(self.caption_fc2)).astype(self.dtype)
    text = constrain(text, 'batch', None, UNCONSTRAINED)
    block_cond = (shared, text, constrain(mask != 0, 'batch', None))

    if self.scan_blocks:
      h = dit.run_stacked_blocks(self.blocks, h, block_cond, self.remat,
                                 dit.resolve_unroll_blocks(self.unroll_blocks, cfg.depth))
    else:
      run_block = dit.checkpointed(dit.call_block, self.remat, prevent_cse=True)
      for block in self.blocks:
        h = run_block(block, h, block_cond)

    table = self.final_scale_shift_table[...].astype(jnp.float32)
    shift, scale = jnp.split(table[None] + c[:, None], 2, axis=1)          # (B, 1, D) each
    out = fused.norm_modulate_dense(h, shift, scale, *fused.linear_weights(self.final_proj))
    out = constrain(out, 'batch', None, None)                               # (B, N, p·p·C)
    return dit.unpatchify(out, cfg.grid, cfg.patch_size, channels)

  def flops_per_example(self, text_length: int = 120) -> int:
    """Forward FLOPs for one image and a caption of `text_length` tokens (2 × multiply-adds
    of all matmuls, attention included; norms, softmax, activations not counted)."""
    cfg = self.config
    n, d, f, pd, el = cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.patch_dim, text_length
    per_block = (n * d * 4 * d + 2 * n * n * d   # self-attention: q, k, v, out; scores, values
                 + 2 * n * d * d + el * d * 2 * d + 2 * n * el * d  # cross: q, out; k, v; attn
                 + 2 * n * d * f)                 # MLP
    macs = (n * pd * d + dit.TIME_FREQUENCY_DIM * d + d * d   # patches, time MLP
            + self.text_dim * d + d * d                       # pooled MLP
            + el * (self.text_dim * d + d * d)                # caption projection
            + d * 6 * d + cfg.depth * per_block + n * d * pd)  # t_block, blocks, final layer
    return 2 * macs


stack_blocks = dit.stack_blocks      # unscanned → scanned parameters ('blocks' subtree)
unstack_blocks = dit.unstack_blocks  # scanned → unscanned


def from_config(config, image_shape, text_dim: int):
  """A zero-argument function building the TextDiT of `config.model` for `image_shape` (H, W,
  C) and a text encoder of width `text_dim`, as `factory.generator` builds the DiT (the same
  `config.model` keys: variant, dtype, param_dtype, remat, scan_blocks, unroll_blocks,
  attention_impl; seed `config.train.seed`).

  Raises:
    ConfigError: the model cannot take these images (e.g. a patch size that does not divide
      the image size), with the model's message.
  """
  height, width, channels = (int(d) for d in image_shape)
  dtype, reason = precision.resolve_compute_dtype(config.model.dtype, precision.target_platform())
  if reason:
    logging.warning('config.model.dtype=%s: %s.', config.model.dtype, reason)

  def construct():
    return TextDiT(
        config.model.variant, input_size=(height, width), in_channels=channels,
        text_dim=int(text_dim), dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(config.model.param_dtype), rngs=nnx.Rngs(config.train.seed),
        remat=dit.remat_policy_name(config.model.remat),
        scan_blocks=bool(config.model.scan_blocks), unroll_blocks=config.model.unroll_blocks,
        attention_impl=config.model.attention_impl)

  try:
    nnx.eval_shape(construct)
  except ValueError as e:
    raise errors.ConfigError(f'config.model (text DiT {config.model.variant}) cannot take the '
                             f'{height}x{width}x{channels} images: {e}') from None
  return construct
