"""Loads CLIP text-encoder weights (SD 1.x / 2.x / SDXL text encoders) into `ClipTextEncoder`.

Two key layouts are read, from a file the user gives (nothing is downloaded):
  * 'transformers': a `CLIPTextModel` / `CLIPTextModelWithProjection` / `CLIPModel` state dict
    (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N.self_attn.
    {q,k,v,out}_proj`, `layer_norm1/2`, `mlp.fc1/fc2`, `text_model.final_layer_norm`,
    `text_projection.weight` (P, D)); transformers 5 saves a bare `CLIPTextModel` without the
    `text_model.` prefix; inside an SD 1.x checkpoint it sits under
    `cond_stage_model.transformer.`, in SDXL's under `conditioner.embedders.0.transformer.`;
  * 'open_clip': OpenCLIP's text tower (`token_embedding.weight`, `positional_embedding`,
    `transformer.resblocks.N.attn.in_proj_weight` (3D, D: q, k, v stacked) / `in_proj_bias` /
    `out_proj`, `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_final`, `text_projection` (D, P),
    used as x @ P); in SD 2.x checkpoints under `cond_stage_model.model.`, SDXL's under
    `conditioner.embedders.1.model.`. The image tower (`visual.*`) and `logit_scale` are skipped.
Every NNX parameter is assigned from one source key (or one third of `in_proj_*`), each key is
used once; linear (out, in) → (in, out). Missing, unexpected (inside the encoder's prefix) or
mis-shaped keys are one error line naming the keys, the file and the preset whose sizes the
file has. Files: safetensors, or a `torch.save` pickle (`pytorch_model.bin`, `.ckpt`), read
without torch (`sd_vae_weights.read_weights`).
"""

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import errors
from guidedflow.models import clip_text
from guidedflow.models.sd_vae_weights import read_weights

LAYOUTS = ('transformers', 'open_clip')
_TEXT_MODEL = 'text_model.'
# Keys inside the encoder's scope that are not text-encoder parameters: transformers' position
# ids buffer (saved by versions before 4.31) and a full CLIPModel's image tower; OpenCLIP's
# image tower, temperature and (older versions') causal-mask buffer.
_IGNORED = {
    'transformers': ('text_model.embeddings.position_ids', 'embeddings.position_ids',
                     'vision_model.', 'visual_projection.', 'logit_scale'),
    'open_clip': ('visual.', 'logit_scale', 'logit_bias', 'attn_mask'),
}
_ANCHORS = {'transformers': 'embeddings.token_embedding.weight', 'open_clip': 'positional_embedding'}
_OPEN_CLIP_RULES = [
    (r'^token_embedding\.embedding$', 'token_embedding.weight'),
    (r'^position_embedding$', 'positional_embedding'),
    (r'^layers\.(\d+)\.', r'transformer.resblocks.\1.'),
    (r'\.self_attn\.[qkv]_proj\.kernel$', '.attn.in_proj_weight'),
    (r'\.self_attn\.[qkv]_proj\.bias$', '.attn.in_proj_bias'),
    (r'\.self_attn\.out_proj\.', '.attn.out_proj.'),
    (r'\.layer_norm1\.', '.ln_1.'), (r'\.layer_norm2\.', '.ln_2.'),
    (r'\.mlp\.fc1\.', '.mlp.c_fc.'), (r'\.mlp\.fc2\.', '.mlp.c_proj.'),
    (r'^final_layer_norm\.', 'ln_final.'),
    (r'^text_projection\.kernel$', 'text_projection'),
    (r'\.(kernel|scale)$', '.weight'),
]
_HF_RULES = [
    (r'^token_embedding\.embedding$', 'embeddings.token_embedding.weight'),
    (r'^position_embedding$', 'embeddings.position_embedding.weight'),
    (r'^layers\.', 'encoder.layers.'),
    (r'\.(kernel|scale)$', '.weight'),
]


class ClipTextWeightsNotFoundError(errors.DataError, FileNotFoundError):
  """No CLIP text-encoder weights file at the given path."""


class ClipTextWeightsMismatchError(errors.ConfigError):
  """The weights are not those of the named encoder (or of no CLIP text encoder)."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_into` read: `used_keys` (in model order, each once) and `ignored_keys`."""
  layout: str
  prefix: str
  used_keys: tuple[str, ...]
  ignored_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Target:
  key: str                     # full source key
  chunk: int | None            # which third of OpenCLIP's in_proj_*, else None
  variable: nnx.Variable
  transpose: bool              # torch linear (out, in) → (in, out)

  @property
  def source_shape(self) -> tuple[int, ...]:
    shape = tuple(self.variable.get_value().shape)
    shape = shape[::-1] if self.transpose else shape
    return shape if self.chunk is None else (3 * shape[0],) + shape[1:]


