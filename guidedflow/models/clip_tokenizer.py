"""CLIP's byte-level BPE tokenizer through the `tokenizers` package, from the user's
`tokenizer.json` or `vocab.json` + `merges.txt` (nothing is downloaded).

Built from `vocab.json` + `merges.txt` it is transformers 5's `CLIPTokenizer`: NFC, runs of
whitespace → one space, lowercase; CLIP's pre-tokenisation regex, byte-level BPE with `</w>`
word ends, `<|endoftext|>` for unknown symbols. A `tokenizer.json` is used as it is, its own
truncation, padding and special-token post-processing switched off: here each prompt becomes
`<|startoftext|>`, at most `max_length − 2` tokens, `<|endoftext|>`, then padding to
`max_length` (77). A longer prompt is cut (as transformers and OpenAI's `clip.tokenize(...,
truncate=True)` do) with one warning per call that names the limit.

The pad token is the model's: `<|endoftext|>` (OpenAI's CLIP ViT-L/14, SD 1.x, SDXL's first
encoder: `PAD_OPENAI`) or '!' (id 0: OpenCLIP's tokenizer, SD 2.x's and SDXL's second
tokenizer: `PAD_OPEN_CLIP`). transformers' `CLIPTokenizer(pad_token='!')` also turns a '!' in
the prompt into that pad id (the pad token is an added special token there); OpenCLIP's
tokenizer, which SD 2.x and SDXL were trained with, does not, and neither does this one.
"""

import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from absl import logging
from tokenizers import decoders, models, normalizers, pre_tokenizers

from guidedflow import errors
from guidedflow.models.clip_text import MAX_LENGTH

BOS, EOS = '<|startoftext|>', '<|endoftext|>'
PAD_OPENAI = EOS
PAD_OPEN_CLIP = '!'
_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
          r"""[^\s\p{L}\p{N}]+""")


class ClipTokenizerFileError(errors.DataError, FileNotFoundError):
  """A tokenizer file is missing or unreadable; the message names it and what to give."""


def _missing(path: str, what: str) -> ClipTokenizerFileError:
  return ClipTokenizerFileError(
      f'CLIP tokenizer file {path!r} not found ({what}): give the tokenizer directory of the '
      'text encoder (e.g. tokenizer/ of an SD repository) with tokenizer.json, or vocab.json and '
      'merges.txt.')


def bpe_from_vocab(vocab_path: str | os.PathLike, merges_path: str | os.PathLike
                   ) -> tokenizers.Tokenizer:
  """transformers 5's `CLIPTokenizer` pipeline from CLIP's `vocab.json` and `merges.txt`."""
  for path, what in ((vocab_path, 'vocab.json'), (merges_path, 'merges.txt')):
    if not os.path.isfile(path):
      raise _missing(os.fspath(path), f'the {what} of a CLIP BPE')
  try:
    vocab, merges = models.BPE.read_file(os.fspath(vocab_path), os.fspath(merges_path))
  except Exception as e:  # tokenizers raises plain Exception on malformed files
    raise ClipTokenizerFileError(f'{vocab_path} / {merges_path}: not a BPE vocab.json + '
                                 f'merges.txt ({errors.one_line(e)}).') from e
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix='',
                                        end_of_word_suffix='</w>', fuse_unk=False,
                                        unk_token=EOS))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_SPLIT), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([BOS, EOS])  # matched whole in a prompt, never split by BPE
  return tok


class ClipTokenizer:
  """Prompts → (ids int32 (B, max_length), mask int32 (B, max_length), 1 on real tokens).

  Args:
    tokenizer: a `tokenizers.Tokenizer` with CLIP's vocabulary (`from_files`).
    max_length: tokens per prompt, the special tokens included (77 for every SD encoder).
    pad_token: `PAD_OPENAI` ('<|endoftext|>') or `PAD_OPEN_CLIP` ('!', id 0); see the module
      docstring.
    source: names the files in error messages.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, max_length: int = MAX_LENGTH,
               pad_token: str = PAD_OPENAI, source: str = 'tokenizer'):
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, pad_token)}
    absent = [t for t, i in ids.items() if i is None]
    if absent:
      raise ClipTokenizerFileError(f'{source}: the vocabulary has no {absent[0]!r}: not a CLIP '
                                   'tokenizer (give the text encoder\'s own tokenizer files).')
    if max_length < 3:
      raise errors.ConfigError(f'CLIP tokenizer max_length={max_length} must be at least 3.')
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[pad_token]

  @classmethod
  def from_files(cls, path: str | os.PathLike, merges: str | os.PathLike | None = None,
                 **kwargs) -> 'ClipTokenizer':
    """From a `tokenizer.json`, a `vocab.json` and `merges`, or a directory holding either
    (tokenizer.json preferred). kwargs: see the class.

    Raises:
      ClipTokenizerFileError (a DataError and FileNotFoundError): a file missing or unreadable.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      if os.path.isfile(os.path.join(path, 'tokenizer.json')):
        path = os.path.join(path, 'tokenizer.json')
      else:
        path, merges = os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt')
    kwargs.setdefault('source', path)
    if merges is not None:
      return cls(bpe_from_vocab(path, merges), **kwargs)
    if not os.path.isfile(path):
      raise _missing(path, "a tokenizer.json, or a vocab.json with merges=")
    if _is_vocab(path):
      raise _missing(os.path.join(os.path.dirname(path), 'merges.txt'),
                     f'{os.path.basename(path)} is a vocabulary: pass merges= too')
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception on malformed files
      raise ClipTokenizerFileError(f'{path}: not a tokenizers tokenizer.json '
                                   f'({errors.one_line(e)}).') from e
    return cls(tok, **kwargs)

  def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both int32 (B, max_length); a single string is a batch of one."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    room = self.max_length - 2
    encodings = self.tokenizer.encode_batch(prompts, add_special_tokens=False)
    ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), self.max_length), np.int32)
    cut = 0
    for row, encoding in enumerate(encodings):
      tokens = encoding.ids[:room]
      cut += len(encoding.ids) > room
      ids[row, :len(tokens) + 2] = [self.bos_id, *tokens, self.eos_id]
      mask[row, :len(tokens) + 2] = 1
    if cut:
      logging.warning('%d of %d prompts are longer than the CLIP limit of %d tokens (%d with '
                      'the start and end tokens): truncated to it.', cut, len(prompts), room,
                      self.max_length)
    return ids, mask


def _is_vocab(path: str) -> bool:
  """Whether `path` is a vocab.json (a flat token → id mapping), not a tokenizer.json."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and 'model' not in data
