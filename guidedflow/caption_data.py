"""Image–caption data: a Hugging Face imagefolder with `metadata.jsonl`, and WebDataset tar shards.

Both are random-access `Dataset`s: images are decoded and center-cropped (`image_folder`'s ADM
crop) on access, in grain worker processes when asked (`decodes_files`), and batches come from
`batches.HostBatches` like every other source (the same permutation per epoch, each process its
slice of the global batch, the iterator state in the checkpoint).

Captions stay on the host. A batch holds `'image'` (uint8) and `'caption'` (int32: a caption
id, the example's index into the dataset's caption set `caption_table()`), as Fashion-MNIST's
`captions.CaptionedDataset` does with its ids into `captions.caption_table()`;
`dataset.captions_of(ids)` gives the texts, and the text cache, built over `caption_table()`,
is read by the same ids. Strings never reach jax, so `batches.to_jax`,
`jax.make_array_from_process_local_data` and grain's shared-memory transfer from workers carry
the batches unchanged. There are no classes: no `'label'` key, `num_classes = 0`.

Layouts:
  caption folder: `<data_dir>/<split>/metadata.jsonl`, one JSON object per line with the image's
    path relative to the split folder under `file_name` and its caption under `caption_column`
    ('text'); other columns are ignored (the Hugging Face imagefolder convention).
  WebDataset: `.tar` shards (`<data_dir>/<split>/*.tar`, a glob that may name `{split}`, or one
    file); a sample is the members sharing a key (the path up to the first dot of the file name):
    `key.jpg` (or .jpeg, .png, .webp) and `key.txt`; other members (`.json`, `.cls`) are ignored.
    Opening scans each shard's headers once and records every image's offset and size, so
    an image is read with one `os.pread`, with nothing extracted.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import numpy as np

from guidedflow import datasets
from guidedflow import errors
from guidedflow import image_folder

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
METADATA = 'metadata.jsonl'


def _line(text: str) -> str:
  return ' '.join(str(text).split())


class _CaptionedImages(datasets.Dataset):
  """Images decoded on access; captions in a host table, a batch's 'caption' ids into it."""

  decodes_files = True  # the latent cache and `BatchIterator(workers=...)` decode in workers
  num_classes = 0  # captions, no classes: batches have no 'label'

  def _set_captions(self, captions: list[str]) -> None:
    # One UTF-8 buffer and its offsets: compact, and pickled into grain workers as two arrays
    # instead of a million Python strings.
    encoded = [c.encode('utf-8') for c in captions]
    self._caption_bytes = np.frombuffer(b''.join(encoded), np.uint8)
    self._caption_offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])])

  def caption(self, caption_id: int) -> str:
    lo, hi = self._caption_offsets[caption_id], self._caption_offsets[caption_id + 1]
    return self._caption_bytes[lo:hi].tobytes().decode('utf-8')

  def caption_table(self) -> list[str]:
    """Every example's caption, in id (= example index) order: the caption set to encode."""
    return [self.caption(i) for i in range(len(self._caption_offsets) - 1)]

  def captions_of(self, caption_ids) -> list[str]:
    """The texts of a batch's 'caption' ids (numpy or jax array of ints)."""
    return [self.caption(int(i)) for i in np.asarray(caption_ids).reshape(-1)]

  def _crop(self, data: bytes, where: str, fix: str) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      with Image.open(io.BytesIO(data)) as image:
        return image_folder.center_crop(image, self.image_shape[0])
    except Image.UnidentifiedImageError:
      raise errors.DataError(f'cannot decode {where}: not an image format PIL reads. '
                             f'{fix}') from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
      raise errors.DataError(f'cannot decode {where}: {_line(e)}. {fix}') from None

  def _image(self, index: int) -> np.ndarray:
    raise NotImplementedError(f'{type(self).__name__} must define _image(index): the decoded, '
                              'cropped image of an example.')

  def get_batch(self, indices):
    indices = np.asarray(indices, np.int64)
    images = [self._image(int(i)) for i in indices]
    return {'image': np.stack(images) if images else np.zeros((0,) + self.image_shape, np.uint8),
            'caption': indices.astype(np.int32)}


def _check_image_size(image_size, what):
  if not image_size or image_size < 1:
    raise errors.DataError(f'{what} needs --config.input.image_size (e.g. 256): its images '
                           'differ in size and are center-cropped to it.')
  return (int(image_size), int(image_size), 3)


