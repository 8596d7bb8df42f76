"""Loads Stable Diffusion VAE weights (sd-vae-ft-ema / -mse, ...) into `AutoencoderKL`.

Three key layouts are read, from a file the user gives (nothing is downloaded):
  * 'diffusers': `diffusion_pytorch_model.safetensors` / `.bin` of diffusers' AutoencoderKL,
    attention as `to_q / to_k / to_v / to_out.0`;
  * 'diffusers_legacy_attention': the same with older diffusers' `query / key / value /
    proj_attn` (linear (out, in) or 1×1-conv (out, in, 1, 1) matrices);
  * 'ldm': CompVis' original names (`encoder.down.{i}.block.{j}`, `mid.attn_1.{q,k,v,proj_out}`
    as 1×1 convs, `decoder.up.{i}` indexed by resolution, so reversed against diffusers), inside
    a full SD checkpoint under `first_stage_model.` or standalone. Keys outside the prefix and
    the LDM training losses (`loss.*`) are ignored.
Every NNX parameter is assigned from exactly one source key: conv OIHW → HWIO, linear (out, in)
→ (in, out), GroupNorm weight → scale. Any missing, unexpected or mis-shaped key is an error
that lists them all. Files are recognised by content: safetensors, or a `torch.save` pickle
(zip or legacy; a plain state dict or a Lightning checkpoint's `state_dict`; `torch_checkpoint`)
read without torch by a restricted unpickler that makes non-tensor objects inert placeholders.
"""

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow.models import safetensors_io
from guidedflow.models import torch_checkpoint
from guidedflow.models import torch_weights
from guidedflow.models.autoencoder import AutoencoderKL

SD_VAE_URL = 'https://huggingface.co/stabilityai/sd-vae-ft-ema'
SD_VAE_FILE = 'diffusion_pytorch_model.safetensors'
WEIGHTS_CONFIG_KEY = 'config.autoencoder.weights'
SD_SCALE_FACTOR = 0.18215
LAYOUTS = ('diffusers', 'diffusers_legacy_attention', 'ldm')
IGNORED_SUBTREES = ('loss.',)  # LDM training losses (discriminator, LPIPS, logvar)

_ATTENTION_NAMES = {  # NNX name → source name, per layout
    'diffusers': dict(norm='group_norm', query='to_q', key='to_k', value='to_v', proj='to_out.0'),
    'diffusers_legacy_attention': dict(norm='group_norm', query='query', key='key',
                                       value='value', proj='proj_attn'),
    'ldm': dict(norm='norm', query='q', key='k', value='v', proj='proj_out'),
}


