"""The generator conditioned on captions (`config.text.encoder` 'trained' | 'clip' | 't5'): the
generator task with text in place of class labels.

Data: Fashion-MNIST with a caption per example and epoch (`captions.CaptionedDataset`, the
held-out compositions left out of training), or an image–caption folder / WebDataset shards,
each batch with its text condition (`text_data`): a trained encoder's tokens, or a frozen
encoder's features from the text cache (written on first use, like the latent cache). The loss
drops captions at rate `loss.label_dropout` (the model puts the null condition there:
`models/text_conditioning.py`). Grids and `--mode=sample` take prompts (`sampling.prompts`,
`sampling.prompts_file`), CFG with the null condition or `sampling.negative_prompt` in its
place; the grid is labelled with its prompts.
"""

import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from guidedflow import captions
from guidedflow import errors
from guidedflow import evaluate as evaluate_lib
from guidedflow import fashion_mnist
from guidedflow import images as images_lib
from guidedflow import latents
from guidedflow import sampler as sampler_lib
from guidedflow import text_cache
from guidedflow import text_data
from guidedflow import text_encoders
from guidedflow import text_evaluate
from guidedflow import text_prompts
from guidedflow import text_vocabulary
from guidedflow.models import factory
from guidedflow.tasks import generator

# The training-time grid's prompts when sampling.prompts is unset: one per class, then the same
# class with attributes (Fashion-MNIST).
DEFAULT_GRID_PROMPTS = ('a T-shirt', 'a dark T-shirt', 'a pair of trousers', 'a pullover',
                        'a patterned pullover', 'a dress', 'a coat', 'a sandal', 'a shirt',
                        'a sneaker', 'a dark sneaker', 'a bag', 'a narrow bag', 'an ankle boot')


