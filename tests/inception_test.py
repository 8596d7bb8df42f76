"""Tests for guidedflow.models.inception: layout, weight file round trip, features, errors.

The real weights cannot be downloaded here, so random weights are written in the same file
format (`init_state_dict` → `save_weights`) and read back. The whole network is compiled once
(batch 2) and shared by the tests through module-scoped fixtures.
"""

import functools
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from flax import nnx

from guidedflow import feature_networks
from guidedflow.models import inception
from guidedflow.models.layers import param_count

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (random weights
# written to disk and their extractor) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('inception')

BATCH_SIZE = 2


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  state_dict = inception.init_state_dict(seed=0)
  path = tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth'
  inception.save_weights(state_dict, path)
  return state_dict, path


@pytest.fixture(scope='module')
def extractor(weights):
  return feature_networks.load_inception(weights[1], batch_size=BATCH_SIZE)


def _uint8_images(shape, seed):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_param_count_matches_torchvision_minus_aux_and_fc():
  # torchvision documents 27,161,264 for Inception3; its aux classifier has
  # 768·128 + 2·128 + 128·768·25 + 2·768 + 768·1000 + 1000 = 3,326,696 and fc 2048·1000 + 1000.
  reference = 27_161_264 - 3_326_696 - 2_049_000
  model = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
  assert param_count(model) == reference == inception.PARAM_COUNT == 21_785_568


def test_state_dict_names_and_shapes_follow_pytorch_fid():
  shapes = inception.state_dict_shapes()
  assert len(shapes) == 94 * 6 + 2  # 94 conv+BN layers (weight, 4 BN tensors, counter) + fc
  assert shapes['Conv2d_1a_3x3.conv.weight'] == (32, 3, 3, 3)
  assert shapes['Mixed_5b.branch_pool.conv.weight'] == (32, 192, 1, 1)
  assert shapes['Mixed_6b.branch7x7_2.conv.weight'] == (128, 128, 1, 7)
  assert shapes['Mixed_6e.branch7x7dbl_2.conv.weight'] == (192, 192, 7, 1)
  assert shapes['Mixed_7a.branch7x7x3_4.conv.weight'] == (192, 192, 3, 3)
  assert shapes['Mixed_7c.branch3x3dbl_3b.bn.running_var'] == (384,)
  assert shapes['Mixed_7c.branch_pool.conv.weight'] == (192, 2048, 1, 1)
  assert shapes['fc.weight'] == (1008, 2048)


def test_round_trip_parameters_equal_saved_arrays(weights, extractor):
  state_dict, _ = weights
  variables = inception.torch_variables(extractor.model)
  assert len(variables) == 94 * 5
  for name, variable in variables.items():
    expected = state_dict[name]
    if name.endswith('.conv.weight'):
      expected = expected.transpose(2, 3, 1, 0)  # the documented OIHW → HWIO
    np.testing.assert_array_equal(np.asarray(variable.get_value()), expected, err_msg=name)
  assert extractor.name == 'inception_v3'
  assert extractor.meta['official_weights'] is False
  assert extractor.meta['unused_tensors'] == ['fc.bias', 'fc.weight']


def test_legacy_torch_format_reads_back_exactly(weights, tmp_path):
  state_dict, _ = weights
  subset = {k: state_dict[k] for k in list(state_dict)[:30]}
  path = tmp_path / 'legacy.pth'
  inception.save_weights(subset, path, legacy_format=True)
  assert not zipfile.is_zipfile(path)
  loaded = inception.read_weights(path)
  assert list(loaded) == list(subset)
  for name, value in subset.items():
    assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
    np.testing.assert_array_equal(loaded[name], value)


def _numpy_conv_bn_relu(x, state_dict, prefix, stride, padding):
  """Reference from the raw torch tensors: OIHW kernel, BatchNorm eps 1e-3, float64."""
  weight = state_dict[f'{prefix}.conv.weight'].astype(np.float64)
  _, _, kh, kw = weight.shape
  x = np.pad(x.astype(np.float64), ((0, 0), padding[:1] * 2, padding[1:] * 2, (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  windows = windows[:, ::stride, ::stride]  # (B, OH, OW, C, kh, kw)
  y = np.einsum('bhwckl,ockl->bhwo', windows, weight)
  bn = {k: state_dict[f'{prefix}.bn.{k}'].astype(np.float64)
        for k in ('weight', 'bias', 'running_mean', 'running_var')}
  y = (y - bn['running_mean']) / np.sqrt(bn['running_var'] + 1e-3) * bn['weight'] + bn['bias']
  return np.maximum(y, 0.0)


@pytest.mark.parametrize('prefix, in_channels, stride, padding', [
    ('Conv2d_1a_3x3', 3, 2, (0, 0)),
    ('Mixed_6b.branch7x7_2', 128, 1, (0, 3)),   # 1×7: a swapped H/W would not fit
    ('Mixed_6b.branch7x7_3', 128, 1, (3, 0)),   # 7×1
    ('Mixed_7b.branch3x3_2a', 384, 1, (0, 1)),  # 1×3
])
def test_conv_bn_layer_matches_numpy_from_raw_tensors(weights, extractor, prefix, in_channels,
                                                      stride, padding):
  state_dict, _ = weights
  layer = functools.reduce(getattr, prefix.split('.'), extractor.model)
  x = np.random.default_rng(1).standard_normal((1, 9, 11, in_channels)).astype(np.float32)
  expected = _numpy_conv_bn_relu(x, state_dict, prefix, stride, padding)
  got = np.asarray(layer(x))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_pools_match_tf_semantics():
  x = np.random.default_rng(2).standard_normal((1, 5, 4, 3)).astype(np.float32)
  avg = np.asarray(inception.avg_pool_3x3_exclude_pad(x))
  mx = np.asarray(inception.max_pool(x, stride=1, padding=1))
  for i in range(5):
    for j in range(4):
      window = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]  # in-image pixels only
      np.testing.assert_allclose(avg[0, i, j], window.mean(axis=(0, 1)), rtol=1e-6)
      np.testing.assert_array_equal(mx[0, i, j], window.max(axis=(0, 1)))
  assert np.asarray(inception.max_pool(x[:, :, :3])).shape == (1, 2, 1, 3)  # 3×3 stride 2 valid


def test_features_shape_finite_nonnegative_and_padding_free(extractor):
  images = _uint8_images((3, 299, 299, 3), seed=3)  # 2 batches of 2, the last one padded
  features = extractor(images)
  assert features['logits'] is None
  out = features['features']
  assert out.shape == (3, 2048) and out.dtype == np.float32
  assert np.all(np.isfinite(out)) and np.all(out >= 0)  # average of ReLU outputs
  assert np.mean(out > 0) > 0.1 and not np.allclose(out[0], out[1])
  alone = extractor(images[2:3])['features']
  np.testing.assert_allclose(alone[0], out[2], rtol=1e-5, atol=1e-6)
  assert extractor.num_traces == 1


def test_small_grayscale_and_rgb_inputs_are_resized(extractor):
  gray = _uint8_images((2, 28, 28), seed=4)
  gray_features = extractor(gray)['features']
  tiled_features = extractor(np.repeat(gray[..., None], 3, axis=-1))['features']
  rgb_features = extractor(_uint8_images((2, 32, 32, 3), seed=5))['features']
  for out in (gray_features, rgb_features):
    assert out.shape == (2, 2048) and np.all(np.isfinite(out)) and np.all(out >= 0)
  np.testing.assert_allclose(gray_features, tiled_features, rtol=1e-6, atol=1e-6)
  assert not np.allclose(gray_features, rgb_features)
  assert extractor.num_traces == 1  # the network is compiled once for all image sizes
  with pytest.raises(ValueError, match='uint8'):
    extractor(gray.astype(np.float32))


def test_missing_file_says_where_to_download_and_which_key(tmp_path):
  for path in (tmp_path / 'nowhere.pth', None):
    with pytest.raises(FileNotFoundError) as info:
      feature_networks.load_inception(path)
    assert isinstance(info.value, inception.InceptionWeightsNotFoundError)
    message = str(info.value)
    assert inception.FID_WEIGHTS_URL in message and 'eval.inception_weights' in message


def test_file_missing_a_tensor_names_it_and_its_shape(weights, tmp_path):
  state_dict, _ = weights
  missing = 'Mixed_6c.branch7x7_2.bn.running_var'
  path = tmp_path / 'incomplete.pth'
  inception.save_weights({k: v for k, v in state_dict.items() if k != missing}, path)
  with pytest.raises(ValueError, match=rf"'{missing}' \(expected shape \(160,\)\)"):
    feature_networks.load_inception(path)


def test_mismatched_or_wrong_network_tensors_are_rejected(weights):
  state_dict, _ = weights
  model = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
  wrong = dict(state_dict)
  wrong['Mixed_5b.branch5x5_2.conv.weight'] = np.zeros((64, 48, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"'Mixed_5b.branch5x5_2.conv.weight'.*\(64, 48, 5, 5\)"):
    inception.load_state_dict(model, wrong)
  torchvision_like = dict(state_dict)
  torchvision_like['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
  with pytest.raises(ValueError, match='AuxLogits'):
    inception.load_state_dict(model, torchvision_like)


def test_unreadable_or_unsafe_files_raise_value_error(tmp_path):
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(os.urandom(1000))
  with pytest.raises(ValueError, match='not a readable PyTorch state-dict'):
    feature_networks.load_inception(garbage)
  # A pickle that would call os.system must be refused, not executed.
  payload = (pickle.PROTO + b'\x02' + pickle.GLOBAL + b'os\nsystem\n' + pickle.MARK
             + pickle.BINUNICODE + b'\x04\x00\x00\x00true' + pickle.TUPLE + pickle.REDUCE
             + pickle.STOP)
  unsafe = tmp_path / 'unsafe.pth'
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('unsafe/data.pkl', payload)
  unsafe.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match='refusing to load os.system'):
    inception.read_weights(unsafe)
