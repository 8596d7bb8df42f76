"""SD-VAE weight loading: the three key layouts, errors that name keys, NumPy references.

The expected key names and shapes are written here from the reference modules (diffusers'
AutoencoderKL and CompVis' LDM autoencoder), independently of the converter's rewrite rules.
A small SD-VAE-shaped model (channels (32, 64), one block per level, 8 groups) keeps the tests
fast; the full sd-vae-ft-ema key set is checked by names and shapes only (zero-stride arrays,
an `nnx.eval_shape` model), so nothing of its 335 MB is materialised.
"""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from guidedflow.models import safetensors_io
from guidedflow.models import sd_vae_weights as sdw
from guidedflow.models import torch_weights
from guidedflow.models.autoencoder import AutoencoderKL

SMALL = dict(channels=(32, 64), layers_per_block=1, in_channels=3, latent_channels=4)
GROUPS = 8
SD_VAE = dict(channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3,
              latent_channels=4)
SD_VAE_PARAMETERS = 83_653_863
LDM_EXTRAS = ('model.diffusion_model.input_blocks.0.0.weight', 'cond_stage_model.proj',
              'first_stage_model.loss.logvar', 'first_stage_model.loss.discriminator.main.0.weight')


# ----------------------------------------------------------------------------------------------
# The reference key sets, from the diffusers / LDM module definitions.


def _spec(channels, layers_per_block, in_channels, latent_channels):
  """Rows (diffusers name, old-diffusers name, LDM name, shape, is_attention_matrix)."""
  rows = []

  def tensor(names, shape, matrix=False):
    d, ldm = names
    legacy = d
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      legacy = legacy.replace(f'attentions.0.{new}.', f'attentions.0.{old}.')
    rows.append((d, legacy, ldm, shape, matrix))

  def conv(d, ldm, c_in, c_out, k):
    tensor((d + '.weight', ldm + '.weight'), (c_out, c_in, k, k))
    tensor((d + '.bias', ldm + '.bias'), (c_out,))

  def norm(d, ldm, c):
    tensor((d + '.weight', ldm + '.weight'), (c,))
    tensor((d + '.bias', ldm + '.bias'), (c,))

  def resnet(d, ldm, c_in, c_out):
    norm(d + '.norm1', ldm + '.norm1', c_in)
    conv(d + '.conv1', ldm + '.conv1', c_in, c_out, 3)
    norm(d + '.norm2', ldm + '.norm2', c_out)
    conv(d + '.conv2', ldm + '.conv2', c_out, c_out, 3)
    if c_in != c_out:
      conv(d + '.conv_shortcut', ldm + '.nin_shortcut', c_in, c_out, 1)

  def mid(part, c):
    resnet(f'{part}.mid_block.resnets.0', f'{part}.mid.block_1', c, c)
    norm(f'{part}.mid_block.attentions.0.group_norm', f'{part}.mid.attn_1.norm', c)
    for d, ldm in (('to_q', 'q'), ('to_k', 'k'), ('to_v', 'v'), ('to_out.0', 'proj_out')):
      tensor((f'{part}.mid_block.attentions.0.{d}.weight', f'{part}.mid.attn_1.{ldm}.weight'),
             (c, c), matrix=True)
      tensor((f'{part}.mid_block.attentions.0.{d}.bias', f'{part}.mid.attn_1.{ldm}.bias'), (c,))
    resnet(f'{part}.mid_block.resnets.1', f'{part}.mid.block_2', c, c)

  levels, width = len(channels), channels[0]
  conv('encoder.conv_in', 'encoder.conv_in', in_channels, width, 3)
  for i, c in enumerate(channels):
    for j in range(layers_per_block):
      resnet(f'encoder.down_blocks.{i}.resnets.{j}', f'encoder.down.{i}.block.{j}', width, c)
      width = c
    if i < levels - 1:
      conv(f'encoder.down_blocks.{i}.downsamplers.0.conv', f'encoder.down.{i}.downsample.conv',
           c, c, 3)
  mid('encoder', width)
  norm('encoder.conv_norm_out', 'encoder.norm_out', width)
  conv('encoder.conv_out', 'encoder.conv_out', width, 2 * latent_channels, 3)
  conv('quant_conv', 'quant_conv', 2 * latent_channels, 2 * latent_channels, 1)
  conv('post_quant_conv', 'post_quant_conv', latent_channels, latent_channels, 1)
  width = channels[-1]
  conv('decoder.conv_in', 'decoder.conv_in', latent_channels, width, 3)
  mid('decoder', width)
  for i, c in enumerate(reversed(channels)):
    level = levels - 1 - i  # LDM's decoder.up is indexed by resolution, like the encoder
    for j in range(layers_per_block + 1):
      resnet(f'decoder.up_blocks.{i}.resnets.{j}', f'decoder.up.{level}.block.{j}', width, c)
      width = c
    if i < levels - 1:
      conv(f'decoder.up_blocks.{i}.upsamplers.0.conv', f'decoder.up.{level}.upsample.conv',
           c, c, 3)
  norm('decoder.conv_norm_out', 'decoder.norm_out', width)
  conv('decoder.conv_out', 'decoder.conv_out', width, in_channels, 3)
  return rows


