"""Image–caption data (guidedflow/caption_data.py): a Hugging Face imagefolder with metadata.jsonl
and WebDataset tar shards, made tiny in temp dirs; random access, batches through grain workers,
per-process slices, resuming, and one line naming the file for each kind of bad data."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from guidedflow import batches
from guidedflow import caption_data
from guidedflow import errors
from guidedflow import input_pipeline

SIZE = 16
NUM = 10
SIZES = [(20, 30), (40, 17), (16, 16), (33, 50), (64, 24)]


def _image(index):
  """A flat image whose colour encodes `index` (JPEG keeps flat colours to within a few levels)."""
  h, w = SIZES[index % len(SIZES)]
  colour = (20 * index + 10, 250 - 20 * index, 128)
  return Image.fromarray(np.broadcast_to(np.uint8(colour), (h, w, 3)).copy())


def _index_of(image):
  return int(np.rint((np.median(image[..., 0]) - 10) / 20))


def _encoded(index, fmt):
  buffer = io.BytesIO()
  _image(index).save(buffer, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def _caption(index):
  return f'a flat colour number {index} ünïcode'


def make_folder(root, split='train', num=NUM, column='text'):
  folder = root / split
  (folder / 'sub').mkdir(parents=True)
  with open(folder / 'metadata.jsonl', 'w', encoding='utf-8') as f:
    for i in range(num):
      name = f'sub/{i}.jpg' if i % 2 else f'{i}.png'
      (folder / name).write_bytes(_encoded(i, 'PNG' if name.endswith('png') else 'JPEG'))
      f.write(json.dumps({'file_name': name, column: _caption(i), 'width': 3}) + '\n')
  return root


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shard(path, indices, *, skip=()):
  with tarfile.open(path, 'w') as tar:
    for i in indices:
      key = f'shard/{i:06d}'
      if 'image' not in skip:
        fmt = 'PNG' if i % 3 == 0 else 'JPEG'
        _add(tar, f'{key}.{"png" if fmt == "PNG" else "jpg"}', _encoded(i, fmt))
      if 'txt' not in skip:
        _add(tar, f'{key}.txt', _caption(i).encode('utf-8'))
      _add(tar, f'{key}.json', b'{"ignored": true}')


def make_shards(root, split='train', num=NUM, per_shard=4):
  folder = root / split
  folder.mkdir(parents=True)
  for s, lo in enumerate(range(0, num, per_shard)):
    write_shard(folder / f'{split}-{s:05d}.tar', range(lo, min(num, lo + per_shard)))
  return root


@pytest.fixture(params=['caption_folder', 'webdataset'])
def dataset(request, tmp_path):
  if request.param == 'caption_folder':
    return caption_data.CaptionFolderDataset(make_folder(tmp_path), 'train', image_size=SIZE)
  return caption_data.WebDatasetShards(make_shards(tmp_path), 'train', image_size=SIZE)


def test_random_access_gives_each_image_its_caption(dataset):
  assert dataset.num_examples == NUM and dataset.image_shape == (SIZE, SIZE, 3)
  assert dataset.num_classes == 0 and dataset.decodes_files
  indices = np.array([7, 0, 3, 9, 3, 4])
  batch = dataset.get_batch(indices)
  assert set(batch) == {'image', 'caption'}  # no classes, no strings
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (6, SIZE, SIZE, 3)
  assert batch['caption'].dtype == np.int32
  assert [_index_of(image) for image in batch['image']] == indices.tolist()
  assert dataset.captions_of(batch['caption']) == [_caption(i) for i in indices]
  # The caption set in id order (what the text cache encodes): the example's caption at its id.
  assert dataset.caption_table() == [_caption(i) for i in range(NUM)]


def test_create_dataset_reads_both_layouts_from_the_config(tmp_path):
  make_folder(tmp_path / 'folder', column='caption')
  folder = input_pipeline.create_dataset(
      {'dataset': 'caption_folder', 'data_dir': str(tmp_path / 'folder'), 'image_size': SIZE,
       'caption_column': 'caption'}, 'train')
  assert folder.captions_of([5]) == [_caption(5)]
  make_shards(tmp_path / 'shards', 'val', num=5)
  for data_dir in (tmp_path / 'shards', tmp_path / 'shards' / '{split}' / '*.tar',
                   tmp_path / 'shards' / 'val' / 'val-00001.tar'):
    shards = input_pipeline.create_dataset(
        {'dataset': 'webdataset', 'data_dir': str(data_dir), 'image_size': SIZE}, 'val')
    first = 4 if data_dir.name.endswith('1.tar') else 0
    assert shards.num_examples == 5 - first
    assert _index_of(shards.get_batch([0])['image'][0]) == first
    assert shards.captions_of([0]) == [_caption(first)]


def _stream(dataset, workers, steps, state=None, **kw):
  with batches.BatchIterator(dataset, global_batch_size=4, seed=3, workers=workers,
                             **kw) as stream:
    if state:
      stream.set_state(state)
    got = [{k: np.asarray(v) for k, v in next(stream).items()} for _ in range(steps)]
    return got, stream.get_state()


def test_worker_processes_give_the_same_batches_and_resume(dataset):
  """Grain workers decode (the dataset pickles into them) the same batches as the loop's
  thread; a state taken after 3 steps resumes to the identical 4th and 5th batch."""
  expected, _ = _stream(dataset, 0, 5)
  ids = np.stack([b['caption'] for b in expected])
  # Every example once per epoch (10 examples = 2.5 batches of 4).
  assert sorted(ids.reshape(-1)[:NUM].tolist()) == list(range(NUM))
  for b in expected:  # each image is still its caption's image after to_model / to_jax
    np.testing.assert_array_equal(
        [_index_of((np.asarray(im) + 1) * 127.5) for im in b['image']], b['caption'])
  first, state = _stream(dataset, 1, 3)
  assert state['step'] == 3 and state['num_examples'] == NUM
  rest, _ = _stream(dataset, 1, 2, state)
  rest_in_thread, _ = _stream(dataset, 0, 2, state, prefetch=2)
  for got in (first + rest, expected[:3] + rest_in_thread):
    for a, b in zip(got, expected):
      np.testing.assert_array_equal(a['caption'], b['caption'])
      np.testing.assert_array_equal(a['image'], b['image'])


def test_two_processes_partition_each_global_batch(dataset):
  whole = batches.HostBatches(dataset, global_batch_size=6, seed=1)
  halves = [batches.HostBatches(dataset, global_batch_size=6, seed=1, process_index=p,
                                process_count=2) for p in (0, 1)]
  for step in range(4):
    parts = [h[step]['caption'] for h in halves]
    assert all(len(p) == 3 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole[step]['caption'])
    np.testing.assert_array_equal(np.concatenate([h[step]['image'] for h in halves]),
                                  whole[step]['image'])


def test_process_local_shards_split_the_shards_between_processes(tmp_path):
  make_shards(tmp_path, num=NUM, per_shard=2)  # 5 shards
  parts = [caption_data.WebDatasetShards(tmp_path, 'train', image_size=SIZE, process_local=True,
                                         process_index=p, process_count=2) for p in (0, 1)]
  assert [p.num_examples for p in parts] == [6, 4] and all(p.process_local for p in parts)
  seen = [_index_of(im) for p in parts for im in p.get_batch(np.arange(p.num_examples))['image']]
  assert sorted(seen) == list(range(NUM))
  stream = batches.HostBatches(parts[1], global_batch_size=4, seed=0, process_index=1,
                               process_count=2)
  assert len(stream[0]['caption']) == 2  # this process's part of the global batch alone


# -- bad data: one line naming the file and the fix ------------------------------------------------


def _one_line(excinfo, *names):
  message = str(excinfo.value)
  assert '\n' not in message and excinfo.type is errors.DataError
  for name in names:
    assert str(name) in message, message
  return message


def _rewrite_metadata(root, edit):
  path = root / 'train' / 'metadata.jsonl'
  lines = path.read_text(encoding='utf-8').splitlines()
  edit(lines)
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


def test_folder_errors_name_the_file_the_line_and_the_fix(tmp_path):
  with pytest.raises(errors.DataError) as e:
    caption_data.CaptionFolderDataset(tmp_path, 'train', image_size=SIZE)
  assert 'Write it' in _one_line(e, tmp_path / 'train' / 'metadata.jsonl')
  root = make_folder(tmp_path)

  def check(edit, *expected):
    original = (root / 'train' / 'metadata.jsonl').read_text(encoding='utf-8')
    path = _rewrite_metadata(root, edit)
    with pytest.raises(errors.DataError) as e:
      caption_data.CaptionFolderDataset(root, 'train', image_size=SIZE)
    path.write_text(original, encoding='utf-8')
    return _one_line(e, path, *expected)

  def not_json(lines):
    lines[3] = lines[3][:-5]

  def no_caption(lines):
    lines[2] = json.dumps({'file_name': '2.png', 'caption': 'elsewhere'})

  def missing_file(lines):
    lines[5] = json.dumps({'file_name': 'sub/gone.jpg', 'text': 'x'})

  assert 'fix or delete' in check(not_json, 'line 4 is not JSON')
  message = check(no_caption, 'line 3 (2.png)', 'columns: caption, file_name',
                  'caption_column')
  assert 'no caption' in message
  assert 'delete its line' in check(missing_file, root / 'train' / 'sub' / 'gone.jpg', 'line 6')
  with pytest.raises(errors.DataError) as e:
    caption_data.CaptionFolderDataset(root, 'train', image_size=SIZE, caption_column='alt')
  _one_line(e, 'line 1', '"alt"')


def test_an_undecodable_image_is_named_when_its_batch_is_read(tmp_path):
  root = make_folder(tmp_path)
  (root / 'train' / 'sub' / '3.jpg').write_bytes(b'not a jpeg')
  dataset = caption_data.CaptionFolderDataset(root, 'train', image_size=SIZE)  # opens: exists
  dataset.get_batch([0, 2])
  with pytest.raises(errors.DataError) as e:
    dataset.get_batch([1, 3])
  assert 'Replace the file' in _one_line(e, 'cannot decode', root / 'train' / 'sub' / '3.jpg')
  # Decoded in a grain worker process, the error reaches the loop as the same one line.
  with pytest.raises(errors.DataError) as e:
    _stream(dataset, 1, 3)
  _one_line(e, 'cannot decode', root / 'train' / 'sub' / '3.jpg')

  shards = make_shards(tmp_path / 'shards', num=3)
  path = shards / 'train' / 'train-00000.tar'
  data = bytearray(path.read_bytes())
  start = data.index(b'\x89PNG')  # sample 0 is a PNG: damage its header in place
  data[start:start + 8] = b'XXXXXXXX'
  path.write_bytes(bytes(data))
  webdataset = caption_data.WebDatasetShards(shards, 'train', image_size=SIZE)
  webdataset.get_batch([1, 2])
  with pytest.raises(errors.DataError) as e:
    webdataset.get_batch([0])
  _one_line(e, 'cannot decode shard/000000.png in', path)


def test_shard_errors_name_the_shard_and_the_fix(tmp_path):
  with pytest.raises(errors.DataError) as e:
    caption_data.WebDatasetShards(tmp_path, 'train', image_size=SIZE)
  _one_line(e, 'no WebDataset shards match', tmp_path / 'train' / '*.tar')
  make_shards(tmp_path, num=4)
  folder = tmp_path / 'train'

  def check(name, write, *expected):
    path = folder / name
    write(path)
    with pytest.raises(errors.DataError) as e:
      caption_data.WebDatasetShards(tmp_path, 'train', image_size=SIZE)
    path.unlink()
    return _one_line(e, path, *expected)

  assert 'remove it' in check('train-00001.tar', lambda p: p.write_bytes(b''), 'empty')
  check('train-00001.tar', lambda p: p.write_bytes(b'just text, no tar ' * 40),
        'not a readable tar file')
  check('train-00001.tar', lambda p: tarfile.open(p, 'w').close(), 'holds no samples')

  def cut(path, at_member_end):  # an interrupted copy: inside a member, or between two
    write_shard(path, [5, 6])
    with tarfile.open(path) as tar:
      end = max(m.offset_data + m.size for m in tar)
    path.write_bytes(path.read_bytes()[:-(-end // 512) * 512 if at_member_end else end - 10])

  for at_member_end in (False, True):
    assert 'write it again' in check('train-00001.tar', lambda p, a=at_member_end: cut(p, a),
                                     'is truncated')
  message = check('train-00001.tar', lambda p: write_shard(p, [7], skip=('txt',)),
                  'sample shard/000007 has shard/000007.jpg but no shard/000007.txt')
  assert 'add the caption' in message
  check('train-00001.tar', lambda p: write_shard(p, [8], skip=('image',)),
        'sample shard/000008 has shard/000008.txt but no image')
