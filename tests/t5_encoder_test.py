"""The T5 v1.1 encoder, its weights and tokenizer against transformers' (fixtures made by
tests/fixtures/make_t5_fixtures.py with torch; these tests need no torch).

Tolerance: 1e-5 absolute in f32 on hidden states of magnitude ~3 (measured: 3.3e-6 for both
weight layouts). Every perturbation the tests must catch (bucket count, max distance, norm ε,
a missing mask, a swapped key) moves the output by far more than that.
"""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from guidedflow import errors, sharding
from guidedflow.models import layers, safetensors_io, t5_encoder, t5_tokenizer, t5_weights
from tests import subprocess_env

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 't5')
TOLERANCE = 1e-5
MAX_LENGTH = 32

with open(os.path.join(FIXTURES, 't5_fixture.json'), encoding='utf-8') as _f:
  RECORD = json.load(_f)
EXPECTED = dict(np.load(os.path.join(FIXTURES, 'expected.npz')))


def _load(layout='single', config=None):
  return t5_weights.load_t5_encoder(os.path.join(FIXTURES, layout), config,
                                    max_length=MAX_LENGTH)


@pytest.fixture(scope='module')
def model():
  return _load()


def _max_error(model, mask='fixture', rows=None):
  attention_mask = EXPECTED['attention_mask'] if mask == 'fixture' else mask
  hidden, _ = model(jnp.asarray(EXPECTED['input_ids']), attention_mask)
  error = np.abs(np.asarray(hidden) - EXPECTED['last_hidden_state'])
  valid = EXPECTED['attention_mask'].astype(bool)
  return float(error[valid].max() if rows == 'valid' else error.max())


# ----------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize('layout, num_files', [('single', 1), ('sharded', 2)])
def test_hidden_states_match_transformers(layout, num_files):
  model = _load(layout)
  assert model.config == t5_encoder.get_config(
      'test', max_length=MAX_LENGTH), 'config.json read as the test preset'
  hidden, mask = model(jnp.asarray(EXPECTED['input_ids']), EXPECTED['attention_mask'])
  assert hidden.shape == (4, MAX_LENGTH, 32) and hidden.dtype == jnp.float32
  np.testing.assert_array_equal(mask, EXPECTED['attention_mask'])
  error = np.abs(np.asarray(hidden) - EXPECTED['last_hidden_state']).max()
  assert error < TOLERANCE, (layout, error)
  report = t5_weights.load_into(
      nnx.eval_shape(lambda: t5_encoder.T5Encoder('test', rngs=nnx.Rngs(0))),
      os.path.join(FIXTURES, layout))
  assert len(report.files) == num_files
  assert len(report.used_keys) == len(set(report.used_keys)) == 21  # 2 × 10 + shared + final


def test_padding_changes_nothing_for_the_tokens():
  """A caption encoded alone (no padding) equals its row of the padded batch (the padded
  captions longer than the maximum distance)."""
  model = _load()
  batch, _ = model(jnp.asarray(EXPECTED['input_ids']), EXPECTED['attention_mask'])
  for row in (1, 3):
    length = EXPECTED['attention_mask'][row].sum()
    assert 16 < length < MAX_LENGTH
    alone, _ = model(jnp.asarray(EXPECTED['input_ids'][row:row + 1, :length]))
    np.testing.assert_allclose(alone[0], batch[row, :length], atol=TOLERANCE)


def test_export_state_dict_round_trips(model):
  state = t5_weights.export_state_dict(model)
  original = safetensors_io.read_safetensors(os.path.join(FIXTURES, 'single',
                                                          'model.safetensors'))
  assert state.keys() == original.keys()
  for key, value in original.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)


@pytest.mark.parametrize('buckets, max_distance', [(8, 16), (32, 128)])
def test_position_buckets_match_transformers(buckets, max_distance):
  span = RECORD['buckets_span']
  ours = t5_encoder.relative_position_buckets(span, 2 * span - 1, buckets, max_distance)
  # Row span − 1 holds relative positions −(span − 1) .. span − 1, as the reference list.
  np.testing.assert_array_equal(ours[span - 1], RECORD['buckets'][f'{buckets}_{max_distance}'])


# ----------------------------------------------------------------------------------------------
# The parity test catches what it must.


