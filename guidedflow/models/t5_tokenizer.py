"""T5's tokenizer from the user's `spiece.model` (sentencepiece) or `tokenizer.json` (tokenizers).

Ids as transformers' `T5Tokenizer(texts, max_length=L, padding='max_length', truncation=True)`
gives them: the pieces, then `</s>` (id 1), then `<pad>` (id 0) up to `max_length`; a text of
more than L − 1 pieces keeps its first L − 1, then `</s>`. One call logs one warning naming the
limit when any text was cut. T5's sentinel tokens (`<extra_id_N>`) are not special here: no
caption needs them.
"""

import os
from typing import Sequence

from absl import logging
import numpy as np

from guidedflow import errors
from guidedflow.models import t5_encoder

SPIECE_FILE = 'spiece.model'
TOKENIZER_JSON_FILE = 'tokenizer.json'
T5_URL = 'https://huggingface.co/google/t5-v1_1-xxl'
EOS_PIECE, PAD_PIECE = '</s>', '<pad>'


class T5TokenizerNotFoundError(errors.DataError, FileNotFoundError):
  """No `spiece.model` / `tokenizer.json` where the T5 tokenizer was looked for."""


def find_tokenizer_file(path: str | os.PathLike) -> str:
  """`path` itself if it is a file, else its `spiece.model`, else its `tokenizer.json`.

  Raises:
    T5TokenizerNotFoundError: none of them exists; the one-line message says what to download.
  """
  path = os.fspath(path)
  candidates = [path] if not os.path.isdir(path) else [
      os.path.join(path, name) for name in (SPIECE_FILE, TOKENIZER_JSON_FILE)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise T5TokenizerNotFoundError(
      f'T5 tokenizer not found: no {" or ".join(candidates)}. Download {SPIECE_FILE} (or '
      f'{TOKENIZER_JSON_FILE}) of the encoder\'s checkpoint, e.g. from {T5_URL}, and pass its '
      'path or folder.')


class T5Tokenizer:
  """Text → (ids int32 (B, L), mask int32 (B, L)) with T5's `</s>` and padding.

  Args:
    path: a `spiece.model` (read with `sentencepiece`), a `tokenizer.json` (read with
      `tokenizers`), or a folder holding either (spiece.model preferred).
    max_length: L, 120 for PixArt-α, 256 for SD3 (`T5Config.max_length`).
  """

  def __init__(self, path: str | os.PathLike, *, max_length: int = t5_encoder.MAX_LENGTH_PIXART_ALPHA):
    if max_length < 2:
      raise errors.ConfigError(f'T5 max_length must be at least 2 (a token and </s>), got '
                               f'{max_length}.')
    self.path = find_tokenizer_file(path)
    self.max_length = int(max_length)
    try:
      if os.path.basename(self.path).endswith('.json'):
        self._load_tokenizers()
      else:
        self._load_sentencepiece()
    except (OSError, RuntimeError, ValueError, TypeError) as e:
      if isinstance(e, errors.UserError):
        raise
      raise errors.DataError(f'{self.path}: not a readable T5 tokenizer ({errors.one_line(e)}); '
                             f'download {SPIECE_FILE} or {TOKENIZER_JSON_FILE} again from '
                             f'{T5_URL}.') from e

  def _load_sentencepiece(self) -> None:
    import sentencepiece  # pylint: disable=import-outside-toplevel

    processor = sentencepiece.SentencePieceProcessor()
    processor.Load(self.path)
    self._encode = lambda texts: processor.Encode(list(texts), out_type=int)
    self.vocab_size = processor.GetPieceSize()
    self.eos_id = self._special_id(processor.eos_id(), EOS_PIECE)
    self.pad_id = self._special_id(processor.pad_id(), PAD_PIECE)

  def _load_tokenizers(self) -> None:
    import tokenizers  # pylint: disable=import-outside-toplevel

    tokenizer = tokenizers.Tokenizer.from_file(self.path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self._encode = lambda texts: [e.ids for e in tokenizer.encode_batch(
        list(texts), add_special_tokens=False)]
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._special_id(tokenizer.token_to_id(EOS_PIECE), EOS_PIECE)
    self.pad_id = self._special_id(tokenizer.token_to_id(PAD_PIECE), PAD_PIECE)

  def _special_id(self, token_id: int | None, piece: str) -> int:
    if token_id is None or token_id < 0:
      raise errors.DataError(f'{self.path}: the tokenizer has no {piece} piece, so it is not '
                             f"T5's; use the {SPIECE_FILE} of the encoder's checkpoint ({T5_URL}).")
    return int(token_id)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """The pieces' ids of each text, without `</s>`, untruncated."""
    return [list(ids) for ids in self._encode(texts)]

  def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both int32 (B, max_length); mask 1 on the pieces and `</s>`, 0 on padding."""
    if isinstance(texts, str):
      texts = [texts]
    limit = self.max_length - 1  # room for </s>
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_length), np.int32)
    truncated = 0
    for row, pieces in enumerate(self.tokenize(texts)):
      truncated += len(pieces) > limit
      pieces = pieces[:limit] + [self.eos_id]
      ids[row, :len(pieces)] = pieces
      mask[row, :len(pieces)] = 1
    if truncated:
      logging.warning('%d of %d prompts are longer than the T5 limit of %d tokens (max_length, '
                      '</s> included) and were truncated to it.', truncated, len(texts),
                      self.max_length)
    return ids, mask
