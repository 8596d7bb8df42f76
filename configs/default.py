"""Default generator configuration: the schema of task 'generate', every key with its meaning.

The keys, their defaults and what each means are in `guidedflow/schema/generator.py` (shared
sections: `guidedflow/schema/common.py`). Other generator configs import this one and override
what they change. Override any key on the command line, e.g.
`--config.train.num_steps=2000 --config.sampling.guidance_scale=3`.
"""

from guidedflow.schema import generator


def get_config():
  """Returns the default config (Fashion-MNIST-sized DiT; see fashion_mnist.py for the tuned one)."""
  return generator.get_config()