class SDVAEWeightsNotFoundError(errors.UserError, FileNotFoundError):
  """No SD-VAE weights file at the given path."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_into` read: `used_keys` (one per NNX parameter, in model order, each once)
  and `ignored_keys` (outside the prefix, or LDM losses); together they are every key."""
  layout: str
  prefix: str
  used_keys: tuple[str, ...]
  ignored_keys: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Files.


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a safetensors or torch (`.bin`, `.ckpt`, `.pth`) file, told apart by content."""
  if safetensors_io.is_safetensors(path):
    return safetensors_io.read_safetensors(path)
  return torch_checkpoint.read_checkpoint(path)


def save_weights(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                 file_format: str = 'safetensors',
                 metadata: Mapping[str, str] | None = None) -> None:
  """Writes `state_dict` as 'safetensors' (with `metadata`), 'torch' (`torch.save` zip, as
  diffusers' `.bin`) or 'ckpt' (a Lightning-style `{'state_dict': ..., 'global_step': 0}`,
  pre-1.6 single-stream format, as the original LDM checkpoints)."""
  if file_format == 'safetensors':
    safetensors_io.save_safetensors(state_dict, path, metadata=metadata)
  elif file_format == 'torch':
    torch_weights.save_state_dict(state_dict, path)
  elif file_format == 'ckpt':
    torch_checkpoint.save_checkpoint(state_dict, path)
  else:
    raise ValueError(f"file_format must be 'safetensors', 'torch' or 'ckpt', got {file_format!r}")


# ----------------------------------------------------------------------------------------------
# Key layouts.


def detect_layout(state_dict: Mapping[str, Any]) -> tuple[str, str]:
  """(layout, prefix) of the SD-VAE in `state_dict`: the layout is one of `LAYOUTS`; the prefix
  is '' or e.g. 'first_stage_model.' (a full SD checkpoint).

  Raises:
    ValueError: no `encoder.conv_in.weight` (under any prefix), several candidate prefixes
      (other than 'first_stage_model.'), or neither diffusers nor LDM block names.
  """
  anchor = 'encoder.conv_in.weight'
  prefixes = sorted({k[:-len(anchor)] for k in state_dict
                     if k.endswith(anchor) and (k == anchor or k.endswith('.' + anchor))})
  if 'first_stage_model.' in prefixes:
    prefixes = ['first_stage_model.']
  if len(prefixes) != 1:
    found = ', '.join(repr(p + anchor) for p in prefixes) or 'none'
    raise ValueError(f"expected one SD-VAE in the weights (one '{anchor}' key); found {found}.")
  prefix = prefixes[0]
  keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
  if any(k.startswith(('encoder.down.', 'encoder.mid.')) for k in keys):
    return 'ldm', prefix
  if any(k.startswith('encoder.mid_block.attentions.0.query.') for k in keys):
    return 'diffusers_legacy_attention', prefix
  if any(k.startswith(('encoder.down_blocks.', 'encoder.mid_block.')) for k in keys):
    return 'diffusers', prefix
  raise ValueError(f"weights under prefix {prefix!r} have neither diffusers ('encoder."
                   "down_blocks.*') nor LDM ('encoder.down.*') block names.")


def _rules(layout: str, num_levels: int) -> list[tuple[str, Any]]:
  """Regex rewrites of a dotted NNX module path (with a trailing '.') to the source name."""
  attention = _ATTENTION_NAMES[layout]
  if layout == 'ldm':
    up = lambda kind: lambda m: f'decoder.up.{num_levels - 1 - int(m[1])}.{kind}'  # noqa: E731
    rules = [(r'^encoder\.levels\.(\d+)\.blocks\.', r'encoder.down.\1.block.'),
             (r'^encoder\.levels\.(\d+)\.resample\.', r'encoder.down.\1.downsample.'),
             (r'^decoder\.levels\.(\d+)\.blocks\.', up('block.')),
             (r'^decoder\.levels\.(\d+)\.resample\.', up('upsample.')),
             (r'\.shortcut\.$', '.nin_shortcut.'),
             (r'\.mid\.block1\.', '.mid.block_1.'), (r'\.mid\.block2\.', '.mid.block_2.'),
             (r'\.mid\.attention\.', '.mid.attn_1.')]
    block = 'attn_1'
  else:
    rules = [(r'^encoder\.levels\.(\d+)\.blocks\.', r'encoder.down_blocks.\1.resnets.'),
             (r'^encoder\.levels\.(\d+)\.resample\.', r'encoder.down_blocks.\1.downsamplers.0.'),
             (r'^decoder\.levels\.(\d+)\.blocks\.', r'decoder.up_blocks.\1.resnets.'),
             (r'^decoder\.levels\.(\d+)\.resample\.', r'decoder.up_blocks.\1.upsamplers.0.'),
             (r'\.shortcut\.$', '.conv_shortcut.'),
             (r'\.mid\.block1\.', '.mid_block.resnets.0.'),
             (r'\.mid\.block2\.', '.mid_block.resnets.1.'),
             (r'\.mid\.attention\.', '.mid_block.attentions.0.'),
             (r'^(encoder|decoder)\.norm_out\.$', r'\1.conv_norm_out.')]
    block = 'attentions.0'
  rules += [(rf'\.{re.escape(block)}\.{name}\.$', f'.{block}.{source}.')
            for name, source in attention.items()]
  return rules


def source_name(path: tuple[Any, ...], layout: str, num_levels: int) -> str:
  """The source key (without prefix) of the NNX parameter at `path` in `layout`, e.g.
  ('decoder', 'levels', 0, 'blocks', 1, 'conv1', 'kernel') → 'decoder.up.3.block.1.conv1.weight'
  in 'ldm' with 4 levels."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  *module, leaf = (str(p) for p in path)
  name = '.'.join(module) + '.'
  for pattern, replacement in _rules(layout, num_levels):
    name = re.sub(pattern, replacement, name)
  return name + ('bias' if leaf == 'bias' else 'weight')


# ----------------------------------------------------------------------------------------------
# Conversion.

_BLOCK_PATTERNS = {'ldm': r'encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight',
                   'diffusers': r'encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight'}


