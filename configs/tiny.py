"""Tiny config for tests and smoke runs: a 1-block DiT on Fashion-MNIST, a few steps."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = 'test/7'
  config.train.num_steps = 4
  config.train.batch_size = 8
  config.train.log_every_steps = 1
  config.train.sample_every_steps = 0
  config.optim.warmup_steps = 2
  config.sampling.num_steps = 2
  config.sampling.num_samples = 20
  config.sampling.batch_size = 20
  config.sampling.grid_guidance_scales = (1.0, 3.0)
  config.sampling.grid_samples_per_class = 1
  config.checkpoint.every_steps = 2
  config.eval.num_batches = 2
  config.eval.feature_network = 'none'  # tests that need one train a tiny classifier
  return config
