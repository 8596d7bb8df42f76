"""The second Fashion-MNIST feature network: another architecture, trained without augmentation.

A second judge of sample quality that shares neither architecture nor training recipe with the
first (`configs/fmnist_classifier.py`: one conv per stage, max-pools, flattened features, random
flips): two 3×3 convs per stage with strided down-sampling, globally averaged features, no
augmentation, another seed. A recipe tuned against one feature space can win it and not
another; `--mode=evaluate` reports FD and KID in every space (docs/quality.md).

Usage (about 3–5 minutes on a quiet 2-core CPU):
  python -m guidedflow.main --config configs/fmnist_gap_classifier.py \
      --workdir runs/fmnist_gap_classifier
"""

from configs import fmnist_classifier


def get_config():
  config = fmnist_classifier.get_config()
  config.model.arch = 'gap'            # strided convs + global average (models/classifier.py)
  config.model.channels = (32, 64, 96)  # two convs per stage: 28 → 14 → 7
  config.model.feature_dim = 128
  config.train.random_flip = False     # no augmentation at all
  config.train.random_shift_pixels = 0
  config.train.seed = 2                # another initialisation and data order than seed 0
  return config
