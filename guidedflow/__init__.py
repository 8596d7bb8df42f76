"""guidedflow: guided flow matching and diffusion (classifier-free guidance) in JAX + Flax NNX."""

__version__ = "0.1.0"
