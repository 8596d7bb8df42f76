"""The config schema: every key once, with its default; configs completed, checked and locked
once per run; saved configs of older versions read with the behaviour of their time."""

import glob
import importlib
import os
import re

import ml_collections
import pytest

from guidedflow import errors
from guidedflow import resume_config
from guidedflow import schema
from guidedflow import validation
from guidedflow.schema import common
from guidedflow.tasks import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith('__init__.py'))


_flat = resume_config._flatten  # pylint: disable=protected-access


@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_has_every_key_of_its_schema(name):
  """A config file the README runs is its schema with values changed: completing it adds
  nothing, and it names no key the schema lacks (a typo would be read by nobody)."""
  config = importlib.import_module(f'configs.{name}').get_config()
  keys = set(_flat(config.to_dict()))
  completed = schema.complete(ml_collections.ConfigDict(config.to_dict()))
  schema_keys = set(_flat(schema.SCHEMAS[config.task]().to_dict()))
  assert set(_flat(completed.to_dict())) == keys == schema_keys


def test_shared_sections_are_the_same_in_every_schema():
  """The auxiliary networks' configs are built from the shared sections, not copies that drift:
  each schema's optim, checkpoint, mesh, compile and train sections have the shared keys."""
  shared = {'optim': common.optim(learning_rate=1.0, warmup_steps=0),
            'checkpoint': common.checkpoint(every_steps=1, max_to_keep=1),
            'mesh': common.mesh(), 'compile': common.compile_target(),
            'train': common.train(num_steps=1, batch_size=1), 'input': common.data()}
  for task, make in schema.SCHEMAS.items():
    config = make()
    for section, keys in shared.items():
      assert set(keys.keys()) <= set(config[section].keys()), (task, section)
    assert set(config.optim.keys()) == set(shared['optim'].keys()), task
    assert config.mesh.to_dict() == shared['mesh'].to_dict(), task


def test_complete_fills_a_partial_config_and_keeps_what_it_has():
  config = ml_collections.ConfigDict({'model': {'name': 'unet'}, 'train': {'num_steps': 7},
                                      'optim': {'learning_rate': 5e-4}})
  schema.complete(config)
  assert config.task == 'generate'
  assert config.model.name == 'unet' and config.train.num_steps == 7
  assert config.optim.learning_rate == 5e-4
  defaults = schema.SCHEMAS['generate']()
  assert config.optim.b2 == defaults.optim.b2 == 0.999
  assert config.sampling.num_steps == defaults.sampling.num_steps
  assert config.mesh.to_dict() == defaults.mesh.to_dict()
  # Keys newer than the config take the behaviour of its time, not today's default.
  assert config.model.attention_impl == 'einsum' != defaults.model.attention_impl
  assert config.sampling.classifier_scale == 0.0 != defaults.sampling.classifier_scale
  # A typed field of the schema keeps its type: remat accepts True / False and policy names.
  config.model.remat = True
  config.model.remat = 'full'
  with pytest.raises(errors.ConfigError, match="config.task='gan' is not one of"):
    schema.complete(ml_collections.ConfigDict({'task': 'gan'}))


def test_a_saved_config_of_an_older_version_resumes_with_its_meaning():
  """A checkpoint's config written before a key existed compares as that key's value of the
  time: no spurious refusal, and a real change of meaning is still refused."""
  config = ml_collections.ConfigDict(registry.validate(
      importlib.import_module('configs.tiny').get_config()).to_dict())
  saved = resume_config._as_json(config)  # pylint: disable=protected-access
  del saved['model']['unet_norm'], saved['sampling']['npz_keys'], saved['compile']
  assert resume_config.differences(saved, config) == {}
  saved['model']['variant'] = 'T/2'
  with pytest.raises(errors.ConfigError, match='config.model.variant'):
    resume_config.check(config, saved, 4, '/tmp/x')


