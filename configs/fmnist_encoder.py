"""The label-free Fashion-MNIST feature space: the encoder of an autoencoder trained on pixels only.

The third judge of sample quality (docs/quality.md): both classifiers learned to
tell classes apart, and a generator can fool a judge by getting what a class looks like right
and the rest wrong. This autoencoder never sees a label — reconstruction (L1) and the KL term
only, no classifier feature loss — and its features are the latent means of an image (7×7×8 =
392 numbers): what it needs to redraw the image, outline and texture included.

Usage (about 10 minutes on a 2-core CPU):
  python -m guidedflow.main --config configs/fmnist_encoder.py --workdir runs/fmnist_encoder
"""

from configs import fmnist_autoencoder


def get_config():
  config = fmnist_autoencoder.get_config()
  config.model.channels = (16, 32, 32)  # smaller than the latent-diffusion autoencoder: faster
  config.model.latent_channels = 8
  config.loss.feature_weight = 0.0     # no classifier anywhere: trained on pixels alone
  config.loss.feature_workdir = None
  config.train.num_steps = 1_200
  config.train.seed = 3
  config.checkpoint.every_steps = 400
  config.eval.feature_network = 'none'  # PSNR only: its report needs no classifier either
  return config