class CaptionFolderDataset(_CaptionedImages):
  """`<data_dir>/<split>/metadata.jsonl` and the images it names (Hugging Face imagefolder)."""

  def __init__(self, data_dir, split, *, image_size, caption_column='text'):
    self.image_shape = _check_image_size(image_size, 'an image–caption folder')
    root = os.path.join(os.fspath(data_dir), split)
    metadata = os.path.join(root, METADATA)
    if not os.path.isfile(metadata):
      raise errors.DataError(
          f'{metadata} does not exist: an image–caption folder has one JSON object per line, '
          f'{{"file_name": "a.jpg", "{caption_column}": "a caption"}} (the Hugging Face '
          'imagefolder layout). Write it, or set --config.input.data_dir to the folder holding '
          f'<split>/{METADATA} and --config.input.train_split / eval_split to its split names.')
    files, captions, lines = [], [], []
    with open(metadata, encoding='utf-8') as f:
      for number, text in enumerate(f, 1):
        if not text.strip():
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          raise errors.DataError(
              f'{metadata} line {number} is not JSON ({e.msg}): each line is one object like '
              f'{{"file_name": "a.jpg", "{caption_column}": "a caption"}}; fix or delete the '
              'line.') from None
        if not isinstance(row, dict) or not isinstance(row.get('file_name'), str):
          raise errors.DataError(
              f'{metadata} line {number} has no "file_name" (the image path relative to '
              f'{root}); add it or delete the line.')
        caption = row.get(caption_column)
        if not isinstance(caption, str):
          keys = ', '.join(sorted(row))
          missing = 'no' if caption is None else f'a non-string ({type(caption).__name__})'
          raise errors.DataError(
              f'{metadata} line {number} ({row["file_name"]}) has {missing} caption in column '
              f'"{caption_column}" (its columns: {keys}): add the caption, delete the line, or '
              'set --config.input.caption_column to the column holding the captions.')
        files.append(os.path.join(root, row['file_name']))
        captions.append(caption)
        lines.append(number)
    if not files:
      raise errors.DataError(f'{metadata} names no images: add a line per image, '
                             f'{{"file_name": "a.jpg", "{caption_column}": "a caption"}}.')
    _check_files_exist(files, lines, metadata)
    self.files = files
    self._set_captions(captions)
    self.name, self.split = 'caption_folder', split
    self.num_examples = len(files)

  def _image(self, index):
    path = self.files[index]
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise errors.DataError(f'cannot read {path}: {_line(e)}. Restore the file or delete its '
                             f'line from {METADATA}.') from None
    return self._crop(data, path, f'Replace the file or delete its line from {METADATA}.')


def _check_files_exist(files, lines, metadata):
  """Raises DataError naming the first file of metadata.jsonl that does not exist. Lists each
  folder once instead of a stat per file (cheap on network file systems); decodes nothing."""
  listings = {}
  missing = []
  for path, number in zip(files, lines):
    folder, name = os.path.split(path)
    if folder not in listings:
      try:
        listings[folder] = set(os.listdir(folder))
      except OSError:
        listings[folder] = set()
    if name not in listings[folder]:
      missing.append((path, number))
  if missing:
    path, number = missing[0]
    more = f' (and {len(missing) - 1} more of its {len(files)} files)' if len(missing) > 1 else ''
    raise errors.DataError(
        f'{path}, named on line {number} of {metadata}, does not exist{more}: put the image '
        'there or delete its line (file_name is relative to the folder of metadata.jsonl).')


def shard_files(pattern_or_dir, split):
  """The sorted `.tar` shards of `split`: `<dir>/<split>/*.tar` for a directory, else the glob
  (`{split}` in it is replaced by the split's name) or the single file."""
  pattern = os.fspath(pattern_or_dir or '')
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, split, '*.tar')
  else:
    pattern = pattern.replace('{split}', split)
  files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else (
      [pattern] if os.path.isfile(pattern) else [])
  if not files:
    raise errors.DataError(
        f'no WebDataset shards match {pattern}: set --config.input.data_dir to a folder holding '
        '<split>/*.tar, a glob such as /data/cc3m/{split}-*.tar, or one .tar file.')
  return files


