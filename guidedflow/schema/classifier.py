"""The feature classifier's config schema (task 'classifier'; guidedflow/tasks/classifier.py).

A small CNN trained by guidedflow itself: its penultimate activations are the features of FD
and precision/recall of generated samples, its logits their class accuracy. These defaults are
`configs/fmnist_classifier.py` (about 3 minutes on a 2-core CPU, ~92% test accuracy).
"""

import ml_collections

from guidedflow.schema import common


def get_config():
  """The classifier schema (it shares only the common sections with the generator)."""
  config = ml_collections.ConfigDict()
  config.task = 'classifier'

  # ---- Model (guidedflow/models/classifier.py).
  config.model = ml_collections.ConfigDict()
  config.model.arch = 'cnn'            # 'cnn' (conv, max-pool, flatten) | 'gap' (strided convs, global average)
  config.model.channels = (32, 64, 128)  # 3×3 conv per stage; 2×2 max-pool between stages
  config.model.feature_dim = 128       # penultimate layer = the feature vector
  config.model.group_norm = False      # GroupNorm after each conv: ~20% slower on CPU, no gain here
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  config.input = common.data()

  # 1500 steps of 128 = 3.2 epochs: ~3 minutes and ~92% test accuracy on a 2-core CPU
  # (measured: 92.3%, 3m13s, ~1100 train images/s).
  config.train = common.train(
      num_steps=1_500, batch_size=128,
      random_flip=True,          # random left-right flips (garments are symmetric)
      random_shift_pixels=0)     # random shifts by up to this many pixels (0: none)

  # Cosine decay; no EMA (the last weights are used).
  config.optim = common.optim(learning_rate=2e-3, warmup_steps=100, schedule='cosine',
                              final_lr_factor=0.01, weight_decay=1e-4, grad_clip_norm=0.0,
                              ema_decay=0.0, ema_warmup=False)

  # <workdir>/result.json holds the test accuracy.
  config.checkpoint = common.checkpoint(every_steps=500, max_to_keep=2)
  config.mesh = common.mesh()
  config.compile = common.compile_target()

  # ---- Test accuracy.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500         # images per compiled forward pass
  config.eval.num_examples = 0         # 0: the whole eval split; N: its first N
  config.eval.every_steps = 0          # test accuracy during training (TensorBoard); 0: at the end
  return config
