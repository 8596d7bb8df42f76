"""The word tokenizer of a run (guidedflow/text_vocabulary.py): training keeps the caption
vocabulary in the workdir, sampling rebuilds the same ids (and the encoder's embedding rows)
from it whatever the caption source says now, and resuming on other captions or another
tokenizer kind is refused in one line. No training: the task's tables, prompts and model shapes."""

import json
import os

from flax import nnx
import numpy as np
import pytest

from guidedflow import captions
from guidedflow import errors
from guidedflow import resume_config
from guidedflow import text_vocabulary
from guidedflow.models import factory
from guidedflow.tasks import registry


def _config(kind='words'):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.text.encoder = 'trained'
  config.text.encoder_width, config.text.encoder_depth = 32, 1
  config.text.tokenizer_kind = kind
  config.text.null = 'empty'  # the empty prompt goes through the tokenizer too
  return config


PROMPTS = ['a dark wide pullover', 'a photo of a small light sandal', '']


def test_training_keeps_the_vocabulary_and_sampling_rebuilds_the_same_ids(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  table = captions.caption_table()
  train_task = registry.get_task(_config(), workdir)
  tokens = train_task._table('captions', table).tokens  # pylint: disable=protected-access
  with open(os.path.join(workdir, text_vocabulary.FILE), encoding='utf-8') as f:
    saved = json.load(f)['words']
  assert saved == sorted(saved) and len(saved) == 49 and tokens.shape == (len(table), 16)
  expected = train_task.prompts().condition(PROMPTS)

  # --mode=sample later, with the caption code changed meanwhile: the saved words decide.
  monkeypatch.setattr(captions, 'caption_table', lambda: table + ['a shiny bag'])
  sample_task = registry.get_task(_config(), workdir)
  assert list(sample_task.tokenizer().words) == saved
  got = sample_task.prompts().condition(PROMPTS)
  for key in ('tokens', 'mask', 'null'):
    np.testing.assert_array_equal(got[key], expected[key])
  model = nnx.eval_shape(sample_task.model_constructor((28, 28, 1)))
  assert model.encoder.token_embed.embedding.shape == (49 + 4, 32)

  # Resuming on those changed captions: refused, one line naming the new word, file untouched.
  with pytest.raises(errors.ConfigError, match="shiny") as raised:
    registry.get_task(_config(), workdir)._table(  # pylint: disable=protected-access
        'captions', captions.caption_table())  # what the training split's dataset does
  assert '\n' not in str(raised.value) and '--workdir' in str(raised.value)
  assert text_vocabulary.load(workdir) == tuple(saved)


def test_another_tokenizer_kind_is_refused_on_resume_and_words_need_the_vocabulary():
  with pytest.raises(errors.ConfigError, match='config.text.tokenizer_kind=') as raised:
    resume_config.check(_config('words'), _config('bytes').to_dict(), 10, '/run')
  assert '\n' not in str(raised.value)
  with pytest.raises(errors.ConfigError, match='vocabulary') as raised:
    factory.constructor(_config('words'), (28, 28, 1))
  assert '\n' not in str(raised.value)
  model = nnx.eval_shape(factory.constructor(_config('bytes'), (28, 28, 1)))
  assert model.encoder.token_embed.embedding.shape == (259, 32)


def test_a_trained_run_whose_vocabulary_file_is_gone_is_refused(tmp_path):
  """The file is the only record of the ids the checkpoints' embedding rows follow: with a
  checkpoint in the workdir a missing file is one line, never a vocabulary rebuilt from today's
  captions; without one (a run that stopped before its first save) it is rebuilt."""
  workdir = str(tmp_path)
  registry.get_task(_config(), workdir)._table(  # pylint: disable=protected-access
      'captions', captions.caption_table())
  os.remove(os.path.join(workdir, text_vocabulary.FILE))
  assert len(registry.get_task(_config(), workdir).tokenizer().words) == 49
  (tmp_path / 'checkpoints' / '1600').mkdir(parents=True)
  with pytest.raises(errors.DataError, match=text_vocabulary.FILE) as raised:
    registry.get_task(_config(), workdir).tokenizer()
  assert '\n' not in str(raised.value) and '--workdir' in str(raised.value)
  assert not os.path.exists(os.path.join(workdir, text_vocabulary.FILE))