class TextGeneratorTask(generator.GeneratorTask):
  """The generator task with captions as y (module docstring)."""

  description = 'a text-conditioned generative model'

  def __init__(self, config, workdir=None):
    super().__init__(config, workdir)
    self._prompts = None
    self._tables = {}
    self._encoder = None
    self._tokenizer = None

  # -- data

  def prepare(self):
    if latents.is_latent(self.config) and self.config.input.dataset == 'fashion_mnist':
      raise errors.ConfigError(
          "a text model on latents reads an image–caption dataset (input.dataset="
          "'caption_folder' or 'webdataset'); Fashion-MNIST's captions are drawn from its "
          'pixels each epoch: train it on pixels (input.space=pixels).')

  def _latent_dataset(self, pixels, which, *, flip):
    """The latents of an image–caption dataset (`pixels`: its `TextDataset`), each row with its
    caption id, and the same text condition as in pixel space."""
    if self.latent_space() is None:
      return pixels
    latent = super()._latent_dataset(pixels.base, which, flip=flip)
    return text_data.TextDataset(text_data.LatentCaptions(latent), pixels.table)

  def tokenizer(self, training_captions=None):
    """The trained encoder's tokenizer (`text_vocabulary`: bytes, or the run's words, else
    those of `training_captions()`, default `_training_captions`)."""
    if self._tokenizer is None:
      self._tokenizer = text_vocabulary.tokenizer(
          self.config, self.workdir, training_captions or self._training_captions)
    return self._tokenizer

  def _training_captions(self):
    """The texts of the training caption set (a 'words' tokenizer's vocabulary)."""
    if self.config.input.dataset == 'fashion_mnist':
      return captions.caption_table()
    return generator.GeneratorTask.pixel_train_dataset(self).caption_table()

  def model_constructor(self, image_shape):
    """The generator behind the trained encoder sized by `tokenizer()`, or a frozen one's
    features."""
    tokenizer = self.tokenizer() if self.config.text.encoder == 'trained' else None
    return factory.constructor(self.config, image_shape, tokenizer=tokenizer)

  def _table(self, which, texts):
    """The caption set's lookup: a trained encoder's tokens, or the text cache. The training
    caption set ('captions' or 'train') checks, or keeps, the run's word vocabulary."""
    if which not in self._tables:
      text = self.config.text
      if text.encoder == 'trained':
        if which in ('captions', 'train'):
          text_vocabulary.keep(self.workdir, self.tokenizer(lambda: texts), texts)
        self._tables[which] = text_data.TokenTable(self.tokenizer(), texts)
      else:
        root = text.cache_dir or os.path.join(self.workdir or '.', 'text_cache')
        directory = root if which == 'captions' else os.path.join(root, which)
        self._tables[which] = text_cache.open_or_write(
            self._frozen_encoder(), texts, directory, dtype=text.cache_dtype,
            batch_size=text.batch_size)
    return self._tables[which]

  def _frozen_encoder(self):
    """The frozen encoder, loaded once: every split's cache and the prompts use it."""
    if self._encoder is None and self.config.text.encoder in text_encoders.FROZEN:
      self._encoder = text_encoders.load(self.config)
    return self._encoder

  def _captioned(self, pixels, which):
    if self.config.input.dataset == 'fashion_mnist':
      data = captions.CaptionedDataset(pixels, hold_out=which == 'train')
      return text_data.TextDataset(data, self._table('captions', captions.caption_table()))
    if not hasattr(pixels, 'caption_table'):
      raise errors.ConfigError(
          f"config.input.dataset='{self.config.input.dataset}' has no captions: a text model "
          "trains on 'fashion_mnist', 'caption_folder' or 'webdataset'.")
    return text_data.TextDataset(pixels, self._table(which, pixels.caption_table()))

  def _extra_caches(self, workdir):
    """--mode=encode: the text cache of the caption set (Fashion-MNIST's caption table, or each
    split's captions of an image–caption dataset), written when absent."""
    if self.config.text.encoder not in text_encoders.FROZEN:
      raise errors.ConfigError(f"config.text.encoder='{self.config.text.encoder}' is trained "
                               'with the generator: it has no frozen outputs to cache (clip or '
                               't5 have).')
    self.workdir = self.workdir or workdir
    for split in (self.pixel_train_dataset, self.pixel_eval_dataset):
      split()  # opening a split writes its caption set's cache when absent
    out = {which: dict(table.meta, directory=os.fspath(table.directory))
           for which, table in self._tables.items()}
    return {'text': out.get('captions', out)}

  def pixel_train_dataset(self):
    return self._captioned(super().pixel_train_dataset(), 'train')

  def pixel_eval_dataset(self):
    return self._captioned(super().pixel_eval_dataset(), 'eval')

  def abstract_batch(self, batch_size, image_shape):
    """A training batch's shapes (--mode=compile): the images (or latent moments) and the
    caption's condition — a trained encoder's tokens, or a frozen one's cached features (its
    width from `text_dims`: the weights folder's config.json, or a known config's name)."""
    batch = {k: v for k, v in super().abstract_batch(batch_size, image_shape).items()
             if k != 'label'}
    batch['caption'] = ((batch_size,), jnp.int32)
    batch.update({text_data.PREFIX + k: v for k, v in self.sample_condition(batch_size).items()})
    return batch

  def sample_condition(self, batch_size):
    width, length = factory.text_dims(self.config)
    condition = {'null': ((batch_size,), jnp.int32),
                 'mask': ((batch_size, length), jnp.int32)}
    if self.config.text.encoder == 'trained':
      condition['tokens'] = ((batch_size, length), jnp.int32)
    else:
      condition['hidden'] = ((batch_size, length, width), jnp.float32)
      condition['pooled'] = ((batch_size, width), jnp.float32)
    return condition

  def loss(self, model, batch, key):
    condition = text_data.condition(batch)
    batch = {k: v for k, v in batch.items()
             if not k.startswith(text_data.PREFIX) and k not in ('caption', 'label')}
    return super().loss(model, dict(batch, text=condition), key)

  # -- sampling with prompts

  def prompts(self):
    if self._prompts is None:
      tokenizer = self.tokenizer() if self.config.text.encoder == 'trained' else None
      self._prompts = text_prompts.Prompts(self.config, self._frozen_encoder(), tokenizer)
    return self._prompts

  def _grid_prompts(self):
    if self.config.sampling.prompts is None and not self.config.sampling.prompts_file:
      return list(DEFAULT_GRID_PROMPTS)
    return text_prompts.read_prompts(self.config)

  def sample_prompts(self, sampler, prompts, guidance_scale, key, *, per_prompt=1):
    """uint8 samples (len(prompts) · per_prompt, H, W, C) of `prompts`, CFG at w with the null
    condition, or `sampling.negative_prompt` in its place, and the NFE per sample."""
    repeated = [p for p in prompts for _ in range(per_prompt)]
    num, batch = len(repeated), self.config.sampling.batch_size
    if num > batch:  # every batch full: one compiled program (the padding is dropped)
      repeated += repeated[-1:] * (-num % batch)
    condition = self.prompts().condition(repeated)
    negative = self.config.sampling.negative_prompt
    null = (self.prompts().negative(negative, len(repeated)) if negative
            else text_prompts.Prompts.null(condition))
    out, nfe = [], 0
    for i, start in enumerate(range(0, len(repeated), batch)):
      take = lambda tree, s=start: {k: v[s:s + batch] for k, v in tree.items()}  # noqa: E731
      samples, nfe = sampler.sample(jax.random.fold_in(key, i), take(condition), guidance_scale,
                                    null_labels=take(null))
      out.append(images_lib.to_uint8(np.asarray(samples)))
    return np.concatenate(out)[:num], nfe

  def _prompt_grid(self, sampler, prompts, scales, key, per_prompt):
    """Rows: prompts; column blocks: w; labelled with the prompts."""
    blocks = [self.sample_prompts(sampler, prompts, w, key, per_prompt=per_prompt)[0]
              for w in scales]
    rows = []
    for p in range(len(prompts)):
      parts = []
      for b in blocks:
        tile = np.concatenate(list(b[p * per_prompt:(p + 1) * per_prompt]), 1)
        parts += [tile, np.full((tile.shape[0], 3, tile.shape[2]), 255, np.uint8)]
      rows.append(np.concatenate(parts[:-1], 1))  # w blocks 3 white columns apart
    return images_lib.label_rows(rows, prompts)

  def _write_grid(self, run, state, step):
    scales = self.config.sampling.grid_guidance_scales
    grid = self._prompt_grid(self._sampler_of(run, state), self._grid_prompts(), scales,
                             jax.random.PRNGKey(self.config.sampling.seed),
                             self.config.sampling.grid_samples_per_class)
    if jax.process_index() == 0:
      for name in (f'grid_step{step:07d}.png', 'grid_latest.png'):
        images_lib.save_png(os.path.join(run.workdir, 'samples', name), grid)
    self._grid_step = step
    logging.info('Wrote sample grid at step %d (rows: prompts; column blocks: w = %s).', step,
                 ', '.join(str(w) for w in scales))

  def _sample_metrics(self, run, state):
    del run, state  # a text model's sample metrics are --mode=evaluate's (text_evaluate.py)
    return {}

  def sample(self, workdir):
    """--mode=sample: samples.npz (uint8 `images`, `prompts`) and grid.png of the prompts."""
    self.workdir = self.workdir or workdir
    sampler = sampler_lib.Sampler.from_workdir(self.config, workdir, self.latent_space(),
                                               self.model_constructor)
    sconfig = self.config.sampling
    prompts = text_prompts.read_prompts(self.config)
    per_prompt = max(1, sconfig.num_samples // len(prompts))
    generator.check_output_size(per_prompt * len(prompts), generator.output_shape(sampler),
                                sconfig.max_output_gib)
    key = jax.random.PRNGKey(sconfig.seed)
    t0 = time.time()
    images, nfe = self.sample_prompts(sampler, prompts, sconfig.guidance_scale, key,
                                      per_prompt=per_prompt)
    seconds = time.time() - t0
    out_dir = os.path.join(workdir, 'samples')
    if jax.process_index() == 0:
      repeated = np.array([p for p in prompts for _ in range(per_prompt)])
      generator.write_npz(out_dir, {'images': images, 'prompts': repeated})
      grid = self._prompt_grid(sampler, prompts, (sconfig.guidance_scale,), key,
                               min(per_prompt, 8))
      images_lib.save_png(os.path.join(out_dir, 'grid.png'), grid)
    result = {'num_samples': len(images), 'prompts': prompts, 'nfe': nfe,
              'negative_prompt': sconfig.negative_prompt, 'seconds': round(seconds, 2),
              'guidance_scale': sconfig.guidance_scale, 'step': sampler.step,
              'output': os.path.join(out_dir, 'samples.npz'),
              'grid': os.path.join(out_dir, 'grid.png')}
    logging.info('Samples: %s', json.dumps(result))
    return result

  def _sample_quality(self, workdir, sampler):
    """--mode=evaluate's prompt adherence along w (guidedflow/text_evaluate.py)."""
    if self.config.input.dataset != 'fashion_mnist':
      raise errors.ConfigError(
          '--mode=evaluate of a text model measures the attributes of Fashion-MNIST captions; '
          f"config.input.dataset='{self.config.input.dataset}' has none: use --mode=sample, or "
          'config.eval.feature_network=none for the held-out loss alone.')
    network, extra = self._feature_networks()
    pixels = generator.GeneratorTask.pixel_eval_dataset(self)
    evaluator = evaluate_lib.Evaluator(self.config, workdir, sampler, network, pixels,
                                       generator.GeneratorTask.pixel_train_dataset(self), extra)
    key = jax.random.PRNGKey(self.config.sampling.seed)
    generate = lambda prompts, w: self.sample_prompts(sampler, prompts, w, key)[0]  # noqa: E731
    grid = lambda prompts, scales: self._prompt_grid(sampler, prompts, scales, key, 4)  # noqa: E731
    return text_evaluate.run(self.config, workdir, evaluator, generate, grid, pixels,
                             class_names=fashion_mnist.CLASS_NAMES,
                             is_writer=jax.process_index() == 0)
