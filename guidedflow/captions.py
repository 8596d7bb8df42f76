"""Captions for Fashion-MNIST that carry more than the label: the class (with synonyms) and
attributes measured from each image, in several templates.

**Attributes** (`measure`, on uint8 28×28 images; ink = pixels above 0.1 of full scale):
  brightness  mean intensity of the ink pixels (0..1)            dark / — / light
  size        ink area, the fraction of the 784 pixels that are ink  small / — / large
  width       horizontal spread: the standard deviation of the column of the ink mass (pixels)
                                                                   narrow / — / wide
  texture     high-frequency energy: the mean squared difference of horizontally and
              vertically adjacent pixels that are both ink (edges of the silhouette excluded)
                                                                   plain / — / patterned
Each is cut in three levels by the terciles of the training images **of the same class**
(`TERCILES`, computed by `fit_terciles` from the Debian Fashion-MNIST train split and checked
by the tests): with terciles over all classes the attributes would restate the class (every
sneaker is "small", every pullover "large"); within the class, "a dark sneaker" is the darkest
third of sneakers. The middle level is left unsaid.

**Captions** (`caption_table`, `draw`): a template, a synonym of the class name and up to two of
the image's non-middle attributes: "a dark wide pullover", "a photo of a small light sandal",
"pullover, patterned", "a picture of a sneaker that is dark and plain". The table holds every
class × synonym × template × attribute phrase once (3,960 captions); an example's caption is an
id into it, drawn per example and per epoch from the data seed by a counter-based hash
(`draw(seed, epoch, index, ...)`), so a resumed run draws the same captions.

**Held-out compositions** (`HELD_OUT`, `held_out`): (class, attribute level) pairs whose examples
are removed from training, to measure compositional generalisation: the attribute and the class
are each seen, never together.
"""

import itertools

import numpy as np

from guidedflow import datasets

ATTRIBUTES = ('brightness', 'size', 'width', 'texture')
LEVEL_WORDS = {'brightness': ('dark', 'light'), 'size': ('small', 'large'),
               'width': ('narrow', 'wide'), 'texture': ('plain', 'patterned')}
INK = 0.1
# Three names per class, the first the dataset's own.
SYNONYMS = (('T-shirt', 'tee', 'top'), ('trousers', 'pants', 'slacks'),
            ('pullover', 'sweater', 'jumper'), ('dress', 'frock', 'gown'),
            ('coat', 'jacket', 'overcoat'), ('sandal', 'strappy sandal', 'open shoe'),
            ('shirt', 'button-up shirt', 'blouse'), ('sneaker', 'trainer', 'running shoe'),
            ('bag', 'handbag', 'purse'), ('ankle boot', 'boot', 'bootie'))
_PLURALS = ('trousers', 'pants', 'slacks')
# `{a}`: the attribute words before the noun; `{c}`: the clause form. With no attribute the
# template reads naturally too ("a photo of a sneaker", "sneaker").
TEMPLATES = ('{art} {a}{noun}', 'a photo of {art} {a}{noun}', '{noun}{c_list}',
             'a picture of {art_noun} {noun}{c_clause}')
# Templates never used in training: paraphrased prompts of the evaluation (text_evaluate.py).
PARAPHRASES = ('an image showing {art} {a}{noun}', 'this is {art_noun} {noun}{c_clause}')
# (class, attribute, level 0 = low or 2 = high): never in training (`held_out`).
HELD_OUT = ((7, 'brightness', 0), (2, 'texture', 2), (8, 'width', 0))

# Per class (rows: T-shirt .. ankle boot), per attribute: the (1/3, 2/3) quantiles of the train
# split's images of that class (`fit_terciles`; tests/captions_test.py recomputes them).
TERCILES = np.array([
    ((0.522602, 0.725882), (0.516582, 0.566327), (4.57543, 4.97596), (0.0190475, 0.0271222)),  # T-shirt
    ((0.631183, 0.751481), (0.304847, 0.332908), (2.84001, 3.14714), (0.0349792, 0.0452355)),  # trousers
    ((0.526746, 0.742009), (0.576531, 0.642857), (5.4663, 5.87871), (0.0223823, 0.030522)),  # pullover
    ((0.597829, 0.760964), (0.353316, 0.42602), (3.02551, 3.63237), (0.0272695, 0.0370531)),  # dress
    ((0.655543, 0.770356), (0.543367, 0.602041), (5.02376, 5.5825), (0.0235345, 0.0301319)),  # coat
    ((0.471401, 0.569176), (0.206633, 0.284439), (6.6428, 7.05394), (0.0508936, 0.0679654)),  # sandal
    ((0.462265, 0.688581), (0.549745, 0.622449), (5.11124, 5.62836), (0.0206042, 0.0287498)),  # shirt
    ((0.534429, 0.633537), (0.26148, 0.304847), (6.53457, 6.85003), (0.0374534, 0.048245)),  # sneaker
    ((0.626125, 0.72944), (0.487245, 0.581633), (6.44002, 7.17657), (0.0234622, 0.0314785)),  # bag
    ((0.657773, 0.738372), (0.399235, 0.465561), (6.19853, 6.47455), (0.0302192, 0.0374737)),  # ankle boot
])