def _shapes(rows, layout, *, conv_attention):
  """name → shape in `layout`; attention matrices (C, C) or, if `conv_attention`, (C, C, 1, 1)."""
  column = sdw.LAYOUTS.index(layout)
  return {row[column]: row[3] + ((1, 1) if row[4] and conv_attention else ())
          for row in rows}


def _random_values(rows, seed=0):
  """One random array per row (the same values in every layout), O(1) activations."""
  rng = np.random.default_rng(seed)
  values = []
  for d, _, _, shape, _ in rows:
    if d.endswith('.bias'):
      value = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:  # GroupNorm weight
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    values.append(value.astype(np.float32))
  return values


def _state_dict(layout, *, conv_attention, prefix='', seed=0):
  rows = _spec(**SMALL)
  shapes = _shapes(rows, layout, conv_attention=conv_attention)
  return {prefix + name: value.reshape(shape)
          for (name, shape), value in zip(shapes.items(), _random_values(rows, seed))}


def _params(model):
  return {path: np.asarray(v.get_value()) for path, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param)}


def _small_model(**kwargs):
  return AutoencoderKL(**SMALL, norm_groups=GROUPS, rngs=nnx.Rngs(1), **kwargs)


# ----------------------------------------------------------------------------------------------
# Key layouts and files.


def _write_layouts(tmp_path):
  """The same random SD-VAE in four files: (path, layout, prefix, state dict written)."""
  files = []
  for name, layout, conv_attention, prefix, write in (
      ('diffusion_pytorch_model.safetensors', 'diffusers', False, '', sdw.save_weights),
      ('diffusion_pytorch_model.bin', 'diffusers_legacy_attention', True, '',
       torch_weights.save_state_dict),
      ('sd-v1-5.ckpt', 'ldm', True, 'first_stage_model.',
       lambda d, p: sdw.save_weights(d, p, file_format='ckpt')),
      ('vae-ft-mse-840000-ema-pruned.safetensors', 'ldm', True, '', sdw.save_weights)):
    state_dict = _state_dict(layout, conv_attention=conv_attention, prefix=prefix)
    if prefix:
      state_dict.update({k: np.full((i + 1,), i, np.float32) for i, k in enumerate(LDM_EXTRAS)})
    write(state_dict, tmp_path / name)
    files.append((tmp_path / name, layout, prefix, state_dict))
  return files


def test_every_layout_loads_to_identical_parameters_using_each_key_once(tmp_path):
  loaded = []
  for path, layout, prefix, written in _write_layouts(tmp_path):
    state_dict = sdw.read_weights(path)
    assert state_dict.keys() == written.keys()
    assert all(np.array_equal(state_dict[k], v) for k, v in written.items())
    assert sdw.detect_layout(state_dict) == (layout, prefix)
    model = nnx.eval_shape(_small_model)
    report = sdw.load_into(model, state_dict)
    assert (report.layout, report.prefix) == (layout, prefix)
    assert len(report.used_keys) == len(set(report.used_keys)) == len(_params(model))
    assert set(report.used_keys).isdisjoint(report.ignored_keys)
    assert set(report.used_keys) | set(report.ignored_keys) == set(state_dict)
    assert set(report.ignored_keys) == (set(LDM_EXTRAS) if prefix else set())
    loaded.append(_params(model))
    from_file = sdw.load_sd_vae(path, norm_groups=GROUPS)
    params = _params(from_file)
    assert params.keys() == loaded[-1].keys()
    assert all(np.array_equal(params[k], v) for k, v in loaded[-1].items())
    assert from_file.channels == SMALL['channels'] and from_file.latent_channels == 4
  for other in loaded[1:]:
    assert other.keys() == loaded[0].keys()
    for key, value in loaded[0].items():
      np.testing.assert_array_equal(other[key], value, err_msg=str(key))


