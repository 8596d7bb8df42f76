"""Networks that represent the guided vector field u_θ(x|y) or score s_θ(x|y).

`create_model('dit' | 'unet', ...)` builds one; every model is called as `model(x, t, y)` with
x (B, H, W, C), t (B,) in [0, 1], y (B,) int in [0, K] (K = null label) and returns float32
of the shape of x, all zeros at initialisation.
"""

import jax.numpy as jnp
from flax import nnx

from guidedflow.models.dit import VARIANTS, DiT, DiTConfig, dit_flops, resolve_config
from guidedflow.models.layers import param_count
from guidedflow.models.unet import UNet

MODELS = {'dit': DiT, 'unet': UNet}
# Compute / parameter dtypes by config name.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

__all__ = ['DTYPES', 'DiT', 'DiTConfig', 'MODELS', 'UNet', 'VARIANTS', 'create_model', 'flops_per_example',
           'param_count']


def create_model(name: str, *, input_size, in_channels: int, num_classes: int,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 **kwargs) -> nnx.Module:
  """Builds a network by name.

  Args:
    name: 'dit' (kwargs: `variant='S/2'` and overrides width, depth, num_heads, patch_size,
      mlp_ratio) or 'unet' (kwargs: channels, num_residual_layers, t_embed_dim, y_embed_dim,
      norm).
    input_size, in_channels, num_classes, dtype, param_dtype, rngs: see `DiT` / `UNet`.

  Raises:
    ValueError: unknown name.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; allowed: {sorted(MODELS)}.')
  return MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)


def flops_per_example(name: str, *, input_size, in_channels: int, num_classes: int = 10,
                      **kwargs) -> int:
  """Analytic forward FLOPs per image (2 × multiply-adds of matmuls/convs, attention included).

  A training step (forward + backward) costs about 3× this. Built on an abstract model
  (`nnx.eval_shape`), so it is cheap for any size. Same arguments as `create_model`.
  """
  if name == 'dit':
    return dit_flops(resolve_config(kwargs.pop('variant', 'S/2'), input_size=input_size,
                                    in_channels=in_channels, num_classes=num_classes, **kwargs))
  model = nnx.eval_shape(lambda: create_model(name, input_size=input_size,
                                              in_channels=in_channels, num_classes=num_classes,
                                              rngs=nnx.Rngs(0), **kwargs))
  return model.flops_per_example()
