"""Fashion-MNIST in latent space: a DiT on the 7×7 latents of guidedflow's own autoencoder.

Latent diffusion in four commands (2-core CPU; timings in docs/latent_diffusion.md; the
second classifier, another seed, is the autoencoder's feature loss):
  python -m guidedflow.main --config configs/fmnist_classifier.py --workdir runs/fmnist_classifier
  python -m guidedflow.main --config configs/fmnist_classifier.py \
      --workdir runs/fmnist_classifier_seed1 --config.train.seed=1
  python -m guidedflow.main --config configs/fmnist_autoencoder.py --workdir runs/fmnist_autoencoder
  python -m guidedflow.main --config configs/fashion_mnist_latent.py --workdir runs/fmnist_latent

The first training step encodes the train and test splits once into the latent cache
(<workdir>/latent_cache; `--mode=encode` does only that); every step then draws
z = mean + std·ε afresh from the cached moments. Samples are decoded inside the sampler, so
`--mode=sample` writes pixel images and `--mode=evaluate` measures pixels with the same
metrics and sweeps as the pixel models.

The argument picks the DiT variant (default 'XS/1': 49 tokens of 1×1×8 patches, width 192,
6 blocks; about the U-Net default's cost per image: 93 vs 107 train img/s, benchmarks/README.md).
"""

from configs import fashion_mnist


def get_config(variant='XS/1'):
  config = fashion_mnist.get_config(f'dit={variant or "XS/1"}')
  config.input.space = 'latents'
  config.autoencoder.workdir = 'runs/fmnist_autoencoder'
  config.autoencoder.cache = True       # False: encode every batch on the fly instead
  config.autoencoder.flip = False       # clothes are left/right symmetric enough, but the
                                        # pixel default trains without mirrors: compare alike
  config.autoencoder.batch_size = 500

  # The training wall-clock of the pixel default it is measured against (docs/latent_diffusion.md): 6,400 U-Net steps of 32 train in 1,629 s at 125 img/s on docs/training.md's 2-core
  # Xeon, where this DiT trains at 93 img/s reading the cache: 4,700 steps of 32.
  config.train.num_steps = 4_700
  config.train.batch_size = 32
  config.train.sample_every_steps = 2_350
  config.checkpoint.every_steps = 1_175
  return config