def _candidates(state_dict: Mapping[str, Any]) -> list[tuple[str, str]]:
  """(layout, prefix) of every CLIP text encoder in `state_dict`."""
  found = []
  for key in state_dict:
    for layout, anchor in _ANCHORS.items():
      if key == anchor or key.endswith('.' + anchor):
        prefix = key[:-len(anchor)]
        if layout == 'open_clip' and prefix + 'token_embedding.weight' not in state_dict:
          continue  # e.g. OpenCLIP's `visual.positional_embedding`
        found.append((layout, prefix))
  return sorted(set(found))


def detect_layout(state_dict: Mapping[str, Any], prefix: str | None = None,
                  source: str = 'weights') -> tuple[str, str]:
  """(layout, prefix) of the one CLIP text encoder in `state_dict` (the one under `prefix`).

  The prefix of the 'transformers' layout ends before `embeddings.` (e.g. 'text_model.' or
  'cond_stage_model.transformer.text_model.'); of 'open_clip' before `token_embedding`.

  Raises:
    ClipTextWeightsMismatchError: none, or several and no `prefix` to choose (SDXL checkpoints
      hold two: pass the prefix of the one wanted).
  """
  found = _candidates(state_dict)
  if prefix is not None:
    found = [(layout, p) for layout, p in found if p == prefix]
  if len(found) != 1:
    listed = ', '.join(f'{p!r} ({layout})' for layout, p in found) or 'none'
    anchors = ' or '.join(f"'{a}'" for a in _ANCHORS.values())
    hint = ('pass prefix= one of them' if found else
            f'no key ends with {anchors}' + ('' if prefix is None else f' under {prefix!r}'))
    raise ClipTextWeightsMismatchError(
        f'{source}: expected one CLIP text encoder in the weights, found {listed}: {hint}.')
  return found[0]


def _scope(layout: str, prefix: str) -> str:
  """The prefix of the encoder's whole state dict (its projection sits beside `text_model.`)."""
  if layout == 'transformers' and (prefix == _TEXT_MODEL or prefix.endswith('.' + _TEXT_MODEL)):
    return prefix[:-len(_TEXT_MODEL)]
  return prefix


def source_name(path: tuple[Any, ...], layout: str) -> tuple[str, int | None]:
  """(source key without prefix, in_proj third) of the NNX parameter at `path`, e.g.
  ('layers', 0, 'self_attn', 'k_proj', 'kernel') → ('transformer.resblocks.0.attn.
  in_proj_weight', 1) in 'open_clip', ('encoder.layers.0.self_attn.k_proj.weight', None) in
  'transformers'. The transformers projection is relative to the scope, not `text_model.`."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  name = '.'.join(str(p) for p in path)
  chunk = None
  if layout == 'open_clip':
    match = re.search(r'\.self_attn\.([qkv])_proj\.', name)
    chunk = 'qkv'.index(match[1]) if match else None
  if layout == 'transformers' and name == 'text_projection.kernel':
    return 'text_projection.weight', None
  for pattern, replacement in (_OPEN_CLIP_RULES if layout == 'open_clip' else _HF_RULES):
    name = re.sub(pattern, replacement, name)
  return name, chunk


def _targets(model: clip_text.ClipTextEncoder, layout: str, prefix: str) -> list[_Target]:
  targets = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Param):
      continue
    name, chunk = source_name(path, layout)
    projection = path[0] == 'text_projection'
    base = _scope(layout, prefix) if projection else prefix
    transpose = path[-1] == 'kernel' and not (projection and layout == 'open_clip')
    targets.append(_Target(base + name, chunk, node, transpose))
  return targets


def _listed(items: list[str], title: str, limit: int = 3) -> str:
  more = f' and {len(items) - limit} more' if len(items) > limit else ''
  return f'{len(items)} {title}: ' + ', '.join(items[:limit]) + more


def _check(targets, state_dict, layout, prefix) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, mis-shaped) descriptions; ignored keys are not unexpected."""
  missing, misshaped, wanted = [], [], set()
  for target in targets:
    wanted.add(target.key)
    if target.key not in state_dict:
      if target.chunk in (None, 0):
        missing.append(f'{target.key} {target.source_shape}')
      continue
    value = state_dict[target.key]
    if tuple(value.shape) != target.source_shape or not jnp.issubdtype(value.dtype, jnp.floating):
      misshaped.append(f'{target.key} is {tuple(value.shape)} {value.dtype}, expected '
                       f'{target.source_shape}')
  scope = _scope(layout, prefix)
  unexpected = [f'{k} {tuple(np.shape(v))}' for k, v in state_dict.items()
                if k.startswith(scope) and k not in wanted
                and not k[len(scope):].startswith(_IGNORED[layout])]
  return missing, unexpected, list(dict.fromkeys(misshaped))