def test_export_is_the_inverse_of_loading():
  model = nnx.eval_shape(_small_model)
  sdw.load_into(model, _state_dict('diffusers', conv_attention=False, seed=7))
  for layout in sdw.LAYOUTS:
    exported = sdw.export_state_dict(model, layout)
    assert {k: v.shape for k, v in exported.items()} == _shapes(
        _spec(**SMALL), layout, conv_attention=layout == 'ldm')
    fresh = nnx.eval_shape(_small_model)
    sdw.load_into(fresh, exported)
    params = _params(fresh)
    assert all(np.array_equal(params[k], v) for k, v in _params(model).items())


def test_full_size_sd_vae_key_set_maps_one_to_one():
  """Every key and shape of sd-vae-ft-ema (and its other layouts) onto the abstract SD-VAE."""
  rows = _spec(**SD_VAE)
  assert sum(int(np.prod(row[3])) for row in rows) == SD_VAE_PARAMETERS
  model = nnx.eval_shape(lambda: AutoencoderKL(rngs=nnx.Rngs(0)))
  zero = np.zeros((), np.float16)
  for layout, conv_attention, prefix in (('diffusers', False, ''),
                                         ('diffusers_legacy_attention', False, ''),
                                         ('diffusers_legacy_attention', True, ''),
                                         ('ldm', True, 'first_stage_model.')):
    shapes = _shapes(rows, layout, conv_attention=conv_attention)
    state_dict = {prefix + k: np.broadcast_to(zero, s) for k, s in shapes.items()}
    assert sdw.detect_layout(state_dict) == (layout, prefix)
    assert sdw.infer_config(state_dict) == SD_VAE
    report = sdw.load_into(model, state_dict, dry_run=True)
    assert sorted(report.used_keys) == sorted(state_dict) and not report.ignored_keys
  assert isinstance(model.encoder.conv_in.kernel.get_value(), jax.ShapeDtypeStruct)


# ----------------------------------------------------------------------------------------------
# Errors.


def test_missing_extra_and_misshaped_keys_are_named():
  good = _state_dict('diffusers', conv_attention=False)
  model = nnx.eval_shape(_small_model)
  cases = [('missing', 'decoder.up_blocks.1.resnets.1.conv2.bias', None),
           ('unexpected', 'encoder.down_blocks.0.resnets.1.conv1.weight',
            np.zeros((32, 32, 3, 3), np.float32)),
           ('mis-shaped', 'encoder.mid_block.attentions.0.to_q.weight',
            np.zeros((64, 32), np.float32))]
  for kind, key, value in cases:
    state_dict = dict(good)
    if value is None:
      del state_dict[key]
    else:
      state_dict[key] = value
    with pytest.raises(ValueError, match=rf'1 {kind}: {key}'):
      sdw.load_into(model, state_dict)
  state_dict = dict(good)
  del state_dict['encoder.conv_in.bias']
  state_dict['first_stage_model.encoder.conv_in.bias'] = np.zeros(32, np.float32)
  state_dict['encoder.conv_out.weight'] = np.zeros((8, 64, 3, 3), np.int32)
  with pytest.raises(ValueError) as error:
    sdw.load_into(model, state_dict)
  message = str(error.value)
  for line in ('1 missing: encoder.conv_in.bias (32,)',
               '1 unexpected: first_stage_model.encoder.conv_in.bias',
               '1 mis-shaped: encoder.conv_out.weight is (8, 64, 3, 3) int32'):
    assert line in message
  assert isinstance(model.encoder.conv_in.kernel.get_value(), jax.ShapeDtypeStruct)


