"""A text-conditioned generator end to end on captioned Fashion-MNIST (tiny): trains with
caption dropout and resumes bitwise, samples prompts with CFG (null or negative prompt), keeps
rows independent of their neighbours' padding, and refuses what does not apply in one line."""

import os

import jax
import numpy as np
import pytest

from guidedflow import errors
from guidedflow import sampler as sampler_lib
from guidedflow import train
from guidedflow.tasks import registry
from guidedflow.tasks import text_generator

pytestmark = pytest.mark.xdist_group('text_generator')


def _config(**text):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.text.encoder = 'trained'
  config.text.encoder_width, config.text.encoder_depth = 32, 1
  config.text.max_length = 40
  config.eval.num_batches = 1
  for key, value in text.items():
    config.text[key] = value
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  straight = str(tmp_path_factory.mktemp('straight'))
  state, result = train.train_and_evaluate(_config(), straight)
  resumed = str(tmp_path_factory.mktemp('resumed'))
  config = _config()
  config.train.num_steps = 2
  train.train_and_evaluate(config, resumed)
  resumed_state, _ = train.train_and_evaluate(_config(), resumed)
  return straight, state, result, resumed_state


def test_trains_on_captions_and_resumes_bitwise(runs):
  straight, state, result, resumed_state = runs
  assert result['step'] == 4 and np.isfinite(result['train_loss'])
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(resumed_state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  names = {'/'.join(map(str, path)) for path, _ in
           jax.tree_util.tree_leaves_with_path(state['params'])}
  assert any('null_hidden' in n for n in names) and any('encoder' in n for n in names)
  assert os.path.exists(os.path.join(straight, 'samples', 'grid_latest.png'))


def test_a_row_does_not_see_its_neighbours_padding(runs):
  straight = runs[0]
  config = _config()
  task = registry.get_task(config, straight)
  assert isinstance(task, text_generator.TextGeneratorTask)
  sampler = sampler_lib.Sampler.from_workdir(config, straight)
  key = jax.random.PRNGKey(5)
  short, long = 'a bag', 'a picture of a sneaker that is narrow and patterned'
  mixed, nfe = task.sample_prompts(sampler, [short, long], 2.0, key)
  same_short, _ = task.sample_prompts(sampler, [short, short], 2.0, key)
  same_long, _ = task.sample_prompts(sampler, [long, long], 2.0, key)
  np.testing.assert_array_equal(mixed[0], same_short[0])
  np.testing.assert_array_equal(mixed[1], same_long[1])
  assert nfe == 2 * 3  # Heun, 2 steps, CFG doubled


def test_sample_mode_writes_prompts_and_a_negative_prompt_changes_the_samples(runs, tmp_path):
  straight = runs[0]
  config = _config()
  config.sampling.prompts = 'a dark wide pullover;a small light sandal'
  config.sampling.num_samples = 4
  out = registry.get_task(config, straight).sample(straight)
  with np.load(out['output']) as f:
    assert f['images'].shape == (4, 28, 28, 1)
    assert list(f['prompts']) == ['a dark wide pullover'] * 2 + ['a small light sandal'] * 2
    plain = f['images']
  assert os.path.exists(out['grid'])
  config.sampling.negative_prompt = 'a bag'
  out = registry.get_task(config, straight).sample(straight)
  with np.load(out['output']) as f:
    assert not np.array_equal(f['images'], plain)


def test_a_checkpoint_of_another_text_encoder_is_refused_in_one_line(runs, tmp_path):
  """Sampling (or resuming) a text model with another encoder than it was trained with: one
  line naming the key, nothing written."""
  straight = runs[0]
  listing = lambda: sorted(os.listdir(straight)) + sorted(  # noqa: E731
      os.listdir(os.path.join(straight, 'samples')))
  before = listing()
  for change in ({'encoder_depth': 2}, {'max_length': 48}, {'null': 'empty'}):
    config = _config(**change)
    config.sampling.prompts = 'a bag'
    key = next(iter(change))
    with pytest.raises(errors.ConfigError, match=f'config.text.{key}=') as raised:
      registry.get_task(config, straight).sample(straight)
    assert '\n' not in str(raised.value)
  assert listing() == before


def test_what_does_not_apply_is_one_line():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.sampling.prompts = 'a bag'
  with pytest.raises(errors.ConfigError, match='class labels'):
    registry.validate(config)
  config = _config()
  config.sampling.guidance = 'classifier'
  config.sampling.classifier_workdir = '/somewhere'
  with pytest.raises(errors.ConfigError, match='CFG alone'):
    registry.validate(config)
  config = _config()
  config.input.space = 'latents'  # Fashion-MNIST's captions are drawn from its pixels
  with pytest.raises(errors.ConfigError, match='image–caption dataset'):
    registry.get_task(config).prepare()
  fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip',
                         'a_quick_gelu')
  config = _config(null='empty', encoder='clip', weights=fixture, max_length=None)
  with pytest.raises(errors.ConfigError, match="text.null='empty'"):
    registry.get_task(config).model_constructor((28, 28, 1))


def test_a_frozen_encoder_trains_from_its_text_cache_and_samples_prompts(tmp_path):
  """CLIP (the parity fixture's transformers folder): the cache is written on first use, the
  generator trains on its features, and prompts are encoded by the same encoder to sample."""
  fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip',
                         'a_quick_gelu')
  config = _config(encoder='clip', weights=fixture, max_length=None)
  config.train.num_steps = 2
  workdir = str(tmp_path)
  _, result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 2 and np.isfinite(result['train_loss'])
  assert os.path.exists(os.path.join(workdir, 'text_cache', 'meta.json'))
  config = _config(encoder='clip', weights=fixture, max_length=None)
  config.sampling.prompts = 'a dark sneaker;a bag'
  config.sampling.num_samples = 2
  out = registry.get_task(config, workdir).sample(workdir)
  assert out['num_samples'] == 2
