"""train.time_budget_minutes: the run measures its step rate in the warm-up, chooses its step
count, writes it into its config, and is then the same run as one given that count."""

import json

import jax
import numpy as np
import pytest
from ml_collections import config_dict

from configs import tiny
from guidedflow import errors
from guidedflow import time_budget
from guidedflow import train
from guidedflow import train_state
from guidedflow.models import factory
from guidedflow.tasks import registry

# One worker runs this module (`--dist loadgroup` in .ci/run): its module fixture (a training run
# the length of the budget) is slow setup that each xdist worker would otherwise repeat.
pytestmark = pytest.mark.xdist_group('time_budget')

# Measured on a 2-core CPU, cold cache: 214 steps/s, 3 s spent by the end of the probe, so 0.3 min
# chooses ~2,900 steps; the chosen count must exceed PROBE_LAST (60) even on a machine a few times
# slower. The equality test trains that count again, so the budget is paid twice.
BUDGET_MINUTES = 0.3


def _config(budget_minutes=BUDGET_MINUTES, num_steps=None):
  config = tiny.get_config()
  config.train.num_steps = config_dict.placeholder(int)
  config.train.num_steps = num_steps
  config.train.time_budget_minutes = budget_minutes
  config.train.log_every_steps = 50
  config.checkpoint.every_steps = 100_000
  config.optim.warmup_steps = 30
  config.optim.schedule = 'cosine'  # the schedule after the warm-up depends on the count
  return config


def _params(workdir, config):
  construct = factory.generator(config, (28, 28, 1))
  builder = train_state.StateBuilder(construct, config, train_state.make_mesh(config))
  with train_state.open_checkpointer(config, str(workdir), handle_sigterm=False) as ckpt:
    state, _ = train_state.restore_or_init(builder, ckpt)
  return [np.array(x) for x in jax.tree.leaves(state)]


@pytest.fixture(scope='module')
def budgeted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('budget')
  config = _config()
  _, result = train.train_and_evaluate(config, str(workdir))
  return workdir, result


def test_budget_chooses_and_records_a_count_within_the_budget(budgeted):
  workdir, result = budgeted
  chosen = result['num_steps']
  assert result['step'] == chosen > time_budget.PROBE_LAST
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['train']['num_steps'] == chosen
  assert saved['train']['time_budget_minutes'] == BUDGET_MINUTES


def test_budgeted_run_equals_the_run_given_its_count(budgeted, tmp_path):
  workdir, result = budgeted
  config = _config(num_steps=result['num_steps'])
  train.train_and_evaluate(config, str(tmp_path))
  for a, b in zip(_params(workdir, config), _params(tmp_path, config)):
    np.testing.assert_array_equal(a, b)


def test_rerun_of_a_finished_budgeted_run_keeps_its_count(budgeted):
  workdir, result = budgeted
  _, again = train.train_and_evaluate(_config(budget_minutes=0.1), str(workdir))
  assert again['step'] == again['num_steps'] == result['num_steps']
  assert again['steps_this_run'] == 0


@pytest.mark.parametrize('overrides,needle', [
    ({'optim.warmup_steps': 5}, 'optim.warmup_steps >= 20'),
    ({'train.time_budget_minutes': 0.0}, 'train.num_steps is not set'),
    ({'train.time_budget_minutes': -1.0}, 'train.time_budget_minutes=-1.0'),
])
def test_budget_config_errors(overrides, needle):
  config = _config()
  for key, value in overrides.items():
    group, name = key.split('.')
    config[group][name] = value
  with pytest.raises(errors.ConfigError) as info:
    registry.validate(config)
  assert needle in str(info.value)


def test_constant_schedule_needs_no_warmup():
  config = _config()
  config.optim.schedule = 'constant'
  config.optim.warmup_steps = 0
  registry.validate(config)


def test_a_budget_spent_before_training_is_one_clear_error(tmp_path):
  with pytest.raises(errors.ConfigError, match='no more than the warm-up'):
    train.train_and_evaluate(_config(budget_minutes=0.001), str(tmp_path))