def test_unexpected_key_inside_the_ldm_prefix_is_an_error_outside_is_ignored():
  state_dict = _state_dict('ldm', conv_attention=True, prefix='first_stage_model.')
  state_dict['model.diffusion_model.out.2.weight'] = np.zeros(3, np.float32)
  state_dict['first_stage_model.loss.perceptual_loss.net.x'] = np.zeros(3, np.float32)
  sdw.load_into(nnx.eval_shape(_small_model), state_dict)
  state_dict['first_stage_model.encoder.mid.attn_2.q.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r'unexpected: first_stage_model\.encoder\.mid\.attn_2'):
    sdw.load_into(nnx.eval_shape(_small_model), state_dict)


def test_missing_file_names_what_to_download(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    sdw.load_sd_vae(tmp_path / 'nope.safetensors')
  message = str(error.value)
  assert sdw.SD_VAE_URL in message and 'diffusion_pytorch_model.safetensors' in message
  assert 'config.autoencoder.weights' in message
  with pytest.raises(ValueError, match='one SD-VAE'):
    sdw.detect_layout({'unet.conv_in.weight': np.zeros(3)})


# ----------------------------------------------------------------------------------------------
# Files, scale factors.


def test_scale_and_shift_factors_from_metadata_or_arguments(tmp_path):
  state_dict = _state_dict('diffusers', conv_attention=False)
  path = tmp_path / 'vae.safetensors'
  sdw.save_weights(state_dict, path)
  model = sdw.load_sd_vae(path, norm_groups=GROUPS)
  assert (model.scale_factor, model.shift_factor) == (0.18215, 0.0)
  half = {k: v.astype(np.float16) for k, v in state_dict.items()}
  sdw.save_weights(half, path, metadata=dict(scaling_factor='0.3611', shift_factor='0.1159'))
  model = sdw.load_sd_vae(path, norm_groups=GROUPS)
  assert (model.scale_factor, model.shift_factor) == (0.3611, 0.1159)
  assert model.encoder.conv_in.kernel.get_value().dtype == jnp.float32
  np.testing.assert_array_equal(model.encoder.conv_in.bias.get_value(),
                                half['encoder.conv_in.bias'].astype(np.float32))
  model = sdw.load_sd_vae(path, norm_groups=GROUPS, scale_factor=1.5305, shift_factor=0.0609)
  assert (model.scale_factor, model.shift_factor) == (1.5305, 0.0609)
  np.testing.assert_allclose(model.to_latent(jnp.ones(2)), (1 - 0.0609) * 1.5305, rtol=1e-6)


def test_files_are_told_apart_by_content_and_checkpoint_objects_are_not_run(tmp_path):
  state_dict = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 's': np.float32(2.0),
                'h': np.array([0.5, -1.25], jnp.bfloat16)}
  for name, writer in (('x.bin', safetensors_io.save_safetensors),
                       ('x.safetensors', torch_weights.save_state_dict),
                       ('x.pth', lambda d, p: sdw.save_weights(d, p, file_format='ckpt'))):
    writer(state_dict, tmp_path / name)
    back = sdw.read_weights(tmp_path / name)
    assert back.keys() == state_dict.keys() and back['s'].shape == ()
    for key, value in state_dict.items():
      assert back[key].dtype == value.dtype
      np.testing.assert_array_equal(back[key].astype(np.float32), value.astype(np.float32))
  marker = tmp_path / 'ran'
  payload = (b'\x80\x02}q\x00(X\x01\x00\x00\x00xcposix\nsystem\nX' +
             len(f'touch {marker}').to_bytes(4, 'little') + f'touch {marker}'.encode() +
             b'\x85R\x75.')
  with zipfile.ZipFile(tmp_path / 'evil.pt', 'w') as archive:  # torch.save's zip layout
    archive.writestr('evil/data.pkl', payload)
  with pytest.raises(ValueError, match='no tensors'):
    sdw.read_weights(tmp_path / 'evil.pt')
  assert not os.path.exists(marker)


# ----------------------------------------------------------------------------------------------
# Numerics against NumPy (float64) from the torch-layout tensors.


def _np_conv(x, weight, bias, *, stride=1, pad=1):
  """x NHWC, weight OIHW; `pad` per side, or ((top, bottom), (left, right))."""
  pad = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
  x = np.pad(x, ((0, 0),) + pad + ((0, 0),))
  _, _, kh, kw = weight.shape
  h_out, w_out = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], h_out, w_out, weight.shape[0]))
  for dy in range(kh):
    for dx in range(kw):
      patch = x[:, dy:dy + stride * (h_out - 1) + 1:stride, dx:dx + stride * (w_out - 1) + 1:stride]
      out += np.einsum('nhwi,oi->nhwo', patch, weight[:, :, dy, dx].astype(np.float64))
  return out + bias