def infer_sizes(state_dict: Mapping[str, Any], layout: str, prefix: str) -> dict[str, Any]:
  """The sizes the weights show: width, layers, vocab_size, max_length, mlp_dim,
  projection_dim (None without a projection); heads and the activation are not in the shapes."""
  names = dict(transformers=('embeddings.token_embedding.weight',
                             'embeddings.position_embedding.weight',
                             r'encoder\.layers\.(\d+)\.mlp\.fc1\.weight'),
               open_clip=('token_embedding.weight', 'positional_embedding',
                          r'transformer\.resblocks\.(\d+)\.mlp\.c_fc\.weight'))[layout]
  vocab, width = state_dict[prefix + names[0]].shape
  fc1 = {int(m[1]): v.shape for k, v in state_dict.items()
         if (m := re.fullmatch(re.escape(prefix) + names[2], k))}
  projection = _scope(layout, prefix) + ('text_projection' if layout == 'open_clip'
                                         else 'text_projection.weight')
  proj = state_dict.get(projection)
  return dict(width=int(width), layers=len(fc1), vocab_size=int(vocab),
              max_length=int(state_dict[prefix + names[1]].shape[0]),
              mlp_dim=int(fc1[0][0]) if fc1 else None,
              projection_dim=None if proj is None else int(
                  proj.shape[1] if layout == 'open_clip' else proj.shape[0]))


_SIZES = ('width', 'layers', 'vocab_size', 'max_length', 'mlp_dim')


def _sizes_problem(state_dict, layout, prefix, config) -> str | None:
  """Why the weights are another encoder's (their sizes and the preset they match), or None
  when their sizes are `config`'s (or cannot be read)."""
  try:
    sizes = infer_sizes(state_dict, layout, prefix)
  except (KeyError, ValueError, IndexError):
    return None
  if all(getattr(config, f) == sizes[f] for f in _SIZES):
    return None
  names = [n for n, c in clip_text.CONFIGS.items() if all(getattr(c, f) == sizes[f]
                                                          for f in _SIZES)]
  fix = (f"load them as {' or '.join(repr(n) for n in names)}" if names else
         'pass a clip_text.ClipTextConfig with these sizes')
  wanted = ', '.join(f'{f}={getattr(config, f)}' for f in _SIZES)
  held = ', '.join(f'{f}={sizes[f]}' for f in _SIZES + ('projection_dim',))
  return f'it has {wanted}, the file holds {held}: {fix}'


def load_into(model: clip_text.ClipTextEncoder, state_dict: Mapping[str, np.ndarray], *,
              layout: str | None = None, prefix: str | None = None, dry_run: bool = False,
              source: str = 'weights', encoder: str = 'model') -> LoadReport:
  """Assigns every parameter of `model` (in place; `nnx.eval_shape` models too) from
  `state_dict`, converted from the torch layout and cast to the parameter's dtype.

  Args:
    model: a `ClipTextEncoder` whose config matches the weights.
    state_dict: source key → array (numpy; anything with `.shape` and `.dtype` when `dry_run`).
    layout, prefix: as `detect_layout` returns; detected when None.
    dry_run: check names and shapes only; the model is left untouched.
    source, encoder: name the file and the encoder in error messages.

  Raises:
    ClipTextWeightsMismatchError (a ConfigError): one line: the file's sizes and the preset
      they match when they are not the model's, else the missing, unexpected and mis-shaped
      keys; nothing is assigned then.
  """
  if layout is None or prefix is None:
    layout, prefix = detect_layout(state_dict, prefix, source)
  targets = _targets(model, layout, prefix)
  missing, unexpected, misshaped = _check(targets, state_dict, layout, prefix)
  if missing or unexpected or misshaped:
    problems = _sizes_problem(state_dict, layout, prefix, model.config) or '; '.join(
        _listed(items, title) for items, title in (
            (missing, 'missing'), (unexpected, 'unexpected'), (misshaped, 'mis-shaped')) if items)
    raise ClipTextWeightsMismatchError(
        f'{source}: the weights ({layout} layout, prefix {prefix!r}) do not match the CLIP text '
        f'encoder {encoder}: {problems}.')
  if not dry_run:
    for target in targets:
      value = np.asarray(state_dict[target.key])
      if target.chunk is not None:
        value = np.split(value, 3, axis=0)[target.chunk]
      value = value.T if target.transpose else value
      target.variable.set_value(jnp.asarray(value, dtype=target.variable.get_value().dtype))
  used = tuple(dict.fromkeys(t.key for t in targets))
  scope = _scope(layout, prefix)
  ignored = tuple(k for k in state_dict if k not in used)
  assert all(not k.startswith(scope) or k[len(scope):].startswith(_IGNORED[layout])
             for k in ignored)
  return LoadReport(layout, prefix, used, ignored)