def _swap_model(**changes):
  """The fixture model with `changes` to its config after loading (bucket settings)."""
  model = _load()
  model.config = dataclasses.replace(model.config, **changes)
  return model


@pytest.mark.parametrize('perturbed', [
    'num_buckets_4', 'num_buckets_6', 'max_distance_32', 'max_distance_8', 'eps_1e-5',
    'eps_1e-7', 'no_mask', 'swapped_wi'])
def test_perturbations_exceed_the_tolerance(perturbed, tmp_path):
  if perturbed.startswith('num_buckets'):
    model = _swap_model(relative_attention_num_buckets=int(perturbed.split('_')[-1]))
  elif perturbed.startswith('max_distance'):
    model = _swap_model(relative_attention_max_distance=int(perturbed.split('_')[-1]))
  elif perturbed.startswith('eps'):
    model = _load(config=t5_encoder.get_config('test', layer_norm_epsilon=float(
        perturbed.split('_')[-1])))
  elif perturbed == 'no_mask':
    error = _max_error(_load(), mask=None, rows='valid')  # real tokens attend to padding
    assert error > 100 * TOLERANCE, error
    return
  else:
    state = safetensors_io.read_safetensors(os.path.join(FIXTURES, 'single', 'model.safetensors'))
    key = 'encoder.block.1.layer.1.DenseReluDense.wi_{}.weight'
    state[key.format(0)], state[key.format(1)] = state[key.format(1)], state[key.format(0)]
    safetensors_io.save_safetensors(state, tmp_path / 'model.safetensors')
    model = t5_weights.load_t5_encoder(tmp_path, 'test')
  error = _max_error(model)
  assert error > 100 * TOLERANCE, (perturbed, error)


# ----------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the fix.