def _params(model: AutoencoderKL) -> list[tuple[tuple[Any, ...], nnx.Param]]:
  return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]


def _source_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
  """Accepted source shapes of an NNX parameter of `shape`; the first is the canonical one."""
  if len(shape) == 4:  # conv: HWIO ← OIHW
    kh, kw, c_in, c_out = shape
    return ((c_out, c_in, kh, kw),)
  if len(shape) == 2:  # linear: (in, out) ← (out, in), or a 1×1 conv's (out, in, 1, 1)
    return ((shape[1], shape[0]), (shape[1], shape[0], 1, 1))
  return (tuple(shape),)  # biases, GroupNorm weight (→ scale) and bias


def _to_nnx(value: np.ndarray, ndim: int) -> np.ndarray:
  if ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if ndim == 2:
    return value.reshape(value.shape[:2]).T
  return value


def _to_source(value: np.ndarray, conv_attention: bool) -> np.ndarray:
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T[:, :, None, None] if conv_attention else value.T)
  return value


def _mismatch_message(source, layout, prefix, problems, limit=10) -> str:
  lines = [f'{source}: the SD-VAE weights ({layout} layout, prefix {prefix!r}) do not match '
           'the model:']
  for title, items in problems:
    if items:
      more = f' … and {len(items) - limit} more' if len(items) > limit else ''
      lines.append(f'  {len(items)} {title}: ' + '; '.join(items[:limit]) + more)
  return '\n'.join(lines)


