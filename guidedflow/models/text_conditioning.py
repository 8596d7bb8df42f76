"""A generator conditioned on text: the text features of a caption (from a small encoder trained
with the generator, or read from the text cache of a frozen one), the null condition ∅, and a
backbone that takes them (`unet.UNet(text_dim=...)`, `dit_text.TextDiT`).

The condition `y` is a dict of (B, ...) arrays:
  trained encoder:  {'tokens': int32 (B, L), 'mask': int32 (B, L), 'null': int32 (B,)}
  cached features:  {'hidden': (B, L, D), 'mask': int32 (B, L), 'pooled': (B, D), 'null': (B,)}
`null` = 1 marks ∅ (caption dropout in training, the unconditional half of CFG). The null
condition is, by `null`:
  'learned'  a learned token sequence (L, D) and pooled vector, all L tokens unmasked (PixArt-α's
             `y_embedding`); initialised small (0.02 std)
  'empty'    the empty prompt: a trained encoder encodes the tokens of '' (the model holds them);
             cached features take the features of '' given at construction (Stable Diffusion)
A negative prompt is a condition like any other: it takes ∅'s place in CFG
(`sampling.sample(..., null_labels=...)`), so nothing here knows about it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from guidedflow.models.layers import partitioned

NULLS = ('learned', 'empty')


class Constant(nnx.Variable):
  """A constant of the model rebuilt by its constructor (not trained, not checkpointed)."""


class TextConditioned(nnx.Module):
  """`backbone(x, t, {'hidden', 'mask', 'pooled'})` behind an encoder and the null condition.

  Args:
    backbone: the image network, text-conditioned.
    text_dim: D, the width of the text features.
    max_length: L, tokens per caption.
    encoder: a module `(tokens, mask) -> {'hidden', 'pooled'}` trained with the generator, or
      None (cached features in the condition).
    null: 'learned' | 'empty' (see the module docstring).
    empty: for null='empty': the empty prompt's tokens and mask ((L,) int32 each) with an
      encoder; without one, its cached {'hidden' (L, D), 'mask' (L,), 'pooled' (D,)}.
  """

  def __init__(self, backbone, *, text_dim, max_length, encoder=None, null='learned',
               empty=None, rngs: nnx.Rngs):
    if null not in NULLS:
      raise ValueError(f'null={null!r} is not one of {NULLS}.')
    if null == 'empty' and empty is None:
      raise ValueError("null='empty' needs the empty prompt's tokens (or cached features).")
    self.backbone, self.encoder, self.null = backbone, encoder, null
    self.max_length = int(max_length)
    if null == 'learned':
      init = partitioned(nnx.initializers.normal(0.02), (None, 'embed'))
      self.null_hidden = nnx.Param(init(rngs.params(), (max_length, text_dim), jnp.float32))
      self.null_pooled = nnx.Param(partitioned(nnx.initializers.normal(0.02), ('embed',))(
          rngs.params(), (text_dim,), jnp.float32))
    else:
      self.empty = nnx.Dict({k: Constant(jnp.asarray(v)) for k, v in empty.items()})

  def features(self, y):
    """{'hidden', 'mask', 'pooled'} of condition `y`, ∅ rows replaced by the null condition.

    A `y` without 'null' is taken to be such features already: the Sampler encodes its
    condition once per call (`encode_condition`), not once per model evaluation."""
    if 'null' not in y:
      return y
    null = jnp.asarray(y['null']).astype(bool)
    if self.encoder is not None:
      tokens, mask = y['tokens'], y['mask']
      if self.null == 'empty':
        tokens = jnp.where(null[:, None], self.empty['tokens'][...][None], tokens)
        mask = jnp.where(null[:, None], self.empty['mask'][...][None], mask)
      out = self.encoder(tokens, mask)
      hidden, pooled = out['hidden'], out['pooled']
    else:
      hidden, mask, pooled = y['hidden'], y['mask'], y['pooled']
      if self.null == 'empty':
        hidden = jnp.where(null[:, None, None], self.empty['hidden'][...][None], hidden)
        mask = jnp.where(null[:, None], self.empty['mask'][...][None], mask)
        pooled = jnp.where(null[:, None], self.empty['pooled'][...][None], pooled)
    if self.null == 'learned':
      hidden = jnp.where(null[:, None, None], self.null_hidden[...][None].astype(hidden.dtype),
                         hidden)
      pooled = jnp.where(null[:, None], self.null_pooled[...][None].astype(pooled.dtype), pooled)
      mask = jnp.where(null[:, None], 1, mask)
    return {'hidden': hidden.astype(jnp.float32), 'mask': jnp.asarray(mask, jnp.int32),
            'pooled': pooled.astype(jnp.float32)}

  def __call__(self, x: jax.Array, t: jax.Array, y) -> jax.Array:
    return self.backbone(x, t, self.features(y))

  def flops_per_example(self):
    """The backbone's forward FLOPs for one image and a caption of `max_length` tokens (a
    trained encoder's own not counted), or None for a backbone without the count."""
    count = getattr(self.backbone, 'flops_per_example', None)
    return None if count is None else count(self.max_length)


def encode_condition(model, y):
  """`model.features(y)` for a text model's condition (a dict), else `y` unchanged: what the
  Sampler hands the integrator, so the text encoder runs once per sampling call."""
  if isinstance(model, TextConditioned) and isinstance(y, dict):
    return model.features(y)
  return y
