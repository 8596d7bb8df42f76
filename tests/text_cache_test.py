"""The text cache: a frozen encoder's outputs for a caption set, streamed to disk, read by id,
refused when foreign, one line when damaged."""

import json
import os
import tracemalloc

import numpy as np
import pytest

from guidedflow import captions
from guidedflow import errors
from guidedflow import text_cache


class _Encoder:
  """A stand-in frozen encoder: bytes as tokens, a fixed random table as hidden states."""

  def __init__(self, seed=0, max_length=24, width=16):
    self.name, self.max_length, self.width = 'stand-in', max_length, width
    self.fingerprint = f'table-{seed}'
    self._table = np.random.default_rng(seed).normal(size=(259, width)).astype(np.float32)

  def tokenize(self, texts):
    ids = np.zeros((len(texts), self.max_length), np.int32)
    for i, text in enumerate(texts):
      row = [b + 3 for b in text.encode()][:self.max_length]
      ids[i, :len(row)] = row
    return ids, (ids > 0).astype(np.int32)

  def encode(self, ids, mask):
    hidden = self._table[ids] * mask[..., None]
    pooled = hidden.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    return {'hidden': hidden, 'pooled': pooled}


TEXTS = captions.caption_table()[:150]


@pytest.mark.parametrize('dtype,tolerance', [('float32', 0), ('float16', 2e-3),
                                             ('bfloat16', 1e-2)])
