"""End-to-end check of guidedflow's FID Inception-v3 against an independent NumPy pytorch-fid.

`inception_test.py` checks single conv+BN layers, the pools and the parameter count; those pass
even if two same-width branches are swapped, a block concatenates in the wrong order, or one
block pools the wrong way. Here the whole network is compared, pool3 features against
`inception_reference` (pytorch-fid's `fid_inception_v3` written from the pytorch-fid and
torchvision sources in float64 NCHW), with random weights from `init_state_dict` that go through
the real weight-file path (`save_weights` → `feature_networks.load_inception` →
`inception.load_model`, then `preprocess` of uint8 299×299 images). The last test shows the
comparison has teeth: each of those mistakes, made in the reference only, breaks it by far more
than the tolerance.

Cost: guidedflow's network is compiled once (batch 2, as in `inception_test.py`, so the XLA
cache is shared) and the reference runs once on two images; the deliberately wrong references
restart from the cached input of the block they change, on one image.
"""

import functools

import numpy as np
import pytest

from guidedflow import feature_networks
from guidedflow.models import inception
from tests import inception_reference as ref

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a random
# Inception and its features) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('inception_reference')

BATCH_SIZE = 2
# max |guidedflow − reference| / max |reference| per image. guidedflow runs in float32 (HIGHEST
# precision) through 94 conv+BN layers, the reference in float64; measured on CPU: 4.3e-7.
TOLERANCE = 1e-5
# A wrong network must miss by at least this many tolerances. The subtlest mistake below
# (Mixed_5b's pool counting the padding: only border pixels of 32 of 256 channels change)
# misses by 2.6e-3 = 260 tolerances; the others by 1e-2 to 1.
TEETH_MARGIN = 10
# Output channels of each block's branches (torchvision's Inception3), concatenated in order.
BRANCH_WIDTHS = {
    'stem': [192],
    'Mixed_5b': [64, 64, 96, 32],
    'Mixed_5c': [64, 64, 96, 64],
    'Mixed_5d': [64, 64, 96, 64],
    'Mixed_6a': [384, 96, 288],
    'Mixed_6b': [192] * 4,
    'Mixed_6c': [192] * 4,
    'Mixed_6d': [192] * 4,
    'Mixed_6e': [192] * 4,
    'Mixed_7a': [320, 192, 768],
    'Mixed_7b': [320, 768, 768, 192],
    'Mixed_7c': [320, 768, 768, 192],
}


def _relative_error(got, expected):
  """max |got − expected| / max |expected|: the one measure used for agreement and for teeth."""
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(got - expected).max() / np.abs(expected).max())


def _images():
  """Two 299×299 uint8 images (no resize in `preprocess`): uniform noise and a smooth pattern."""
  noise = np.random.default_rng(0).integers(0, 256, (299, 299, 3), dtype=np.uint8)
  i, j = np.meshgrid(np.arange(299), np.arange(299), indexing='ij')
  smooth = np.stack([127.5 + 127.5 * np.sin(i / 17.0 + c) * np.cos(j / 23.0 - 2 * c)
                     for c in range(3)], axis=-1)
  return np.stack([noise, np.round(smooth).astype(np.uint8)])


@pytest.fixture(scope='module')
def state_dict():
  return inception.init_state_dict(seed=0)


@pytest.fixture(scope='module')
def images():
  return _images()


@pytest.fixture(scope='module')
def guidedflow_features(state_dict, images, tmp_path_factory):
  """guidedflow's features, the weights read back from a `.pth` written by `save_weights`."""
  path = tmp_path_factory.mktemp('inception_reference') / 'pt_inception-random.pth'
  inception.save_weights(state_dict, path)
  extractor = feature_networks.load_inception(path, batch_size=BATCH_SIZE)
  assert extractor.meta['official_weights'] is False
  return extractor(images)['features']


@pytest.fixture(scope='module')
def reference(state_dict, images):
  """(features, trace) of the NumPy pytorch-fid network; trace has every block's branches."""
  trace = {}
  features = ref.fid_inception_v3(state_dict, ref.normalize_input(images), trace=trace)
  return features, trace


def test_random_weights_keep_every_branch_alive(reference):
  """The random weights give a meaningful comparison: no branch is dead, saturated or huge.

  A dead branch (all ReLU outputs 0) would hide any mistake in it; `init_state_dict`'s He-scaled
  kernels and BN statistics near (0, 1) keep roughly half of every branch's units active, so
  the weights need no perturbation. Also checks the reference's block widths.
  """
  features, trace = reference
  assert list(trace) == list(BRANCH_WIDTHS)
  for name, branches in trace.items():
    assert [b.shape[1] for b in branches] == BRANCH_WIDTHS[name], name
    for k, branch in enumerate(branches):
      active = float(np.mean(branch > 0))
      assert 0.2 < active < 0.9, (name, k, active)
      assert np.all(np.isfinite(branch)) and 0.5 < branch.mean() < 50, (name, k, branch.mean())
  assert features.shape == (BATCH_SIZE, 2048)
  assert np.all(np.isfinite(features)) and np.all(features >= 0)
  assert np.mean(features > 0) > 0.5
  assert _relative_error(features[0], features[1]) > 0.1  # the two images differ


def test_features_match_pytorch_fid_reference(guidedflow_features, reference):
  """guidedflow's pool3 features equal pytorch-fid's network's on both images.

  Agreement to float32 round-off over the whole network means every block has the right
  branches, concatenation order, pool types and BN, and the weight file maps each tensor
  (OIHW → HWIO included) to the right layer.
  """
  expected, _ = reference
  got = guidedflow_features
  assert got.shape == expected.shape == (BATCH_SIZE, 2048) and got.dtype == np.float32
  assert np.abs(got).max() > 1 and not np.allclose(got[0], got[1], rtol=0.1)  # not trivial
  for i in range(BATCH_SIZE):
    error = _relative_error(got[i], expected[i])
    assert error < TOLERANCE, (i, error)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=TOLERANCE * np.abs(expected).max())