def _np_group_norm(x, weight, bias, groups=GROUPS, eps=1e-6):
  n, h, w, c = x.shape
  g = x.reshape(n, h * w, groups, c // groups)
  mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * weight + bias


def _np_silu(x):
  return x / (1 + np.exp(-x))


def _np_resnet(x, p, name):
  h = _np_conv(_np_silu(_np_group_norm(x, p[f'{name}.norm1.weight'], p[f'{name}.norm1.bias'])),
               p[f'{name}.conv1.weight'], p[f'{name}.conv1.bias'])
  h = _np_conv(_np_silu(_np_group_norm(h, p[f'{name}.norm2.weight'], p[f'{name}.norm2.bias'])),
               p[f'{name}.conv2.weight'], p[f'{name}.conv2.bias'])
  if f'{name}.nin_shortcut.weight' in p:
    x = _np_conv(x, p[f'{name}.nin_shortcut.weight'], p[f'{name}.nin_shortcut.bias'], pad=0)
  return x + h


def _np_attention(x, p, name):
  """LDM's AttnBlock: 1×1-conv q, k, v, proj_out; softmax(q·k / √C) over the H·W positions."""
  n, h, w, c = x.shape
  t = _np_group_norm(x, p[f'{name}.norm.weight'], p[f'{name}.norm.bias']).reshape(n, h * w, c)
  q, k, v = (t @ p[f'{name}.{s}.weight'][:, :, 0, 0].T + p[f'{name}.{s}.bias'] for s in 'qkv')
  logits = np.einsum('btc,bsc->bts', q, k) / np.sqrt(c)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bts,bsc->btc', weights, v) @ p[f'{name}.proj_out.weight'][:, :, 0, 0].T
  return x + (out + p[f'{name}.proj_out.bias']).reshape(x.shape)


@pytest.fixture(scope='module')
def ldm_loaded():
  """The small SD-VAE loaded from LDM-layout tensors, and those tensors (float64)."""
  state_dict = _state_dict('ldm', conv_attention=True, seed=3)
  model = nnx.eval_shape(_small_model)
  sdw.load_into(model, state_dict)
  return model, {k: v.astype(np.float64) for k, v in state_dict.items()}


def _check(module, reference, shape, seed, scale=1.0):
  x = scale * np.random.default_rng(seed).standard_normal(shape)
  got = np.asarray(module(jnp.asarray(x, jnp.float32)))
  want = reference(x.astype(np.float32).astype(np.float64))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resnet_block_with_shortcut_matches_numpy(ldm_loaded):
  model, p = ldm_loaded
  block = model.encoder.levels[1].blocks[0]  # 32 → 64 channels: has the 1×1 shortcut
  assert block.shortcut is not None
  _check(block, lambda x: _np_resnet(x, p, 'encoder.down.1.block.0'), (2, 8, 8, 32), 0)


def test_mid_attention_matches_numpy(ldm_loaded):
  model, p = ldm_loaded
  _check(model.encoder.mid.attention, lambda x: _np_attention(x, p, 'encoder.mid.attn_1'),
         (2, 4, 4, 64), 1)
  _check(model.decoder.mid.attention, lambda x: _np_attention(x, p, 'decoder.mid.attn_1'),
         (1, 4, 4, 64), 2)


def test_downsampler_pads_zero_one_then_valid_stride_two(ldm_loaded):
  model, p = ldm_loaded
  conv = lambda x: _np_conv(x, p['encoder.down.0.downsample.conv.weight'],  # noqa: E731
                            p['encoder.down.0.downsample.conv.bias'], stride=2,
                            pad=((0, 1), (0, 1)))
  _check(model.encoder.levels[0].resample, conv, (2, 16, 16, 32), 3)


def test_upsampler_nearest_then_conv(ldm_loaded):
  model, p = ldm_loaded
  # decoder.levels[0] is the lowest resolution: LDM's decoder.up.1 (of 2), 64 channels.
  up = lambda x: _np_conv(x.repeat(2, axis=1).repeat(2, axis=2),  # noqa: E731
                          p['decoder.up.1.upsample.conv.weight'],
                          p['decoder.up.1.upsample.conv.bias'])
  _check(model.decoder.levels[0].resample, up, (2, 4, 4, 64), 4)


def test_group_norm_epsilon_is_1e_minus_6(ldm_loaded):
  """With activations of variance ~1e-6 the output depends strongly on ε."""
  model, p = ldm_loaded
  norm = lambda eps: lambda x: _np_group_norm(  # noqa: E731
      x, p['encoder.norm_out.weight'], p['encoder.norm_out.bias'], eps=eps)
  _check(model.encoder.norm_out, norm(1e-6), (2, 4, 4, 64), 5, scale=1e-3)
  with pytest.raises(AssertionError):
    _check(model.encoder.norm_out, norm(1e-5), (2, 4, 4, 64), 5, scale=1e-3)