def test_the_cache_returns_the_encoders_outputs_by_caption_id(tmp_path, dtype, tolerance):
  encoder = _Encoder()
  cache = text_cache.open_or_write(encoder, TEXTS, tmp_path / 'c', dtype=dtype, batch_size=32)
  ids = np.array([149, 0, 77, 77, 31])
  got = cache.get(ids)
  tokens, mask = encoder.tokenize([TEXTS[i] for i in ids])
  want = encoder.encode(tokens, mask)
  np.testing.assert_allclose(got['text_hidden'], want['hidden'], rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(got['text_pooled'], want['pooled'], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got['text_mask'], mask)
  assert json.loads((tmp_path / 'c' / 'captions.json').read_text()) == TEXTS
  meta = json.loads((tmp_path / 'c' / 'meta.json').read_text())
  assert meta['num_captions'] == 150 and meta['dtype'] == dtype


class _Spy(_Encoder):
  """The stand-in, recording the lengths it was asked to encode at."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.lengths = []

  def encode(self, ids, mask):
    self.lengths.append(ids.shape[1])
    return super().encode(ids, mask)


def test_batches_are_encoded_at_their_longest_captions_padded_length(tmp_path):
  """Captions of 9 to 60 bytes, max_length 64: sorted by length, each batch trimmed to the
  next power of two ≥ 8 of its longest; the cache is still every row's full-length encoding."""
  encoder = _Spy(max_length=64)
  texts = captions.caption_table()[::25]
  cache = text_cache.open_or_write(encoder, texts, tmp_path / 'c', dtype='float32',
                                   batch_size=16)
  calls = encoder.lengths
  tokens, mask = encoder.tokenize(texts)
  assert calls == sorted(calls) and set(calls) == {16, 32, 64} and mask.sum(1).max() > 32
  got = cache.get(np.arange(len(texts)))
  np.testing.assert_array_equal(got['text_hidden'], encoder.encode(tokens, mask)['hidden'])
  np.testing.assert_array_equal(got['text_mask'], mask)
  meta = json.loads((tmp_path / 'c' / 'meta.json').read_text())
  last = len(texts) - 16 * (len(calls) - 1)  # the last batch's real rows
  assert meta['tokens_encoded_per_caption'] == round(
      (16 * sum(calls[:-1]) + last * calls[-1]) / len(texts), 1)


@pytest.mark.parametrize('encoder,folder', [('clip', 'clip/b_gelu'), ('t5', 't5/single')])
def test_a_real_encoders_cache_equals_its_full_length_encoding(tmp_path, encoder, folder):
  """The parity fixtures' CLIP (causal) and T5 (masked, relative positions): encoded trimmed
  to each batch's length, every real token's state and the pooled vector are those of the
  full-length encode; padded positions are zero."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from guidedflow import text_encoders  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.text.encoder, config.text.weights = encoder, os.path.join(FIXTURES, folder)
  frozen = text_encoders.load(config)
  texts = captions.caption_table()[::40] + ['bag', 'a bag', 'coat', 'a coat', 'shirt', 'dress',
                                            'a shirt', 'a dress']  # CLIP's: < 8 tiny-BPE tokens
  cache = text_cache.write(frozen, texts, tmp_path / 'c', dtype='float32', batch_size=8)
  assert cache['tokens_encoded_per_caption'] < frozen.max_length
  got = text_cache.TextCache(tmp_path / 'c').get(np.arange(len(texts)))
  ids, mask = frozen.tokenize(texts)
  want = frozen.encode(ids, mask)
  np.testing.assert_allclose(got['text_hidden'], want['hidden'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got['text_pooled'], want['pooled'], rtol=1e-5, atol=1e-5)
  assert not got['text_hidden'][mask == 0].any() and got['text_hidden'][mask == 1].all(-1).all()


def test_a_foreign_cache_is_refused_and_kept(tmp_path):
  text_cache.open_or_write(_Encoder(), TEXTS, tmp_path / 'c')
  before = (tmp_path / 'c' / 'hidden.npy').read_bytes()
  with pytest.raises(text_cache.TextCacheMismatchError, match='fingerprint') as e:
    text_cache.open_or_write(_Encoder(seed=1), TEXTS, tmp_path / 'c')
  assert '\n' not in str(e.value) and 'text.cache_dir' in str(e.value)
  with pytest.raises(text_cache.TextCacheMismatchError, match='captions'):
    text_cache.open_or_write(_Encoder(), TEXTS[:-1] + ['another caption'], tmp_path / 'c')
  assert (tmp_path / 'c' / 'hidden.npy').read_bytes() == before


def test_a_damaged_cache_is_one_line_naming_the_file(tmp_path):
  text_cache.open_or_write(_Encoder(), TEXTS, tmp_path / 'c')
  hidden = tmp_path / 'c' / 'hidden.npy'
  with open(hidden, 'r+b') as f:
    f.seek(os.path.getsize(hidden) - 10)
    f.write(b'\x7f\x7f')
  with pytest.raises(errors.DataError) as e:
    text_cache.TextCache(tmp_path / 'c')
  assert str(hidden) in str(e.value) and 'CRC-32' in str(e.value) and '\n' not in str(e.value)


def test_the_cache_is_streamed_not_held_in_ram(tmp_path):
  encoder = _Encoder(width=64)
  texts = captions.caption_table()[:1024]
  text_cache.write(encoder, texts[:64], tmp_path / 'warm', batch_size=32)
  tracemalloc.start()
  try:
    text_cache.write(encoder, texts, tmp_path / 'c', dtype='float32', batch_size=32)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  size = os.path.getsize(tmp_path / 'c' / 'hidden.npy')
  assert size > 6_000_000 and peak < size / 4, (peak, size)


# ------------------------------------------------------------- through the command line


def _main(workdir, *args, mode='encode'):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests import subprocess_env  # pylint: disable=g-import-not-at-top
  return subprocess.run(
      [sys.executable, '-m', 'guidedflow.main', '--config', 'configs/tiny.py',
       f'--workdir={workdir}', f'--mode={mode}', *args], cwd=subprocess_env.REPO,
      env=subprocess_env.env(), capture_output=True, text=True, timeout=600)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


@pytest.mark.parametrize('encoder,folder', [('clip', 'clip/a_quick_gelu'), ('t5', 't5/sharded')])
def test_encode_writes_the_fashion_mnist_caption_cache_of_a_real_weight_folder(tmp_path, encoder,
                                                                               folder):
  """`--mode=encode` with the parity fixtures' transformers folders (tokenizer found beside)."""
  proc = _main(tmp_path / 'run', f'--config.text.encoder={encoder}',
               f'--config.text.weights={os.path.join(FIXTURES, folder)}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.loads(proc.stdout.strip().splitlines()[-1])['text']
  assert meta['num_captions'] == 3960 and meta['captions'] == text_cache.captions_digest(
      captions.caption_table())
  cache = text_cache.TextCache(tmp_path / 'run' / 'text_cache')
  got = cache.get([0, 3959])
  assert got['text_hidden'].shape == (2, meta['max_length'], meta['width'])
  assert got['text_mask'][0].sum() < got['text_mask'][1].sum()  # 'a T-shirt' is the shortest
  again = _main(tmp_path / 'run', f'--config.text.encoder={encoder}',
                f'--config.text.weights={os.path.join(FIXTURES, folder)}')
  assert again.returncode == 0 and 'Writing the text cache' not in again.stderr  # reused


def test_text_config_errors_are_one_line(tmp_path):
  from tests import subprocess_env  # pylint: disable=g-import-not-at-top
  line = subprocess_env.one_error_line
  line(_main(tmp_path / 'a', '--config.text.encoder=clip'), '--config.text.weights=DIR')
  line(_main(tmp_path / 'b', '--config.text.encoder=clip',
             f'--config.text.weights={os.path.join(FIXTURES, "t5", "single")}'),
       'model.safetensors', 'CLIP')
  line(_main(tmp_path / 'c', '--config.sampling.prompts=a bag', mode='train'),
       'config.sampling.prompts', 'class labels')
  line(_main(tmp_path / 'd', '--config.text.encoder=trained'), 'trained with the generator')
  assert not any(os.path.exists(tmp_path / d) for d in 'acd')


def test_encode_caches_each_split_of_an_image_caption_folder(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from guidedflow.tasks import registry  # pylint: disable=g-import-not-at-top
  from tests import caption_data_test  # pylint: disable=g-import-not-at-top
  caption_data_test.make_folder(tmp_path / 'data', 'train', num=6)
  caption_data_test.make_folder(tmp_path / 'data', 'test', num=3)
  config = tiny.get_config()
  config.input.dataset, config.input.data_dir = 'caption_folder', str(tmp_path / 'data')
  config.input.image_size = 8
  config.text.encoder = 'clip'
  config.text.weights = os.path.join(FIXTURES, 'clip', 'a_quick_gelu')
  registry.prepare(config)
  out = registry.get_task(config, str(tmp_path / 'run')).encode(str(tmp_path / 'run'))
  assert out['text']['train']['num_captions'] == 6 and out['text']['eval']['num_captions'] == 3
  train = text_cache.TextCache(tmp_path / 'run' / 'text_cache' / 'train')
  assert json.loads((train.directory / 'captions.json').read_text())[4] == \
      caption_data_test._caption(4)  # pylint: disable=protected-access


def test_a_captioned_stream_carries_its_text_condition_and_resumes_exactly():
  from guidedflow import batches  # pylint: disable=g-import-not-at-top
  from guidedflow import input_pipeline  # pylint: disable=g-import-not-at-top
  from guidedflow import text_data  # pylint: disable=g-import-not-at-top
  from guidedflow.models import text_transformer  # pylint: disable=g-import-not-at-top
  images, labels = input_pipeline.load_fashion_mnist(None, 'test')
  base = captions.CaptionedDataset(
      input_pipeline.ArrayDataset(images[:300], labels[:300], num_classes=10, split='test'),
      hold_out=False)
  tokenizer = text_transformer.ByteTokenizer(64)
  table = text_data.TokenTable(tokenizer, captions.caption_table())
  data = text_data.TextDataset(base, table)
  stream = batches.BatchIterator(data, global_batch_size=32, seed=1)
  first = [next(stream) for _ in range(12)]  # > 1 epoch: captions redrawn
  for batch in first[:2]:
    texts = [captions.caption_table()[i] for i in np.asarray(batch['caption'])]
    tokens, mask = tokenizer(texts)
    np.testing.assert_array_equal(np.asarray(batch['text_tokens']), tokens)
    np.testing.assert_array_equal(np.asarray(batch['text_mask']), mask)
  condition = text_data.condition(first[0])
  assert sorted(condition) == ['mask', 'null', 'tokens'] and not np.asarray(condition['null']).any()
  resumed = batches.BatchIterator(data, global_batch_size=32, seed=1, start_step=10)
  np.testing.assert_array_equal(np.asarray(next(resumed)['text_tokens']),
                                np.asarray(first[10]['text_tokens']))
