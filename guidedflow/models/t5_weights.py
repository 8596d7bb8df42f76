"""Loads transformers' `T5EncoderModel` safetensors weights into `t5_encoder.T5Encoder`.

Files, from a path the user gives (nothing is downloaded): `model.safetensors`, or the shards
`model-0000X-of-0000Y.safetensors` named by `model.safetensors.index.json`, or a folder with
either (and the `config.json` that sizes the encoder). Shards are read one at a time and
released after their tensors are placed, so loading T5-XXL (19 GB in f32) needs the model plus
one shard of host memory, not twice the model.

Key map (every NNX parameter from exactly one key; torch Linear (out, in) → kernel (in, out)):
  shared.weight (= encoder.embed_tokens.weight, tied)      → embed.embedding
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight → relative_attention_bias
  encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight   → blocks[N].attention.{q,k,v,o}
  encoder.block.N.layer.0.layer_norm.weight                → blocks[N].attention_norm.weight
  encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight → blocks[N].feed_forward.*
  encoder.block.N.layer.1.layer_norm.weight                → blocks[N].feed_forward_norm.weight
  encoder.final_layer_norm.weight                          → final_norm.weight
`encoder.embed_tokens.weight` may stand in for `shared.weight` or sit beside it (both are the
one tied table); the decoder and `lm_head` of a full T5 checkpoint are ignored. Any other key,
a missing key or a shape of another encoder size is a `T5WeightsMismatchError`: one line that
names the file, the first keys and the fix.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow.models import safetensors_io, t5_encoder
from guidedflow.models.t5_encoder import T5Config, T5Encoder

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
CONFIG_FILE = 'config.json'
T5_URL = 'https://huggingface.co/google/t5-v1_1-xxl'
EMBEDDING_KEY, TIED_EMBEDDING_KEY = 'shared.weight', 'encoder.embed_tokens.weight'
IGNORED_PREFIXES = ('decoder.', 'lm_head.')  # the rest of a full T5ForConditionalGeneration
_MODULE_NAMES = {'attention': 'layer.0.SelfAttention', 'attention_norm': 'layer.0.layer_norm',
                 'feed_forward': 'layer.1.DenseReluDense',
                 'feed_forward_norm': 'layer.1.layer_norm'}


class T5WeightsNotFoundError(errors.DataError, FileNotFoundError):
  """No T5 encoder weights (or one of their shards) where they were looked for."""


class T5WeightsMismatchError(errors.ConfigError):
  """The weights are not those of the configured encoder (missing, unexpected, mis-shaped keys)."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_into` read: `files` (in reading order), `used_keys` (one per NNX parameter, in
  model order, plus a tied embedding alias) and `ignored_keys` (decoder, lm_head)."""
  files: tuple[str, ...]
  used_keys: tuple[str, ...]
  ignored_keys: tuple[str, ...]


def source_name(path: tuple[Any, ...]) -> str:
  """The `T5EncoderModel` key of the NNX parameter at `path`, e.g. ('blocks', 3, 'feed_forward',
  'wi_0', 'kernel') → 'encoder.block.3.layer.1.DenseReluDense.wi_0.weight'."""
  parts = tuple(str(p) for p in path)
  if parts == ('embed', 'embedding'):
    return EMBEDDING_KEY
  if parts == ('relative_attention_bias',):
    return 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
  if parts == ('final_norm', 'weight'):
    return 'encoder.final_layer_norm.weight'
  if len(parts) >= 4 and parts[0] == 'blocks' and parts[2] in _MODULE_NAMES:
    inner = '.'.join(parts[3:-1] + ('weight',))
    return f'encoder.block.{parts[1]}.{_MODULE_NAMES[parts[2]]}.{inner}'
  raise ValueError(f'no T5EncoderModel key for the parameter {"/".join(parts)}')


# ----------------------------------------------------------------------------------------------
# Files.


def weight_files(path: str | os.PathLike) -> dict[str, list[str] | None]:
  """Weight file → its keys (from the index; None for an unsharded file, read whole).

  `path` is a `.safetensors` file, a `model.safetensors.index.json`, or a folder holding
  `model.safetensors` or the index.

  Raises:
    T5WeightsNotFoundError: no such file, no weights in the folder, or a shard the index names
      is missing.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in (WEIGHTS_FILE, INDEX_FILE):
      if os.path.isfile(os.path.join(path, name)):
        return weight_files(os.path.join(path, name))
    raise T5WeightsNotFoundError(
        f'T5 encoder weights not found: {path} has no {WEIGHTS_FILE} or {INDEX_FILE}. Download '
        f'the T5EncoderModel checkpoint (e.g. {T5_URL}, or text_encoder_3/ of SD3) and pass its '
        'folder.')
  if not os.path.isfile(path):
    raise T5WeightsNotFoundError(f'T5 encoder weights not found at {path}: download '
                                 f'{WEIGHTS_FILE} (or the shards and {INDEX_FILE}) from {T5_URL}.')
  if not path.endswith('.json'):
    return {path: None}
  try:
    with open(path, encoding='utf-8') as f:
      weight_map = json.load(f)['weight_map']
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise errors.DataError(f'{path}: not a safetensors index (no "weight_map": '
                           f'{errors.one_line(e)}); download {INDEX_FILE} again.') from e
  files: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    files.setdefault(os.path.join(os.path.dirname(path), shard), []).append(key)
  for shard in files:
    if not os.path.isfile(shard):
      raise T5WeightsNotFoundError(f'{path} names the shard {shard}, which is missing: download '
                                   'every shard the index lists into its folder.')
  return files


