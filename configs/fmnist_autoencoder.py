"""The Fashion-MNIST autoencoder of latent diffusion: 28×28×1 ↔ 7×7×8 (the SD-VAE family).

Usage (the two classifiers first: seed 0 measures, seed 1 is the feature loss's):
  python -m guidedflow.main --config configs/fmnist_classifier.py --workdir runs/fmnist_classifier
  python -m guidedflow.main --config configs/fmnist_classifier.py \
      --workdir runs/fmnist_classifier_seed1 --config.train.seed=1
  python -m guidedflow.main --config configs/fmnist_autoencoder.py --workdir runs/fmnist_autoencoder
  python -m guidedflow.main --config configs/fmnist_autoencoder.py --workdir runs/fmnist_autoencoder \
      --mode=evaluate

It trains through the one training loop (resume, preemption, non-finite stop) and reports PSNR
on the test split, the latent scale and shift (result.json) and, with the feature classifier
(configs/fmnist_classifier.py), the reconstructions' FD and class accuracy.
"""

from guidedflow.schema import autoencoder


def get_config():
  """Returns the autoencoder config: its schema's defaults (every key and its meaning:
  guidedflow/schema/autoencoder.py)."""
  return autoencoder.get_config()
