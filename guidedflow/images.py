"""The one image convention, sample grids and PNG files.

Models see float32 images in [−1, 1]. Datasets hold uint8 images (0..255), mapped by
x / 127.5 − 1, or float images (e.g. latents), which are in [−1, 1] already and pass through.
Files, feature networks and metrics take uint8. `to_model` and `to_uint8` are the only places
the mapping is written; every module goes through them.
"""

import io

import numpy as np
from PIL import Image

from guidedflow import atomic


def to_model(images):
  """Dataset images → float32 model inputs in [−1, 1] (numpy or jax arrays).

  uint8 maps by x / 127.5 − 1; float images are taken to be in [−1, 1] already.
  """
  if images.dtype == np.uint8:
    return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)
  return images.astype(np.float32)


def to_uint8(images):
  """Images → uint8 [0, 255]: float images in [−1, 1] (any shape ending in C) are mapped and
  clipped, uint8 images pass through (so dataset images of either kind become files/features)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  images = images.astype(np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, *, rows, cols, pad=1, pad_value=255):
  """Tiles `rows * cols` uint8 NHWC images (row-major) into one HWC image with `pad` pixels apart."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  if n != rows * cols:
    raise ValueError(f'make_grid: got {n} images for a {rows}x{cols} grid.')
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = images[i]
  return grid


def make_guidance_grid(blocks, *, num_classes, samples_per_class, gap=4):
  """One row per class, one block of columns per guidance scale, blocks `gap` pixels apart.

  Args:
    blocks: list (one per guidance scale) of uint8 arrays (num_classes * samples_per_class,
      H, W, C), ordered class-major (all samples of class 0 first).
    num_classes: rows of the grid.
    samples_per_class: columns within each block.
    gap: extra white columns between blocks.

  Returns:
    uint8 HWC grid.
  """
  tiles = [make_grid(b, rows=num_classes, cols=samples_per_class) for b in blocks]
  height, channels = tiles[0].shape[0], tiles[0].shape[2]
  spacer = np.full((height, gap, channels), 255, np.uint8)
  parts = []
  for i, tile in enumerate(tiles):
    if i:
      parts.append(spacer)
    parts.append(tile)
  return np.concatenate(parts, axis=1)


def label_rows(rows, texts, *, upscale=2, gap=4):
  """One uint8 HWC image of `rows` (uint8 HWC images of equal width and channels), each
  upscaled by pixel repetition, with its text from `texts` (up to 64 characters) to its left."""
  from PIL import ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  rows = [np.asarray(r, np.uint8).repeat(upscale, 0).repeat(upscale, 1) for r in rows]
  text_width = 12 + 6 * max([min(len(t), 64) for t in texts] + [1])
  height = sum(r.shape[0] + gap for r in rows)
  width, channels = rows[0].shape[1] + text_width, rows[0].shape[2]
  canvas = Image.new('L' if channels == 1 else 'RGB', (width, height), 255)
  draw, font, top = ImageDraw.Draw(canvas), ImageFont.load_default(), 0
  for row, text in zip(rows, texts):
    canvas.paste(Image.fromarray(row[..., 0] if channels == 1 else row), (text_width, top))
    draw.text((4, top + row.shape[0] // 2 - 6), text[:64], fill=0, font=font)
    top += row.shape[0] + gap
  out = np.asarray(canvas)
  return out[..., None] if channels == 1 else out


def save_png(path, image, *, upscale=1):
  """Writes a uint8 HWC image (C = 1 or 3) to `path`, optionally upscaled by pixel repetition."""
  image = np.asarray(image, np.uint8)
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  atomic.write_bytes(path, buffer.getvalue())  # local, or gs:// (any etils.epath filesystem)