def _one_line(error_info, *fragments):
  message = str(error_info.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, message
  return message


def _write_state(tmp_path, drop=(), add=None, resize=None):
  state = safetensors_io.read_safetensors(os.path.join(FIXTURES, 'single', 'model.safetensors'))
  for key in drop:
    del state[key]
  state.update(add or {})
  for key, shape in (resize or {}).items():
    state[key] = np.zeros(shape, np.float32)
  path = tmp_path / 'model.safetensors'
  safetensors_io.save_safetensors(state, path)
  return str(path)


def test_missing_key_is_one_line_naming_key_and_file(tmp_path):
  path = _write_state(tmp_path, drop=['encoder.final_layer_norm.weight'])
  with pytest.raises(t5_weights.T5WeightsMismatchError) as info:
    t5_weights.load_t5_encoder(path, 'test')
  assert isinstance(info.value, errors.ConfigError)
  _one_line(info, path, '1 missing', 'encoder.final_layer_norm.weight', 'preset or config.json')


def test_unexpected_and_misshaped_keys_are_one_line(tmp_path):
  path = _write_state(tmp_path, add={'encoder.block.2.layer.0.layer_norm.weight':
                                     np.ones(32, np.float32)})
  with pytest.raises(t5_weights.T5WeightsMismatchError) as info:
    t5_weights.load_t5_encoder(path, 'test')
  _one_line(info, path, '1 unexpected', 'encoder.block.2.layer.0.layer_norm.weight')
  # Weights of another size than the named encoder: every mis-shaped key is listed.
  with pytest.raises(t5_weights.T5WeightsMismatchError) as info:
    _load(config=t5_encoder.get_config('test', d_ff=128))
  _one_line(info, 'model.safetensors', '6 mis-shaped',
            'encoder.block.0.layer.1.DenseReluDense.wi_0.weight is (64, 32) float32, expected '
            '(128, 32)', 'd_ff 128')


def test_decoder_is_ignored_and_tied_embedding_accepted(tmp_path):
  state = safetensors_io.read_safetensors(os.path.join(FIXTURES, 'single', 'model.safetensors'))
  state['encoder.embed_tokens.weight'] = state.pop('shared.weight')  # the alias alone
  state['decoder.final_layer_norm.weight'] = np.ones(32, np.float32)
  safetensors_io.save_safetensors(state, tmp_path / 'model.safetensors')
  model = t5_weights.load_t5_encoder(tmp_path, 'test', max_length=MAX_LENGTH)
  assert _max_error(model) < TOLERANCE
  report = t5_weights.load_into(model, tmp_path)
  assert report.ignored_keys == ('decoder.final_layer_norm.weight',)
  assert 'encoder.embed_tokens.weight' in report.used_keys


def test_missing_weights_shard_and_config_are_one_line(tmp_path):
  with pytest.raises(t5_weights.T5WeightsNotFoundError) as info:
    t5_weights.load_t5_encoder(tmp_path)
  _one_line(info, str(tmp_path), 'model.safetensors', 'model.safetensors.index.json')
  for name in os.listdir(os.path.join(FIXTURES, 'sharded')):
    if name != 'model-00002-of-00002.safetensors':
      with open(os.path.join(FIXTURES, 'sharded', name), 'rb') as src:
        (tmp_path / name).write_bytes(src.read())
  with pytest.raises(t5_weights.T5WeightsNotFoundError) as info:
    t5_weights.load_t5_encoder(tmp_path)
  _one_line(info, 'model-00002-of-00002.safetensors', 'download every shard')
  with open(os.path.join(FIXTURES, 'sharded', 'model-00002-of-00002.safetensors'), 'rb') as src:
    (tmp_path / 'model-00002-of-00002.safetensors').write_bytes(src.read())
  os.remove(tmp_path / 'config.json')
  with pytest.raises(t5_weights.T5WeightsNotFoundError) as info:
    t5_weights.load_t5_encoder(tmp_path)
  _one_line(info, 'config.json', 't5-v1_1-xxl')


# ----------------------------------------------------------------------------------------------
# Tokenizer.


@pytest.mark.parametrize('source', ['spiece.model', 'tokenizer.json', ''])
def test_tokenizer_ids_match_transformers(source):
  tokenizer = t5_tokenizer.T5Tokenizer(os.path.join(FIXTURES, source), max_length=MAX_LENGTH)
  ids, mask = tokenizer(RECORD['captions'])
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == (4, MAX_LENGTH)
  np.testing.assert_array_equal(ids, RECORD['ids_spiece'])
  np.testing.assert_array_equal(ids, RECORD['ids_tokenizer_json'])
  np.testing.assert_array_equal(mask, RECORD['attention_mask'])
  long_ids, _ = t5_tokenizer.T5Tokenizer(os.path.join(FIXTURES, source), max_length=128)(
      RECORD['captions'])
  for row, expected in zip(long_ids, RECORD['unpadded_ids']):
    np.testing.assert_array_equal(row[:len(expected)], expected)
    assert (row[len(expected):] == 0).all()


def test_truncation_warns_once_naming_the_limit(caplog):
  tokenizer = t5_tokenizer.T5Tokenizer(FIXTURES, max_length=6)
  with caplog.at_level(logging.WARNING):
    ids, mask = tokenizer(RECORD['captions'])
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and '4 of 4 prompts' in warnings[0].getMessage()
  assert 'limit of 6 tokens' in warnings[0].getMessage()
  assert (ids[:, -1] == 1).all() and mask.all()  # cut to 5 pieces + </s>
  np.testing.assert_array_equal(ids[:, :5], np.asarray(RECORD['ids_spiece'])[:, :5])
  caplog.clear()
  tokenizer(['a car'])
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_missing_tokenizer_is_one_line(tmp_path):
  with pytest.raises(t5_tokenizer.T5TokenizerNotFoundError) as info:
    t5_tokenizer.T5Tokenizer(tmp_path)
  assert isinstance(info.value, errors.DataError)
  _one_line(info, str(tmp_path / 'spiece.model'), 'tokenizer.json', 'Download')
  bad = tmp_path / 'spiece.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(errors.DataError) as info:
    t5_tokenizer.T5Tokenizer(bad)
  _one_line(info, str(bad), 'not a readable T5 tokenizer')


# ----------------------------------------------------------------------------------------------
# T5-XXL: size and sharding, abstractly.


def test_xxl_parameter_count():
  abstract = nnx.eval_shape(lambda: t5_encoder.T5Encoder('t5-v1_1-xxl', rngs=nnx.Rngs(0)))
  assert layers.param_count(abstract) == RECORD['xxl_encoder_parameters'] == 4_762_310_656


def test_config_from_transformers_json_and_presets():
  with open(os.path.join(FIXTURES, 'single', 'config.json'), encoding='utf-8') as f:
    hf = json.load(f)
  assert t5_encoder.config_from_hf(hf) == t5_encoder.get_config('test')
  with pytest.raises(errors.ConfigError, match='gated-gelu'):
    t5_encoder.config_from_hf(dict(hf, feed_forward_proj='relu'))
  assert t5_encoder.get_config('t5-v1_1-xxl', max_length=256).max_length == 256
  with pytest.raises(errors.ConfigError, match='t5-v1_1-xxl'):
    t5_encoder.get_config('t5-xxl')


def test_xxl_is_fsdp_sharded_on_an_abstract_mesh():
  abstract = nnx.state(nnx.eval_shape(lambda: t5_encoder.T5Encoder('t5-v1_1-xxl',
                                                                   rngs=nnx.Rngs(0))))
  mesh = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES)
  shardings = sharding.state_shardings(abstract, mesh)
  block = shardings['blocks'][0]
  assert block['attention']['q']['kernel'].get_value().spec == P('fsdp', 'tensor')
  assert block['attention']['o']['kernel'].get_value().spec == P('tensor', 'fsdp')
  assert block['feed_forward']['wi_0']['kernel'].get_value().spec == P('fsdp', 'tensor')
  assert block['feed_forward']['wo']['kernel'].get_value().spec == P('tensor', 'fsdp')
  assert shardings['embed']['embedding'].get_value().spec == P(None, 'fsdp')
  assert shardings['relative_attention_bias'].get_value().spec == P()  # 32 × 64: replicated
  structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
  full = 4 * RECORD['xxl_encoder_parameters']
  assert sharding.bytes_per_device(structs) < full / 7.9  # ~2.4 of 19 GB per device