def _index_shard(path):
  """[(key, image member name, offset, size, caption)] of one shard, in member order."""
  file_size = os.path.getsize(path)
  if file_size == 0:
    raise errors.DataError(f'WebDataset shard {path} is empty (0 bytes): write it again or '
                           'remove it from the shard folder.')
  images, texts, order = {}, {}, []
  truncated = errors.DataError(
      f'WebDataset shard {path} is truncated (it ends before its last member or has no '
      'end-of-archive blocks): copy or write it again.')
  try:
    with tarfile.open(path, 'r:') as tar:  # uncompressed: the offsets are the file's
      for member in tar:
        if member.offset_data + member.size > file_size:
          raise truncated
        if not member.isfile():
          continue
        folder, name = os.path.split(member.name)
        if '.' not in name:
          continue
        stem, ext = name.split('.', 1)
        key, ext = os.path.join(folder, stem), ext.lower()
        if key not in images and key not in texts:
          order.append(key)
        if ext in IMAGE_EXTENSIONS and key not in images:
          images[key] = (member.name, member.offset_data, member.size)
        elif ext == 'txt':
          texts[key] = tar.extractfile(member).read()
      # tarfile stops without a word at a cut between members: the end marker (zero blocks,
      # at `tar.offset` once read) must be there.
      if file_size < tar.offset + tarfile.BLOCKSIZE:
        raise truncated
  except tarfile.TarError as e:
    raise errors.DataError(
        f'WebDataset shard {path} is not a readable tar file ({_line(e) or type(e).__name__}): '
        'shards are uncompressed .tar files; write it again or remove it.') from None
  samples = []
  for key in order:
    if key not in texts:
      member = images[key][0]
      raise errors.DataError(
          f'WebDataset shard {path}: sample {key} has {member} but no {key}.txt caption: add '
          'the caption to the shard or remove the image from it.')
    if key not in images:
      raise errors.DataError(
          f'WebDataset shard {path}: sample {key} has {key}.txt but no image '
          f'(.{", .".join(IMAGE_EXTENSIONS)}): add the image to the shard or remove the caption.')
    try:
      caption = texts[key].decode('utf-8').strip()
    except UnicodeDecodeError:
      raise errors.DataError(f'WebDataset shard {path}: {key}.txt is not UTF-8 text; write '
                             'the caption as UTF-8.') from None
    samples.append((key,) + images[key] + (caption,))
  if not samples:
    raise errors.DataError(f'WebDataset shard {path} holds no samples (key.jpg or key.png with '
                           'key.txt): write it again or remove it.')
  return samples


class WebDatasetShards(_CaptionedImages):
  """WebDataset `.tar` shards read by random access (one `os.pread` per image).

  Every process indexes every shard and reads the examples of its slices of the global batches
  (`HostBatches`). `process_local=True` instead gives process p the shards p, p + P, ... alone
  (`process_local` datasets: each process shuffles its own examples; per-process epochs differ
  in length when the shards do).
  """

  def __init__(self, pattern_or_dir, split, *, image_size, process_local=False,
               process_index=None, process_count=None):
    self.image_shape = _check_image_size(image_size, 'a WebDataset')
    shards = shard_files(pattern_or_dir, split)
    if process_local:
      import jax  # pylint: disable=g-import-not-at-top
      index = jax.process_index() if process_index is None else int(process_index)
      count = jax.process_count() if process_count is None else int(process_count)
      if len(shards) < count:
        raise errors.DataError(
            f'{len(shards)} WebDataset shards for {count} processes: each process reads its own '
            'shards, so write at least one shard per process.')
      shards = shards[index::count]
    self.process_local = bool(process_local)
    shard_ids, offsets, sizes, members, captions = [], [], [], [], []
    for shard_id, path in enumerate(shards):
      for _, member, offset, size, caption in _index_shard(path):
        shard_ids.append(shard_id)
        offsets.append(offset)
        sizes.append(size)
        members.append(member)
        captions.append(caption)
    self.shards = shards
    self.members = members  # image member names, for error messages
    self._shard_ids = np.asarray(shard_ids, np.int32)
    self._offsets = np.asarray(offsets, np.int64)
    self._sizes = np.asarray(sizes, np.int64)
    self._set_captions(captions)
    self.name, self.split = 'webdataset', split
    self.num_examples = len(offsets)

  def _image(self, index):
    path = self.shards[self._shard_ids[index]]
    where = f'{self.members[index]} in {path}'
    size = int(self._sizes[index])
    try:
      fd = os.open(path, os.O_RDONLY)
      try:
        data = os.pread(fd, size, int(self._offsets[index]))
      finally:
        os.close(fd)
    except OSError as e:
      raise errors.DataError(f'cannot read {where}: {_line(e)}. Restore the shard.') from None
    if len(data) != size:
      raise errors.DataError(f'{path} is shorter than when it was indexed (reading {where}): '
                             'the shard changed; restart to index it again.')
    return self._crop(data, where, 'Write the shard again without it.')