def test_prepare_checks_once_and_locks(monkeypatch):
  calls = []
  real = validation.check_common
  monkeypatch.setattr(validation, 'check_common', lambda c: calls.append(1) or real(c))
  config = importlib.import_module('configs.tiny').get_config()
  assert registry.prepare(config) is config
  assert registry.prepare(config) is config  # the loop, given main's prepared config
  assert len(calls) == 1
  with pytest.raises(AttributeError):
    config.train.num_step = 5  # a misspelled key is refused, not added
  config = importlib.import_module('configs.tiny').get_config()
  config.optim.b2 = 1.5
  with pytest.raises(errors.ConfigError, match=r'config.optim.b2=1.5 must be in \[0, 1\)'):
    registry.prepare(config)


@pytest.mark.parametrize('name', ['fmnist_classifier', 'fmnist_noisy_classifier',
                                  'fmnist_autoencoder'])
def test_each_task_checks_its_own_sections(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  registry.validate(config)
  config.model.channels = ()
  with pytest.raises(errors.ConfigError, match='config.model.channels=.* non-empty tuple'):
    registry.validate(config)


def test_no_defaults_read_outside_the_schema():
  """Defaults live in the schema only: no `config....get(key, default)` in guidedflow/."""
  pattern = re.compile(r'config[\w.\[\]\']*\.get\(')
  found = []
  for path in glob.glob(os.path.join(ROOT, 'guidedflow', '**', '*.py'), recursive=True):
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if pattern.search(line):
          found.append(f'{os.path.relpath(path, ROOT)}:{number}: {line.strip()}')
  assert not found, '\n'.join(found)


@pytest.mark.parametrize('name', ['fmnist_classifier', 'fmnist_noisy_classifier',
                                  'fmnist_autoencoder', 'fmnist_encoder', 'tiny'])
def test_what_every_task_reads_is_in_its_schema(name):
  """The loop's and the task base's reads (data splits, periodic work, checkpoints, mesh) find
  their keys in a prepared config of every task: a locked config has no other keys."""
  config = registry.prepare(importlib.import_module(f'configs.{name}').get_config())
  task = registry.get_task(config)
  assert task.train_dataset().num_examples == 60_000
  assert task.eval_dataset().num_examples == 10_000
  assert config.eval.every_steps == 0 and config.checkpoint.max_to_keep >= 1


def test_guidance_scales_beyond_the_documented_range_are_warned_of(caplog):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  registry.validate(config)
  assert not [r for r in caplog.records if 'documented range' in r.getMessage()]
  config.sampling.guidance_scale = 1e9
  config.eval.guidance_scales = (1.0, 12.0)
  config.sampling.classifier_scale = -1.0
  registry.validate(config)  # accepted, with a warning per key
  warned = [r.getMessage() for r in caplog.records if 'documented range' in r.getMessage()]
  assert len(warned) == 3 and all('[0, 10]' in m for m in warned), warned
  assert 'config.sampling.guidance_scale=1e+09' in warned[0]
  assert 'config.eval.guidance_scales=12 ' in warned[1]
  assert 'config.sampling.classifier_scale=-1 ' in warned[2]


def test_cfg_pp_scales_are_lambdas_and_warned_of_beyond_one(caplog):
  """With guidance_method='cfg_pp' the guidance scales are λ: a CFG-sized w (3) is warned of
  in λ's range and named as λ, with the key that gives CFG's w; w_c keeps w's range."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.sampling.guidance_method, config.sampling.method = 'cfg_pp', 'euler'
  config.sampling.guidance_scale, config.sampling.grid_guidance_scales = 0.4, (0.2, 0.8)
  registry.validate(config)
  assert not [r for r in caplog.records if 'documented range' in r.getMessage()]
  config.sampling.guidance_scale, config.sampling.classifier_scale = 3.0, 5.0
  registry.validate(config)
  warned = [r.getMessage() for r in caplog.records if 'documented range' in r.getMessage()]
  assert len(warned) == 1 and "config.sampling.guidance_scale=3 is CFG++'s λ" in warned[0]
  assert '[0, 1]' in warned[0] and 'guidance_method=cfg ' in warned[0]
