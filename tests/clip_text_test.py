"""CLIP text encoder: parity with transformers 5 on tiny random models, both weight layouts,
the tokenizer's ids, one-line errors, and that a wrong key map, mask, ε or pooling is caught.

The fixtures in tests/fixtures/clip/ are made by tests/fixtures/make_clip_fixtures.py with
PyTorch `transformers` (not needed here): a quick-GELU model with the legacy eos_token_id 2
('a': pooled at argmax(ids)) and a GELU one with a real eos id ('b'), the latter also in
OpenCLIP's layout, and transformers' outputs on a batch with a truncated caption, EOS padding,
an added-token id past the eos, without and with the attention mask.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from guidedflow import errors
from guidedflow.models import clip_text, clip_text_weights, clip_tokenizer, safetensors_io
from guidedflow.models import torch_weights
from guidedflow.models.layers import param_count

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip')
MODELS = {'a': 'a_quick_gelu', 'b': 'b_gelu'}
TOLERANCE = 1e-5
OUTPUTS = ('last_hidden_state', 'penultimate', 'pooler_output', 'text_embeds')


@pytest.fixture(scope='module')
def expected():
  with np.load(os.path.join(FIXTURES, 'expected.npz')) as data:
    return dict(data)


@pytest.fixture(scope='module')
def info():
  with open(os.path.join(FIXTURES, 'info.json')) as f:
    return json.load(f)


def _path(name: str, file: str = 'model.safetensors') -> str:
  return os.path.join(FIXTURES, MODELS[name], file)


def _config(name: str, **overrides) -> clip_text.ClipTextConfig:
  return clip_text.config_from_hf(_path(name, 'config.json'), **overrides)


def _state_dict(name: str, file: str = 'model.safetensors') -> dict[str, np.ndarray]:
  return safetensors_io.read_safetensors(_path(name, file))


def _outputs(model, ids, mask=None) -> dict[str, np.ndarray]:
  out = nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), mask)
  return {'last_hidden_state': out.last_hidden_state, 'penultimate': out.penultimate_hidden_state,
          'pooler_output': out.pooled, 'text_embeds': out.text_embeds}


def _errors(actual: dict, expected: dict, prefix: str, rows=slice(None)) -> dict[str, float]:
  return {k: float(np.abs(np.asarray(v)[rows] - expected[f'{prefix}_{k}'][rows]).max())
          for k, v in actual.items() if v is not None}


def _worst(model, expected, name, masked=False, rows=slice(None)) -> float:
  mask = expected['mask'] if masked else None
  prefix = name + ('_masked' if masked else '')
  return max(_errors(_outputs(model, expected['ids'], mask), expected, prefix, rows).values())


def _loaded(name: str, state_dict=None, **overrides) -> clip_text.ClipTextEncoder:
  model = clip_text.ClipTextEncoder(_config(name, **overrides), rngs=nnx.Rngs(0))
  clip_text_weights.load_into(model, _state_dict(name) if state_dict is None else state_dict)
  return model


# ----------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize('name', ['a', 'b'])
@pytest.mark.parametrize('masked', [False, True])
def test_transformers_layout_matches_transformers(expected, name, masked):
  model = clip_text_weights.load_clip_text(_path(name), _config(name))
  mask = expected['mask'] if masked else None
  prefix = name + ('_masked' if masked else '')
  errs = _errors(_outputs(model, expected['ids'], mask), expected, prefix)
  assert set(errs) == set(OUTPUTS)
  assert max(errs.values()) < TOLERANCE, errs


@pytest.mark.parametrize('masked', [False, True])
def test_open_clip_layout_matches_transformers(expected, masked):
  # OpenCLIP pools at argmax(ids): transformers' rule for eos_token_id 2.
  model = clip_text_weights.load_clip_text(_path('b', 'open_clip_model.safetensors'),
                                           _config('b', eos_token_id=2))
  mask = expected['mask'] if masked else None
  out = _outputs(model, expected['ids'], mask)
  prefix = 'b_masked' if masked else 'b'
  errs = _errors({k: out[k] for k in ('last_hidden_state', 'penultimate')}, expected, prefix)
  errs.update(_errors({k: out[k] for k in ('pooler_output', 'text_embeds')}, expected,
                      'b_argmax'))
  assert max(errs.values()) < TOLERANCE, errs


def test_pytorch_bin_and_checkpoint_prefixes(expected, tmp_path, info):
  state_dict = _state_dict('a')
  torch_weights.save_state_dict(state_dict, tmp_path / 'pytorch_model.bin')
  model = clip_text_weights.load_clip_text(tmp_path / 'pytorch_model.bin', _config('a'))
  assert _worst(model, expected, 'a') < TOLERANCE
  # transformers 5 saves a bare CLIPTextModel without 'text_model.' (and no projection).
  bare = {k.removeprefix('text_model.'): v for k, v in state_dict.items()
          if k.startswith('text_model.')}
  assert sorted(bare) == info['transformers_5_clip_text_model_keys']
  safetensors_io.save_safetensors(bare, tmp_path / 'bare.safetensors')
  model = clip_text_weights.load_clip_text(tmp_path / 'bare.safetensors', _config('a'))
  assert model.text_projection is None
  out = _outputs(model, expected['ids'])
  assert out['text_embeds'] is None
  assert max(_errors(out, expected, 'a').values()) < TOLERANCE
  # Inside an SD 1.x checkpoint, with the U-Net beside it (ignored).
  sd = {'cond_stage_model.transformer.' + k: v for k, v in state_dict.items()}
  sd['model.diffusion_model.out.0.weight'] = np.zeros(4, np.float32)
  report = clip_text_weights.load_into(clip_text.ClipTextEncoder(_config('a'), rngs=nnx.Rngs(1)),
                                       sd, dry_run=True)
  assert report.prefix == 'cond_stage_model.transformer.text_model.'
  assert report.ignored_keys == ('model.diffusion_model.out.0.weight',)
  assert len(report.used_keys) == len(state_dict)


def test_sdxl_checkpoint_needs_the_prefix_of_one_encoder():
  sdxl = {'conditioner.embedders.0.transformer.' + k: v for k, v in _state_dict('a').items()}
  sdxl.update({'conditioner.embedders.1.model.' + k: v
               for k, v in _state_dict('b', 'open_clip_model.safetensors').items()})
  with pytest.raises(clip_text_weights.ClipTextWeightsMismatchError) as e:
    clip_text_weights.detect_layout(sdxl, source='sd_xl_base_1.0.safetensors')
  assert "'conditioner.embedders.1.model.' (open_clip)" in str(e.value)
  assert 'pass prefix=' in str(e.value) and '\n' not in str(e.value)
  model = clip_text.ClipTextEncoder(_config('b', eos_token_id=2), rngs=nnx.Rngs(0))
  report = clip_text_weights.load_into(model, sdxl, prefix='conditioner.embedders.1.model.')
  assert report.layout == 'open_clip'
  assert 'conditioner.embedders.1.model.logit_scale' in report.ignored_keys


@pytest.mark.parametrize('layout', ['transformers', 'open_clip'])
def test_export_is_the_inverse_of_load(layout):
  name, file = ('a', 'model.safetensors') if layout == 'transformers' else (
      'b', 'open_clip_model.safetensors')
  source = _state_dict(name, file)
  model = _loaded(name, source, **({'eos_token_id': 2} if layout == 'open_clip' else {}))
  exported = clip_text_weights.export_state_dict(model, layout)
  skipped = {'logit_scale', 'visual.class_embedding'}
  assert set(exported) == set(source) - skipped
  for key, value in exported.items():
    np.testing.assert_array_equal(value, source[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# A wrong port fails: each perturbation is caught by the parity comparison.


def _swapped(state_dict, a, b):
  out = dict(state_dict)
  out[a], out[b] = state_dict[b], state_dict[a]
  return out


def test_wrong_key_map_is_caught(expected):
  layer = 'text_model.encoder.layers.1.'
  for a, b in [('self_attn.q_proj.weight', 'self_attn.k_proj.weight'),
               ('layer_norm1.weight', 'layer_norm2.weight'),
               ('layer_norm1.bias', 'layer_norm2.bias')]:
    model = _loaded('a', _swapped(_state_dict('a'), layer + a, layer + b))
    assert _worst(model, expected, 'a') > 100 * TOLERANCE, (a, b)
  oc = _state_dict('b', 'open_clip_model.safetensors')
  key = 'transformer.resblocks.0.attn.in_proj_weight'
  q, k, v = np.split(oc[key], 3)
  oc[key] = np.concatenate([k, q, v])  # in_proj read as k, q, v
  assert _worst(_loaded('b', oc, eos_token_id=2), expected, 'b', rows=slice(0, 3)) > 100 * TOLERANCE
  oc = _state_dict('b', 'open_clip_model.safetensors')
  oc['text_projection'] = oc['text_projection'].T  # (P, D): transformers' orientation
  with pytest.raises(clip_text_weights.ClipTextWeightsMismatchError, match="'text_projection'|"
                     r'text_projection is \(20, 24\)'):
    _loaded('b', oc, eos_token_id=2)


def test_wrong_config_is_caught(expected):
  assert _worst(_loaded('a', layer_norm_eps=1e-6), expected, 'a') > 100 * TOLERANCE
  assert _worst(_loaded('b', layer_norm_eps=1e-5), expected, 'b') > 100 * TOLERANCE
  assert _worst(_loaded('a', activation='gelu'), expected, 'a') > 100 * TOLERANCE
  assert _worst(_loaded('b', activation='quick_gelu'), expected, 'b') > 100 * TOLERANCE
  shifted = _loaded('a')
  shifted.position_embedding.set_value(jnp.roll(shifted.position_embedding[...], 1, axis=0))
  assert _worst(shifted, expected, 'a') > 100 * TOLERANCE


def test_masks_and_pooling_rule_are_caught(expected, monkeypatch):
  model = _loaded('b')
  # The attention mask changes the padded positions' outputs; ignoring it is caught.
  unmasked = _outputs(model, expected['ids'])
  assert _errors(unmasked, expected, 'b_masked')['last_hidden_state'] > 100 * TOLERANCE
  # The pooling rule: the last row has an added token (id past the eos) before its eos.
  legacy = _loaded('b', eos_token_id=2)
  errs = _errors(_outputs(legacy, expected['ids']), expected, 'b', rows=3)
  assert errs['pooler_output'] > 100 * TOLERANCE
  errs = _errors(_outputs(legacy, expected['ids']), expected, 'b', rows=slice(0, 3))
  assert max(errs.values()) < TOLERANCE  # elsewhere argmax(ids) is the first eos
  # Without the causal mask.
  monkeypatch.setattr(clip_text, 'causal_mask', lambda n: jnp.ones((1, 1, n, n), bool))
  assert _worst(_loaded('a'), expected, 'a') > 100 * TOLERANCE


# ----------------------------------------------------------------------------------------------
# Errors: one line each, naming the file and the fix.


def _one_line(error: BaseException) -> str:
  text = str(error)
  assert '\n' not in text, text
  return text


def test_weights_errors_are_one_line(tmp_path):
  state_dict = _state_dict('a')
  del state_dict['text_model.encoder.layers.1.layer_norm2.bias']
  safetensors_io.save_safetensors(state_dict, tmp_path / 'model.safetensors')
  with pytest.raises(errors.ConfigError) as e:
    clip_text_weights.load_clip_text(tmp_path / 'model.safetensors', _config('a'))
  text = _one_line(e.value)
  assert str(tmp_path / 'model.safetensors') in text
  assert '1 missing: text_model.encoder.layers.1.layer_norm2.bias (32,)' in text
  # Weights of another encoder than the one named: the sizes in the file are named.
  with pytest.raises(clip_text_weights.ClipTextWeightsMismatchError) as e:
    clip_text_weights.load_clip_text(_path('a'), 'openai-vit-l-14')
  text = _one_line(e.value)
  assert "'openai-vit-l-14': it has width=768, layers=12" in text
  assert 'the file holds width=32, layers=2, vocab_size=153, max_length=16, mlp_dim=64' in text
  # ... and a preset's weights under another preset's name: the right preset is named.
  vit_h = nnx.eval_shape(lambda: clip_text.ClipTextEncoder('openclip-vit-h-14', rngs=nnx.Rngs(0)))
  big = {k: jax.ShapeDtypeStruct(shape, jnp.float32)
         for k, shape in clip_text_weights.expected_shapes(vit_h, 'open_clip').items()}
  model = nnx.eval_shape(lambda: clip_text.ClipTextEncoder('openai-vit-l-14', rngs=nnx.Rngs(0)))
  with pytest.raises(clip_text_weights.ClipTextWeightsMismatchError) as e:
    clip_text_weights.load_into(model, big, dry_run=True, source='open_clip_model.safetensors')
  assert "load them as 'openclip-vit-h-14'" in _one_line(e.value)
  with pytest.raises(clip_text_weights.ClipTextWeightsNotFoundError) as e:
    clip_text_weights.load_clip_text(tmp_path / 'nothing.safetensors')
  assert 'nothing.safetensors' in _one_line(e.value) and isinstance(e.value, errors.DataError)
  safetensors_io.save_safetensors({'unet.weight': np.zeros(2, np.float32)}, tmp_path / 'u.st')
  with pytest.raises(errors.ConfigError) as e:
    clip_text_weights.load_clip_text(tmp_path / 'u.st')
  assert 'found none' in _one_line(e.value)


def test_bad_configs_are_config_errors():
  with pytest.raises(errors.ConfigError, match='activation'):
    clip_text.get_config('test', activation='relu')
  with pytest.raises(errors.ConfigError, match='openai-vit-l-14'):
    clip_text.get_config('vit-l')


# ----------------------------------------------------------------------------------------------
# Tokenizer.


@pytest.mark.parametrize('files', ['dir', 'tokenizer.json', 'vocab+merges'])
def test_tokenizer_matches_transformers(expected, info, files):
  directory = os.path.join(FIXTURES, 'tokenizer')
  if files == 'dir':
    tok = clip_tokenizer.ClipTokenizer.from_files(directory, max_length=16)
  elif files == 'tokenizer.json':
    tok = clip_tokenizer.ClipTokenizer.from_files(os.path.join(directory, files), max_length=16)
  else:
    tok = clip_tokenizer.ClipTokenizer.from_files(os.path.join(directory, 'vocab.json'),
                                                  os.path.join(directory, 'merges.txt'),
                                                  max_length=16)
  ids, mask = tok(info['tokenizer_captions'])
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids, expected['tokenizer_ids'])
  np.testing.assert_array_equal(mask, expected['tokenizer_mask'])
  np.testing.assert_array_equal(tok(info['captions'])[0], expected['ids'][:3])


def test_open_clip_padding(expected, info):
  tok = clip_tokenizer.ClipTokenizer.from_files(os.path.join(FIXTURES, 'tokenizer'),
                                                max_length=16,
                                                pad_token=clip_tokenizer.PAD_OPEN_CLIP)
  assert tok.pad_id == 0
  ids, mask = tok(info['captions'])
  np.testing.assert_array_equal(mask, expected['bang_mask'])
  np.testing.assert_array_equal(ids, np.where(expected['mask'][:3] == 1, expected['ids'][:3], 0))
  # transformers' CLIPTokenizer(pad_token='!') also maps the prompt's '!' to 0; OpenCLIP not.
  bang = tok.tokenizer.token_to_id('!</w>')
  differ = ids != expected['bang_ids']
  assert differ.any() and (ids[differ] == bang).all() and (expected['bang_ids'][differ] == 0).all()


def test_long_prompt_truncated_with_one_warning(info, caplog):
  tok = clip_tokenizer.ClipTokenizer.from_files(os.path.join(FIXTURES, 'tokenizer'))
  assert tok.max_length == 77
  long_prompt = ' '.join(['a photo of a cat'] * 30)
  with caplog.at_level(logging.WARNING):
    ids, mask = tok([long_prompt, 'a cat', long_prompt])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and 'limit of 75 tokens (77 with' in warnings[0], warnings
  assert mask[0].all() and ids[0, -1] == tok.eos_id and ids[0, 0] == tok.bos_id
  assert mask[1].sum() == 4


def test_tokenizer_file_missing_is_one_line(tmp_path):
  with pytest.raises(clip_tokenizer.ClipTokenizerFileError) as e:
    clip_tokenizer.ClipTokenizer.from_files(tmp_path)
  text = _one_line(e.value)
  assert str(tmp_path / 'vocab.json') in text and 'tokenizer.json' in text
  assert isinstance(e.value, errors.DataError) and isinstance(e.value, FileNotFoundError)
  vocab = os.path.join(FIXTURES, 'tokenizer', 'vocab.json')
  with pytest.raises(clip_tokenizer.ClipTokenizerFileError) as e:
    clip_tokenizer.ClipTokenizer.from_files(vocab, tmp_path / 'merges.txt')
  assert str(tmp_path / 'merges.txt') in _one_line(e.value)
  with pytest.raises(clip_tokenizer.ClipTokenizerFileError) as e:
    clip_tokenizer.ClipTokenizer.from_files(vocab)
  assert 'merges.txt' in _one_line(e.value)


# ----------------------------------------------------------------------------------------------
# Sizes, dtypes, sharding metadata.


@pytest.mark.parametrize('name', sorted(clip_text.PUBLISHED_PARAMETERS))
def test_parameter_counts_match_the_published_encoders(info, name):
  with_projection = nnx.eval_shape(lambda: clip_text.ClipTextEncoder(name, rngs=nnx.Rngs(0)))
  without = nnx.eval_shape(lambda: clip_text.ClipTextEncoder(
      clip_text.get_config(name, projection_dim=None), rngs=nnx.Rngs(0)))
  counts = (param_count(without), param_count(with_projection))
  assert counts == clip_text.PUBLISHED_PARAMETERS[name]
  assert counts == tuple(info['param_counts'][name][k] for k in (
      'CLIPTextModel', 'CLIPTextModelWithProjection'))


def test_logical_axes_and_bfloat16(expected):
  model = _loaded('a')
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert set(spec) <= {'vocab', 'embed', 'heads', 'mlp', None}, (path, spec)
  state = nnx.state(model, nnx.Param)
  assert all(len(s) == v.ndim for s, v in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)), jax.tree.leaves(state)))
  low = clip_text.ClipTextEncoder(_config('a'), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(low, state)
  out = _outputs(low, expected['ids'])
  assert out['last_hidden_state'].dtype == jnp.float32
  assert 1e-5 < _errors(out, expected, 'a')['last_hidden_state'] < 0.1
