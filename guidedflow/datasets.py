"""The dataset interface every source implements (Fashion-MNIST, TFDS, image folders, arrays,
latent caches): random access by example index."""

from __future__ import annotations

import abc

import numpy as np


class Dataset(abc.ABC):
  """Random-access dataset: `get_batch(indices)` gathers examples in the given order."""

  name: str
  split: str
  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int

  @abc.abstractmethod
  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns {'image': (n, H, W, C) in the stored dtype, 'label': int32 (n,)}."""

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.name!r}, split={self.split!r}, '
            f'num_examples={self.num_examples}, image_shape={self.image_shape}, '
            f'num_classes={self.num_classes})')