def expected_shapes(model: clip_text.ClipTextEncoder, layout: str = 'transformers', *,
                    prefix: str | None = None) -> dict[str, tuple[int, ...]]:
  """Source key → shape of the weights `model` reads in `layout` (`nnx.eval_shape` models too);
  prefix as in `export_state_dict`."""
  prefix = (_TEXT_MODEL if layout == 'transformers' else '') if prefix is None else prefix
  return {t.key: t.source_shape for t in _targets(model, layout, prefix)}


def export_state_dict(model: clip_text.ClipTextEncoder, layout: str = 'transformers', *,
                      prefix: str | None = None) -> dict[str, np.ndarray]:
  """The model's parameters as a torch-layout state dict (the inverse of `load_into`); the
  default prefix is 'text_model.' in 'transformers' (CLIPTextModelWithProjection's), '' else."""
  prefix = (_TEXT_MODEL if layout == 'transformers' else '') if prefix is None else prefix
  out: dict[str, list] = {}
  for target in _targets(model, layout, prefix):  # q, k, v come in any order: place by chunk
    value = np.asarray(target.variable.get_value())
    parts = out.setdefault(target.key, [None] * (1 if target.chunk is None else 3))
    parts[target.chunk or 0] = value.T if target.transpose else value
  return {k: np.ascontiguousarray(np.concatenate(v) if len(v) > 1 else v[0])
          for k, v in out.items()}


def load_clip_text(path: str | os.PathLike, encoder: str | clip_text.ClipTextConfig = (
    'openai-vit-l-14'), *, prefix: str | None = None, dtype=jnp.float32,
                   param_dtype=jnp.float32) -> clip_text.ClipTextEncoder:
  """The CLIP text encoder `encoder` (a `clip_text.CONFIGS` name or a config) loaded from the
  weights file at `path` (any layout, see the module docstring; `prefix` picks one encoder of
  a checkpoint holding several, as SDXL's). A file without a text projection (SD's
  `CLIPTextModel`) gives a model without one (`text_embeds` None).

  Raises:
    ClipTextWeightsNotFoundError (a DataError and FileNotFoundError): no file at `path`.
    ClipTextWeightsMismatchError (a ConfigError): the weights are not `encoder`'s.
  """
  if not path or not os.path.isfile(path):
    raise ClipTextWeightsNotFoundError(
        f'CLIP text-encoder weights not found at {path!r}: give the path of the text encoder\'s '
        'model.safetensors (e.g. text_encoder/model.safetensors of an SD repository), '
        'pytorch_model.bin or an OpenCLIP open_clip_model.safetensors.')
  path = os.fspath(path)
  name = encoder if isinstance(encoder, str) else 'config'
  config = clip_text.get_config(encoder) if isinstance(encoder, str) else encoder
  state_dict = read_weights(path)
  layout, prefix = detect_layout(state_dict, prefix, path)
  projection_key = _scope(layout, prefix) + (
      'text_projection' if layout == 'open_clip' else 'text_projection.weight')
  if projection_key not in state_dict:
    config = dataclasses.replace(config, projection_dim=None)
  model = nnx.eval_shape(lambda: clip_text.ClipTextEncoder(
      config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  load_into(model, state_dict, layout=layout, prefix=prefix, source=path, encoder=repr(name))
  return model