_CHILD = textwrap.dedent(r'''
    import json, os, sys
    import jax
    import numpy as np
    from flax import nnx
    from guidedflow import sharding
    from guidedflow.models import t5_weights

    fixtures = sys.argv[1]
    expected = np.load(os.path.join(fixtures, 'expected.npz'))
    mesh = sharding.make_mesh((1, 4, 2))  # batch 4 over data x fsdp
    model = nnx.eval_shape(lambda: t5_weights.T5Encoder(
        t5_weights.read_config(os.path.join(fixtures, 'sharded')), rngs=nnx.Rngs(0)))
    # Tiny model: shard everything that divides (the real encoder keeps MIN_SHARD_SIZE).
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(nnx.state(model), mesh,
                                                                min_shard_size=0)))
    t5_weights.load_into(model, os.path.join(fixtures, 'sharded'), put=lambda p, v, d: (
        jax.device_put(v.astype(d), shardings[p].get_value())))
    spec = lambda a: [e for e in a.sharding.spec]
    q = model.blocks[0].attention.q.kernel[...]
    wo = model.blocks[1].feed_forward.wo.kernel[...]
    ids = jax.device_put(expected['input_ids'], sharding.batch_sharding(mesh))
    mask = jax.device_put(expected['attention_mask'], sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      hidden, _ = nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask)
    print('REPORT' + json.dumps({
        'devices': jax.device_count(), 'q': spec(q), 'q_shard': list(q.addressable_shards[0].data.shape),
        'wo': spec(wo), 'embedding': spec(model.embed.embedding[...]),
        'error': float(np.abs(np.asarray(hidden) - expected['last_hidden_state']).max()),
        'out_devices': len(hidden.sharding.device_set)}))
''')


def test_loaded_encoder_is_fsdp_sharded_on_eight_devices():
  env = subprocess_env.env()
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  result = subprocess.run([sys.executable, '-c', _CHILD, FIXTURES], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [ln for ln in result.stdout.splitlines() if ln.startswith('REPORT')][-1]
  report = json.loads(line[len('REPORT'):])
  assert report['devices'] == 8
  assert report['q'] == ['fsdp', 'tensor'] and report['q_shard'] == [8, 16]  # (32, 32) / (4, 2)
  assert report['wo'] == ['tensor', 'fsdp'] and report['embedding'] == [None, 'fsdp']
  assert report['error'] < TOLERANCE and report['out_devices'] == 8