def load_into(model: AutoencoderKL, state_dict: Mapping[str, np.ndarray], *,
              layout: str | None = None, prefix: str | None = None, dry_run: bool = False,
              source: str = 'weights') -> LoadReport:
  """Assigns every parameter of `model` (in place; `nnx.eval_shape` models too) from
  `state_dict`, converted from the torch layout and cast to the parameter's dtype.

  Args:
    model: an `AutoencoderKL` whose sizes match the weights (see `infer_config`).
    state_dict: source key → array (numpy; anything with `.shape` and `.dtype` when `dry_run`).
    layout, prefix: as `detect_layout` returns; detected when None.
    dry_run: check names and shapes only; the model is left untouched.
    source: names the weights in error messages (e.g. the file path).

  Raises:
    ValueError: listing every missing, unexpected (inside the prefix, not `loss.*`) and
      mis-shaped or non-float key; nothing is assigned then.
  """
  if layout is None or prefix is None:
    detected = detect_layout(state_dict)
    layout, prefix = layout or detected[0], detected[1] if prefix is None else prefix
  missing, misshaped, updates, wanted = [], [], [], set()
  for path, variable in _params(model):
    key = prefix + source_name(path, layout, len(model.channels))
    wanted.add(key)
    shape = tuple(variable.get_value().shape)
    accepted = _source_shapes(shape)
    if key not in state_dict:
      missing.append(f'{key} {accepted[0]}')
      continue
    value = state_dict[key]
    if tuple(value.shape) not in accepted or not jnp.issubdtype(value.dtype, jnp.floating):
      misshaped.append(f'{key} is {tuple(value.shape)} {value.dtype}, expected {accepted[0]}')
      continue
    updates.append((key, variable, value))
  used = [key for key, _, _ in updates]
  ignored = [k for k in state_dict
             if not k.startswith(prefix) or k[len(prefix):].startswith(IGNORED_SUBTREES)]
  skip = wanted | set(ignored)
  unexpected = [f'{k} {tuple(np.shape(v))}' for k, v in state_dict.items() if k not in skip]
  if len(set(used)) != len(used):
    raise AssertionError(f'two parameters read the same key in layout {layout}')
  if missing or misshaped or unexpected:
    raise ValueError(_mismatch_message(source, layout, prefix, [
        ('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)]))
  if not dry_run:
    for _, variable, value in updates:
      converted = _to_nnx(np.asarray(value), variable.get_value().ndim)
      variable.set_value(jnp.asarray(converted, dtype=variable.get_value().dtype))
  return LoadReport(layout, prefix, tuple(used), tuple(ignored))


def export_state_dict(model: AutoencoderKL, layout: str = 'diffusers', *, prefix: str = '',
                      conv_attention: bool | None = None) -> dict[str, np.ndarray]:
  """The model's parameters as a torch-layout state dict in `layout` (the inverse of
  `load_into`); attention matrices as 1×1 convs when `conv_attention` (default: in 'ldm')."""
  conv_attention = layout == 'ldm' if conv_attention is None else conv_attention
  return {prefix + source_name(path, layout, len(model.channels)):
          _to_source(np.asarray(variable.get_value()), conv_attention)
          for path, variable in _params(model)}


def infer_config(state_dict: Mapping[str, np.ndarray], layout: str | None = None,
                 prefix: str | None = None) -> dict[str, Any]:
  """`AutoencoderKL` sizes from the tensor shapes: in_channels, channels (one per level),
  layers_per_block and latent_channels (GroupNorm groups cannot be seen in the shapes)."""
  if layout is None or prefix is None:
    layout, prefix = detect_layout(state_dict)
  pattern = re.compile(re.escape(prefix) + _BLOCK_PATTERNS.get(layout, _BLOCK_PATTERNS[
      'diffusers']) + '$')
  blocks = {}
  for key, value in state_dict.items():
    match = pattern.match(key)
    if match:
      blocks[int(match[1]), int(match[2])] = int(value.shape[0])
  try:
    channels = tuple(blocks[i, 0] for i in range(1 + max(i for i, _ in blocks)))
    layers = 1 + max(j for i, j in blocks if i == 0)
    in_channels = int(state_dict[prefix + 'encoder.conv_in.weight'].shape[1])
    latent_channels = int(state_dict[prefix + 'post_quant_conv.weight'].shape[0])
  except (KeyError, ValueError) as e:
    raise ValueError(f'cannot size the SD-VAE from its {layout} weights (prefix {prefix!r}): '
                     f'no {e} key or encoder blocks.') from e
  return dict(in_channels=in_channels, channels=channels, layers_per_block=layers,
              latent_channels=latent_channels)


def _metadata_float(metadata: Mapping[str, str], key: str, default: float) -> float:
  try:
    return float(metadata[key])
  except (KeyError, ValueError):
    return default


def load_sd_vae(path: str | os.PathLike | None, *, scale_factor: float | None = None,
                shift_factor: float | None = None, norm_groups: int = 32, dtype=jnp.float32,
                param_dtype=jnp.float32) -> AutoencoderKL:
  """An `AutoencoderKL` sized from and loaded with the SD-VAE weights file at `path`.

  Args:
    path: safetensors or torch file in any of `LAYOUTS` (see the module docstring).
    scale_factor, shift_factor: latent = (sample − shift) · scale; by default the file's
      safetensors metadata `scaling_factor` / `shift_factor` if present, else SD's 0.18215 / 0
      (SD3 and Flux VAEs need their own values: 1.5305 / 0.0609, 0.3611 / 0.1159).
    norm_groups: GroupNorm groups (32 in every SD-VAE).
    dtype, param_dtype: computation and parameter dtypes of the model.

  Raises:
    SDVAEWeightsNotFoundError (a FileNotFoundError): no file at `path`; the message says what
      to download and which config key to set.
    ValueError: unreadable file, or missing / unexpected / mis-shaped keys (all listed).
  """
  if not path or not os.path.isfile(path):
    raise SDVAEWeightsNotFoundError(
        f'SD-VAE weights not found at {path!r}. Download {SD_VAE_FILE} from {SD_VAE_URL} (or '
        'sd-vae-ft-mse; an LDM .ckpt works too) and set the config key '
        f'`{WEIGHTS_CONFIG_KEY}` to its path, e.g. '
        f'--{WEIGHTS_CONFIG_KEY}=/data/sd-vae-ft-ema/{SD_VAE_FILE}')
  path = os.fspath(path)
  state_dict = read_weights(path)
  layout, prefix = detect_layout(state_dict)
  config = infer_config(state_dict, layout, prefix)
  metadata = safetensors_io.read_metadata(path) if safetensors_io.is_safetensors(path) else {}
  if scale_factor is None:
    scale_factor = _metadata_float(metadata, 'scaling_factor', SD_SCALE_FACTOR)
  if shift_factor is None:
    shift_factor = _metadata_float(metadata, 'shift_factor', 0.0)
  model = nnx.eval_shape(lambda: AutoencoderKL(
      **config, norm_groups=norm_groups, scale_factor=scale_factor, shift_factor=shift_factor,
      dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  load_into(model, state_dict, layout=layout, prefix=prefix, source=path)
  return model
