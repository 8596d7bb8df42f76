"""The trained text encoder's tokenizer of a run, and the caption vocabulary it keeps.

`config.text.tokenizer_kind='bytes'` needs nothing; `'words'` numbers the words of the training
caption set (`text_transformer.vocabulary`: Fashion-MNIST's `captions.caption_table()`, or an
image–caption dataset's train split), a run-level fact like run.json's input shape: the run
writes it to <workdir>/text_vocabulary.json when it first tokenizes its training captions, and a
resumed run, `--mode=sample` and `--mode=evaluate` rebuild the same ids from that file (the
embedding rows of the checkpoint follow them). A resumed run whose training captions give
another vocabulary is refused (the ids would move under the trained embedding), and so is a run
with checkpoints whose file is gone (rebuilding it from today's captions could give its ids to
other words); prompts with words outside it are tokenized as unk, with a warning naming the words.
"""

import json

from etils import epath
import jax

from guidedflow import atomic
from guidedflow import errors
from guidedflow.models import text_transformer

FILE = 'text_vocabulary.json'


def _path(workdir):
  return epath.Path(workdir) / FILE


def load(workdir):
  """The words <workdir>/text_vocabulary.json keeps, or None (no workdir or no such file)."""
  if not workdir or not _path(workdir).exists():
    return None
  try:
    return tuple(json.loads(_path(workdir).read_text())['words'])
  except (ValueError, KeyError, TypeError) as e:
    raise errors.DataError(f'{_path(workdir)} is not a caption vocabulary ({errors.one_line(e)}); '
                           'restore it from the run, or train in a new --workdir.') from e


def tokenizer(config, workdir, training_captions):
  """The trained encoder's tokenizer of the run in `workdir` (`text_transformer.tokenizer`):
  for 'words', the vocabulary the run saved, else that of `training_captions()` (the texts of
  the training caption set; called only when needed)."""
  text = config.text
  words = None
  if text.tokenizer_kind == 'words':
    words = load(workdir)
    if words is None:
      _check_not_trained(workdir)
      words = text_transformer.vocabulary(training_captions())
  return text_transformer.tokenizer(text.tokenizer_kind, text.max_length, words)


def _check_not_trained(workdir):
  """Raises DataError when `workdir` holds checkpoints: their embedding rows follow the ids of
  the vocabulary file the run wrote before its first step, which is gone."""
  checkpoints = epath.Path(workdir) / 'checkpoints' if workdir else None
  if checkpoints is not None and checkpoints.is_dir() and any(
      p.name.isdigit() for p in checkpoints.iterdir()):
    raise errors.DataError(
        f"{_path(workdir)} is missing, but the run has checkpoints whose word embeddings follow "
        "its ids (config.text.tokenizer_kind='words'); restore the file from a copy of the run, "
        'or train in a new --workdir.')


def keep(workdir, tokenizer_, texts):
  """Checks that the training caption set `texts` gives `tokenizer_`'s vocabulary (a
  `WordTokenizer`; others have none) and writes it to the workdir when the run has none yet.

  Raises:
    ConfigError: the captions' vocabulary is not the one the run saved (resumed on other
      captions, or the caption code changed): the trained ids would name other words.
  """
  if not isinstance(tokenizer_, text_transformer.WordTokenizer):
    return
  words = text_transformer.vocabulary(texts)
  if words != tokenizer_.words:
    added = sorted(set(words) - set(tokenizer_.words))
    gone = sorted(set(tokenizer_.words) - set(words))
    raise errors.ConfigError(
        f"config.text.tokenizer_kind='words': the training captions' vocabulary ({len(words)} "
        f'words; new {added[:5]}, missing {gone[:5]}) is not the {len(tokenizer_.words)} words '
        f'{_path(workdir or ".")} keeps for the trained ids; resume on the same captions, or '
        'train in a new --workdir.')
  if workdir and load(workdir) is None and jax.process_index() == 0:
    atomic.write_text(_path(workdir), json.dumps(
        {'tokenizer_kind': 'words', 'words': list(words)}, indent=0))