# Phrases: 0 = none, 1 + 2a + l = attribute a at level l (0 low, 1 high), then the pairs
# (a < b, la, lb) in itertools order.
_PAIRS = [(a, b) for a, b in itertools.combinations(range(len(ATTRIBUTES)), 2)]
NUM_PHRASES = 1 + 2 * len(ATTRIBUTES) + 4 * len(_PAIRS)
_WORD_ORDER = (1, 0, 2, 3)  # English adjective order: size, then brightness, width, texture


def measure(images):
  """{attribute: float32 (N,)} of uint8 images (N, 28, 28) or (N, 28, 28, 1)."""
  x = np.asarray(images)
  if x.ndim == 4:
    x = x[..., 0]
  x = x.astype(np.float32) / 255.0
  ink = x > INK
  count = np.maximum(ink.sum((1, 2)), 1)
  mass = x * ink
  total = np.maximum(mass.sum((1, 2)), 1e-6)
  columns = np.arange(x.shape[2], dtype=np.float32)
  column_mass = mass.sum(1)
  mean_col = (column_mass * columns).sum(1) / total
  spread = np.sqrt(np.maximum((column_mass * columns ** 2).sum(1) / total - mean_col ** 2, 0))
  both_h = ink[:, :, 1:] & ink[:, :, :-1]
  both_v = ink[:, 1:, :] & ink[:, :-1, :]
  energy = (((x[:, :, 1:] - x[:, :, :-1]) ** 2 * both_h).sum((1, 2))
            + ((x[:, 1:, :] - x[:, :-1, :]) ** 2 * both_v).sum((1, 2)))
  pairs = np.maximum(both_h.sum((1, 2)) + both_v.sum((1, 2)), 1)
  return {'brightness': mass.sum((1, 2)) / count, 'size': ink.mean((1, 2)),
          'width': spread.astype(np.float32), 'texture': (energy / pairs).astype(np.float32)}


def fit_terciles(images, labels, num_classes=10):
  """float64 (num_classes, len(ATTRIBUTES), 2): each class's (1/3, 2/3) quantiles."""
  values = measure(images)
  labels = np.asarray(labels)
  out = np.zeros((num_classes, len(ATTRIBUTES), 2))
  for c in range(num_classes):
    for a, name in enumerate(ATTRIBUTES):
      out[c, a] = np.quantile(values[name][labels == c].astype(np.float64), [1 / 3, 2 / 3])
  return out


def levels(images, labels, terciles=None):
  """int8 (N, len(ATTRIBUTES)) in {0 low, 1 middle, 2 high}, by the class's terciles."""
  terciles = TERCILES if terciles is None else terciles
  values = measure(images)
  labels = np.asarray(labels)
  out = np.ones((len(labels), len(ATTRIBUTES)), np.int8)
  for a, name in enumerate(ATTRIBUTES):
    low, high = terciles[labels, a, 0], terciles[labels, a, 1]
    out[values[name] < low, a] = 0
    out[values[name] > high, a] = 2
  return out


def held_out(labels, attribute_levels):
  """bool (N,): the examples of a held-out (class, attribute level) composition."""
  labels = np.asarray(labels)
  out = np.zeros(len(labels), bool)
  for c, name, level in HELD_OUT:
    out |= (labels == c) & (attribute_levels[:, ATTRIBUTES.index(name)] == level)
  return out


# ---------------------------------------------------------------------------- the caption table