def _swap_layers(first, second, tensors=('conv.weight', 'bn.weight', 'bn.bias',
                                         'bn.running_mean', 'bn.running_var')):
  """A state-dict mutation exchanging `tensors` of two same-shaped layers."""
  def mutate(sd):
    sd = dict(sd)
    for tensor in tensors:
      a, b = f'{first}.{tensor}', f'{second}.{tensor}'
      assert sd[a].shape == sd[b].shape, (a, b)
      sd[a], sd[b] = sd[b], sd[a]
    return sd
  return mutate


def _reordered(block_fn, order):
  """`block_fn` with its branches concatenated in `order` (indices into pytorch-fid's order)."""
  def block(sd, prefix, x):
    branches = block_fn(sd, prefix, x)
    return [branches[i] for i in order]
  return block


def _halves_swapped(block_fn, branch):
  """`block_fn` with the two halves of branch `branch` swapped (e.g. cat(2b, 2a))."""
  def block(sd, prefix, x):
    branches = list(block_fn(sd, prefix, x))
    half = branches[branch].shape[1] // 2
    branches[branch] = np.concatenate([branches[branch][:, half:], branches[branch][:, :half]],
                                      axis=1)
    return branches
  return block


_ALL_BN = ('bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var')
_E1 = ref.BLOCKS['Mixed_7b']
_E2 = ref.BLOCKS['Mixed_7c']
# id → (first block changed, state-dict mutation or None, {block: wrong block function}).
MISTAKES = {
    # Two same-shaped layers of different branches exchanged (a swapped module name).
    'Mixed_5b swap branch1x1/branch3x3dbl_1': (
        'Mixed_5b', _swap_layers('Mixed_5b.branch1x1', 'Mixed_5b.branch3x3dbl_1'), {}),
    'Mixed_6b swap branch1x1/branch_pool': (
        'Mixed_6b', _swap_layers('Mixed_6b.branch1x1', 'Mixed_6b.branch_pool'), {}),
    'Mixed_6d swap branch7x7_1/branch7x7dbl_1': (
        'Mixed_6d', _swap_layers('Mixed_6d.branch7x7_1', 'Mixed_6d.branch7x7dbl_1'), {}),
    'Mixed_7c swap branch3x3_2a/branch3x3dbl_3a': (
        'Mixed_7c', _swap_layers('Mixed_7c.branch3x3_2a', 'Mixed_7c.branch3x3dbl_3a'), {}),
    'Mixed_7b swap BN of branch3x3_2a/branch3x3_2b': (
        'Mixed_7b', _swap_layers('Mixed_7b.branch3x3_2a', 'Mixed_7b.branch3x3_2b', _ALL_BN), {}),
    # Same-width branches concatenated in the wrong order.
    'Mixed_6e concat branch_pool first': (
        'Mixed_6e', None, {'Mixed_6e': _reordered(ref.fid_inception_c, [3, 1, 2, 0])}),
    'Mixed_7b concat branch3x3dbl before branch3x3': (
        'Mixed_7b', None, {'Mixed_7b': _reordered(_E1, [0, 2, 1, 3])}),
    'Mixed_7c concat branch3x3_2b before 2a': (
        'Mixed_7c', None, {'Mixed_7c': _halves_swapped(_E2, 1)}),
    # The wrong pool in one block (torchvision's unpatched blocks, or E_1/E_2 confused).
    'Mixed_5b avg pool counting padding': (
        'Mixed_5b', None,
        {'Mixed_5b': functools.partial(ref.fid_inception_a, pool=ref.torchvision_avg_pool)}),
    'Mixed_6c avg pool counting padding': (
        'Mixed_6c', None,
        {'Mixed_6c': functools.partial(ref.fid_inception_c, pool=ref.torchvision_avg_pool)}),
    'Mixed_7b max pool': (
        'Mixed_7b', None,
        {'Mixed_7b': functools.partial(ref.fid_inception_e, pool=ref.fid_e2_max_pool)}),
    'Mixed_7c avg pool': (
        'Mixed_7c', None,
        {'Mixed_7c': functools.partial(ref.fid_inception_e, pool=ref.fid_avg_pool)}),
}


def test_comparison_catches_a_wrong_network(state_dict, guidedflow_features, reference):
  """Each mistake above, made in the reference only, misses guidedflow by ≫ the tolerance.

  So a guidedflow network with any of them (swapped same-width branches, a wrong concatenation
  order, the wrong pool in one block) would fail `test_features_match_pytorch_fid_reference`.
  Each wrong network reruns only from the block it changes (input from the trace), on image 0.
  """
  _, trace = reference
  names = list(trace)  # 'stem', 'Mixed_5b', ..., 'Mixed_7c'
  errors = {}
  for mistake, (first, mutate, blocks) in MISTAKES.items():
    sd = mutate(state_dict) if mutate else state_dict
    x = np.concatenate(trace[names[names.index(first) - 1]], axis=1)[:1]
    wrong = ref.pool3(ref.run_blocks(sd, x, names[names.index(first):], blocks=blocks))
    errors[mistake] = _relative_error(guidedflow_features[0], wrong[0])
  missed = {m: e for m, e in errors.items() if e < TEETH_MARGIN * TOLERANCE}
  assert not missed, f'mistakes the comparison would not catch: {missed}'