# ----------------------------------------------------------------------------------------------
# Conversion.


def _expected(model: T5Encoder) -> dict[str, tuple[tuple, nnx.Variable, tuple[int, ...]]]:
  """Source key → (NNX path, variable, source shape (torch layout))."""
  table = {}
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      shape = tuple(variable.get_value().shape)
      is_kernel = str(path[-1]) == 'kernel'
      table[source_name(path)] = (path, variable, shape[::-1] if is_kernel else shape)
  return table


def _mismatch(source: str, config: T5Config, problems: list[tuple[str, list[str]]],
              limit: int = 3) -> T5WeightsMismatchError:
  found = []
  for title, items in problems:
    if items:
      more = f' and {len(items) - limit} more' if len(items) > limit else ''
      found.append(f'{len(items)} {title} ({"; ".join(items[:limit])}{more})')
  sizes = (f'd_model {config.d_model}, {config.num_layers} layers, {config.num_heads} heads, '
           f'd_ff {config.d_ff}, vocab {config.vocab_size}')
  return T5WeightsMismatchError(
      f'{source}: not the weights of the configured T5 v1.1 encoder ({sizes}): '
      f'{", ".join(found)}; use the preset or config.json of this checkpoint, or the weights of '
      'the configured encoder.')


def _check_keys(files: Mapping[str, list[str] | None], first: Mapping[str, np.ndarray] | None,
                expected: Mapping[str, Any], config: T5Config,
                source: str) -> tuple[list[str], bool]:
  """(ignored keys, whether `encoder.embed_tokens.weight` stands in for the absent
  `shared.weight`); raises on missing or unexpected keys (before any tensor is placed)."""
  keys = [k for file, names in files.items()
          for k in (names if names is not None else list(first or {}))]
  ignored = [k for k in keys if k.startswith(IGNORED_PREFIXES)]
  present = set(keys)
  allowed = set(expected) | {TIED_EMBEDDING_KEY}
  unexpected = [k for k in keys if k not in allowed and not k.startswith(IGNORED_PREFIXES)]
  missing = [k for k in expected if k not in present
             and not (k == EMBEDDING_KEY and TIED_EMBEDDING_KEY in present)]
  if missing or unexpected:
    raise _mismatch(source, config, [('missing', missing), ('unexpected', unexpected)])
  return ignored, EMBEDDING_KEY not in present


def _to_nnx(value: np.ndarray, is_kernel: bool) -> np.ndarray:
  return value.T if is_kernel else value