def _phrase_parts(phrase):
  """[(attribute index, level 0/1)] of phrase id `phrase`."""
  if phrase == 0:
    return []
  if phrase <= 2 * len(ATTRIBUTES):
    return [divmod(phrase - 1, 2)]
  pair, levels_ab = divmod(phrase - 1 - 2 * len(ATTRIBUTES), 4)
  a, b = _PAIRS[pair]
  return [(a, levels_ab // 2), (b, levels_ab % 2)]


def _render(label, synonym, template, phrase):
  return render(label, _phrase_parts(phrase), TEMPLATES[template], synonym)


def render(label, parts, template, synonym=0):
  """The caption of class `label` with attribute `parts` [(attribute index, 0 low / 1 high)]
  in `template` (a `TEMPLATES` or `PARAPHRASES` string)."""
  noun = SYNONYMS[label][synonym]
  parts = sorted(parts, key=lambda part: _WORD_ORDER.index(part[0]))
  words = [LEVEL_WORDS[ATTRIBUTES[a]][level] for a, level in parts]
  before = ''.join(w + ' ' for w in words)
  if noun in _PLURALS:  # "a photo of a pair of dark pants"
    article = lambda text: 'a pair of'  # noqa: E731
  else:
    article = lambda text: 'an' if text[0].lower() in 'aeiou' else 'a'  # noqa: E731
  text = template.format(
      art=article(before + noun), art_noun=article(noun), a=before, noun=noun,
      c_list=''.join(', ' + w for w in words),
      c_clause=(' that is ' + ' and '.join(words)) if words else '')
  return text


def caption_id(label, synonym, template, phrase):
  return ((label * 3 + synonym) * len(TEMPLATES) + template) * NUM_PHRASES + phrase


def parse(caption):
  """(label, synonym, template, parts) of caption id `caption` (`caption_id`'s inverse)."""
  rest, phrase = divmod(int(caption), NUM_PHRASES)
  rest, template = divmod(rest, len(TEMPLATES))
  label, synonym = divmod(rest, 3)
  return label, synonym, template, _phrase_parts(phrase)


def caption_table(num_classes=10):
  """Every caption once, in id order (`caption_id`)."""
  return [_render(c, s, t, p) for c in range(num_classes) for s in range(3)
          for t in range(len(TEMPLATES)) for p in range(NUM_PHRASES)]


def _phrase_of(parts):
  if not parts:
    return 0
  if len(parts) == 1:
    (a, level), = parts
    return 1 + 2 * a + level
  (a, la), (b, lb) = sorted(parts)
  return 1 + 2 * len(ATTRIBUTES) + 4 * _PAIRS.index((a, b)) + 2 * la + lb


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _hash(*keys):
  """SplitMix64 of the keys (uint64 arrays broadcast together): the same numbers on every
  machine and numpy version (no generator state, any order of examples)."""
  h = np.zeros(np.broadcast(*keys).shape, np.uint64)
  with np.errstate(over='ignore'):
    for key in keys:
      h = h ^ np.asarray(key, np.uint64)
      h = (h + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
      h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      h = h ^ (h >> np.uint64(31))
  return h


def draw(seed, epochs, indices, labels, attribute_levels):
  """int32 caption ids (N,) of examples `indices` (with their labels and levels) in `epochs`:
  a synonym, a template and 0–2 of the non-middle attributes (0 with chance 1/5, else 1 or 2
  when there are as many), each a function of (seed, epoch, index) alone."""
  h = _hash(np.uint64(seed), np.asarray(epochs, np.uint64), np.asarray(indices, np.uint64))
  out = np.empty(len(h), np.int32)
  for i, (hash_i, label, row) in enumerate(zip(h, np.asarray(labels), attribute_levels)):
    hash_i = int(hash_i)
    synonym, hash_i = hash_i % 3, hash_i // 3
    template, hash_i = hash_i % len(TEMPLATES), hash_i // len(TEMPLATES)
    how_many, hash_i = hash_i % 5, hash_i // 5
    extremes = [a for a in range(len(ATTRIBUTES)) if row[a] != 1]
    k = min(0 if how_many == 0 else 1 if how_many < 3 else 2, len(extremes))
    order = sorted(extremes, key=lambda a, h=hash_i: (h >> (8 * a)) & 0xFF)
    parts = [(a, int(row[a] == 2)) for a in order[:k]]
    out[i] = caption_id(int(label), synonym, template, _phrase_of(parts))
  return out


class CaptionedDataset(datasets.Dataset):
  """A labelled Fashion-MNIST `Dataset` with a caption id per example ('caption', int32 into
  `caption_table()`), drawn per example and epoch (`draws_per_epoch`: `batches.HostBatches`
  passes each example's epoch and the stream's seed); without them (evaluation), epoch 0 and
  seed 0. With `hold_out`, the examples of the `HELD_OUT` compositions are left out (training);
  the captions of the rest are keyed by their index in `base`, so they do not move.
  """

  draws_per_epoch = True

  def __init__(self, base, *, hold_out, chunk=8192):
    if base.num_classes != len(SYNONYMS):
      raise ValueError(f'captions are written for the {len(SYNONYMS)} Fashion-MNIST classes; '
                       f'{base!r} has {base.num_classes}.')
    self.base = base
    self.name, self.split = base.name, base.split
    self.image_shape, self.num_classes = base.image_shape, base.num_classes
    self.in_memory = getattr(base, 'in_memory', False)
    self._keep = np.arange(base.num_examples)
    if hold_out:
      out = np.zeros(base.num_examples, bool)
      for start in range(0, base.num_examples, chunk):
        batch = base.get_batch(np.arange(start, min(start + chunk, base.num_examples)))
        out[start:start + len(batch['label'])] = held_out(
            batch['label'], levels(batch['image'], batch['label']))
      self._keep = np.nonzero(~out)[0]
    self.num_examples = len(self._keep)
    self.num_held_out = base.num_examples - self.num_examples

  def get_batch(self, indices, epochs=None, seed=0):
    rows = self._keep[np.asarray(indices)]
    batch = dict(self.base.get_batch(rows))
    epochs = np.zeros(len(rows), np.int64) if epochs is None else epochs
    batch['caption'] = draw(seed, epochs, rows, batch['label'],
                            levels(batch['image'], batch['label']))
    return batch
