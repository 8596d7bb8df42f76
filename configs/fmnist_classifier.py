"""The Fashion-MNIST feature network: a small CNN classifier trained by guidedflow itself.

Its penultimate activations are the features for FD and precision/recall of generated samples,
and its logits give their class accuracy (guidedflow/tasks/classifier.py). A few minutes on a
2-core CPU (about 3 minutes, ~92% test accuracy).

Usage:
  python -m guidedflow.main --config configs/fmnist_classifier.py --workdir runs/fmnist_classifier
  python -m guidedflow.main --config configs/fmnist_classifier.py --workdir runs/fmnist_classifier \
      --mode=evaluate

It trains through the one training loop like every task: an interrupted run (Ctrl-C, SIGTERM)
resumes from its last checkpoint exactly; running the command again on a finished workdir trains
no further and measures the test accuracy again.
"""

import ml_collections
from ml_collections import config_dict

from configs import default


def get_config():
  """Returns the classifier config (it shares only the mesh with generator training)."""
  config = ml_collections.ConfigDict()
  config.task = 'classifier'  # guidedflow/tasks/classifier.py

  # ---- Model (guidedflow/models/classifier.py).
  config.model = ml_collections.ConfigDict()
  config.model.arch = 'cnn'            # 'cnn' (conv, max-pool, flatten) | 'gap' (fmnist_gap_classifier.py)
  config.model.channels = (32, 64, 128)  # 3×3 conv per stage; 2×2 max-pool between stages
  config.model.feature_dim = 128       # penultimate layer = the feature vector
  config.model.group_norm = False      # GroupNorm after each conv: ~20% slower on CPU, no gain here
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16'

  # ---- Data.
  config.input = ml_collections.ConfigDict()
  config.input.dataset = 'fashion_mnist'  # 'fashion_mnist' | 'tfds:<name>' (array_record)
  config.input.data_dir = config_dict.placeholder(str)  # None: /usr/share/datasets/fashion-mnist
  config.input.image_key = 'image'     # TFDS feature names
  config.input.label_key = 'label'
  config.input.num_classes = 10
  config.input.train_split = 'train'
  config.input.eval_split = 'test'
  config.input.num_train_examples = 0  # 0: the whole split; N: its first N (quick tests)

  # ---- Training loop.
  config.train = ml_collections.ConfigDict()
  config.train.allow_config_change = False  # see configs/default.py
  # 1500 steps of 128 = 3.2 epochs: ~3 minutes and ~92% test accuracy on a 2-core CPU
  # (measured: 92.3%, 3m13s, ~1100 train images/s).
  config.train.num_steps = 1_500
  config.train.batch_size = 128
  config.train.seed = 0
  config.train.log_every_steps = 100
  config.train.random_flip = True      # random left-right flips (garments are symmetric)
  config.train.random_shift_pixels = 0  # random shifts by up to this many pixels (0: none)

  # ---- Optimizer: AdamW, linear warm-up, cosine decay; no EMA (the last weights are used).
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.schedule = 'cosine'
  config.optim.final_lr_factor = 0.01  # cosine decay ends at learning_rate × this
  config.optim.weight_decay = 1e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.grad_clip_norm = 0.0    # 0 disables clipping
  config.optim.ema_decay = 0.0         # 0: no EMA
  config.optim.ema_warmup = False

  # ---- Checkpoints in <workdir>/checkpoints; <workdir>/result.json holds the test accuracy.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500
  config.checkpoint.max_to_keep = 2

  # ---- Devices: as for the generator (configs/default.py); one CPU needs nothing here.
  config.mesh = default.get_config().mesh

  # ---- Test accuracy.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500         # images per compiled forward pass
  config.eval.num_examples = 0         # 0: the whole eval split; N: its first N
  config.eval.every_steps = 0          # test accuracy during training (TensorBoard); 0: at the end

  return config