def load_into(model: T5Encoder, path: str | os.PathLike, *,
              put: Callable[[tuple, np.ndarray, Any], jax.Array] | None = None) -> LoadReport:
  """Assigns every parameter of `model` (in place; `nnx.eval_shape` models too) from the
  weights at `path` (see `weight_files`), shard by shard, cast to the parameter dtype.

  Args:
    model: a `T5Encoder` of the checkpoint's sizes.
    path: `model.safetensors`, the index json, or their folder.
    put: (NNX path, numpy value, dtype) → array; default `jnp.asarray(value, dtype)`. Pass e.g.
      `lambda p, v, d: jax.device_put(v.astype(d), shardings[p])` to place each parameter in
      its FSDP shards directly.

  Raises:
    T5WeightsNotFoundError: see `weight_files`.
    T5WeightsMismatchError: missing or unexpected keys (checked before anything is assigned),
      or a mis-shaped or non-float tensor (checked per shard, before that shard is assigned).
  """
  put = put or (lambda _, value, dtype: jnp.asarray(value, dtype=dtype))
  files = weight_files(path)
  source = os.fspath(path)
  expected = _expected(model)
  first_file = next(iter(files))
  first = safetensors_io.read_safetensors(first_file) if files[first_file] is None else None
  ignored, tied_alias = _check_keys(files, first, expected, model.config, source)
  used = []
  for file in files:
    tensors = first if first is not None else safetensors_io.read_safetensors(file)
    first = None
    updates, misshaped = [], []
    for key, value in tensors.items():
      if key == TIED_EMBEDDING_KEY:
        used.append(key)  # the tied table: read only when shared.weight is absent
        if tied_alias:
          key = EMBEDDING_KEY
        elif tuple(value.shape) != expected[EMBEDDING_KEY][2]:
          misshaped.append(f'{key} is {tuple(value.shape)}, expected {expected[EMBEDDING_KEY][2]}')
          continue
        else:
          continue
      if key not in expected:
        continue
      nnx_path, variable, shape = expected[key]
      if tuple(value.shape) != shape or not jnp.issubdtype(value.dtype, jnp.floating):
        misshaped.append(f'{key} is {tuple(value.shape)} {value.dtype}, expected {shape}')
      updates.append((key, nnx_path, variable, value))
    if misshaped:
      raise _mismatch(file, model.config, [('mis-shaped', misshaped)])
    for key, nnx_path, variable, value in updates:
      dtype = variable.get_value().dtype
      variable.set_value(put(nnx_path, _to_nnx(value, str(nnx_path[-1]) == 'kernel'), dtype))
      used.append(key)
    del tensors, updates
  order = {key: i for i, key in enumerate(expected)}
  used.sort(key=lambda k: order.get(k, len(order)))
  return LoadReport(tuple(files), tuple(used), tuple(ignored))


def export_state_dict(model: T5Encoder) -> dict[str, np.ndarray]:
  """The model's parameters as a `T5EncoderModel` state dict (the inverse of `load_into`)."""
  return {key: np.ascontiguousarray(_to_nnx(np.asarray(variable.get_value()),
                                            str(path[-1]) == 'kernel'))
          for key, (path, variable, _) in _expected(model).items()}


def read_config(path: str | os.PathLike, **overrides: Any) -> T5Config:
  """The `T5Config` of the checkpoint at `path` from the `config.json` beside its weights."""
  path = os.fspath(path)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_file = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise T5WeightsNotFoundError(
        f'{config_file} not found: download the config.json of the T5 checkpoint ({T5_URL}) '
        "beside its weights, or name the encoder's preset (e.g. 't5-v1_1-xxl').")
  return t5_encoder.config_from_hf(config_file, **overrides)


def load_t5_encoder(path: str | os.PathLike, config: T5Config | str | None = None, *,
                    dtype=jnp.float32, param_dtype=jnp.float32, **overrides: Any) -> T5Encoder:
  """A `T5Encoder` loaded from the checkpoint at `path` (file or folder).

  Args:
    path: see `weight_files`.
    config: a `T5Config`, a preset name, or None for the checkpoint's `config.json`.
    dtype, param_dtype: see `T5Encoder`.
    **overrides: `T5Config` fields, e.g. `max_length=256`.
  """
  weight_files(path)  # missing weights are reported before a missing config.json
  if config is None:
    config = read_config(path, **overrides)
  elif isinstance(config, str):
    config = t5_encoder.get_config(config, **overrides)
  elif overrides:
    config = dataclasses.replace(config, **overrides)
  model = nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype,
                                           rngs=nnx.Rngs(0)))
  load_into(model, path)
  return model

