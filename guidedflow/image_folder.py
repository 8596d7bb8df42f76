"""ImageNet-style images: ADM's center crop, and an ImageFolder of JPEGs as a `Dataset`.

`center_crop` is guided-diffusion's `center_crop_arr` (the preprocessing of ADM, DiT and SiT
for ImageNet-256): halve with a box filter while the short side is at least twice the size,
resize the short side to the size with bicubic, crop the center. ImageFolder is torchvision's
layout: `<data_dir>/<split>/<class>/<image>` with classes numbered in sorted order (the
ImageNet `train` / `val` folders of the usual preparation scripts).
"""

import os

import numpy as np

from guidedflow import datasets
from guidedflow import errors

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def center_crop(image, size):
  """uint8 (size, size, 3) of a PIL image, as ADM crops ImageNet."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image.convert('RGB')
  while min(*image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(*image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  array = np.asarray(image)
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


def center_crop_array(array, size):
  """`center_crop` of a decoded uint8 (H, W, C) array (e.g. a TFDS image)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return center_crop(Image.fromarray(array), size)


class ImageFolderDataset(datasets.Dataset):
  """JPEGs (or PNGs) in class folders, decoded and center-cropped to `image_size` on access.

  `decodes_files` tells the latent cache to decode in grain worker processes.
  """

  decodes_files = True

  def __init__(self, data_dir, split, *, image_size, num_classes):
    root = os.path.join(os.fspath(data_dir), split)
    if not os.path.isdir(root):
      raise errors.DataError(
          f'ImageFolder split directory {root} does not exist: set --config.input.data_dir to '
          'the folder holding the split folders (e.g. train/ and val/, one subfolder of '
          'images per class) and --config.input.train_split / eval_split to their names.')
    if not image_size or image_size < 1:
      raise errors.DataError('an ImageFolder dataset needs '
                                     '--config.input.image_size (e.g. 256): its images differ '
                                     'in size and are center-cropped to it.')
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if len(classes) > num_classes:
      raise errors.DataError(
          f'{root} has {len(classes)} class folders but --config.input.num_classes='
          f'{num_classes}; set --config.input.num_classes={len(classes)}.')
    files, labels = [], []
    for label, name in enumerate(classes):
      folder = os.path.join(root, name)
      for file in sorted(os.listdir(folder)):
        if file.lower().endswith(EXTENSIONS):
          files.append(os.path.join(folder, file))
          labels.append(label)
    if not files:
      raise errors.DataError(f'{root} holds no images ({", ".join(EXTENSIONS)}) in '
                                     'class folders.')
    self.files, self.labels = files, np.asarray(labels, np.int32)
    self.classes = classes
    self.name, self.split = 'imagefolder', split
    self.num_examples = len(files)
    self.image_shape = (int(image_size), int(image_size), 3)
    self.num_classes = int(num_classes)

  def __getstate__(self):  # pickled into grain workers: paths only
    return dict(self.__dict__)

  def _load(self, index):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    path = self.files[index]
    try:
      with Image.open(path) as image:
        return center_crop(image, self.image_shape[0])
    except (OSError, ValueError) as e:
      raise errors.DataError(f'cannot decode {path}: {e}. Remove or replace the '
                                     'file.') from None

  def get_batch(self, indices):
    indices = np.asarray(indices, np.int64)
    return {'image': np.stack([self._load(int(i)) for i in indices]),
            'label': self.labels[indices]}
