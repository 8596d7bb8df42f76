"""Defaults of the config keys added after configs were first written, and `get`.

The bottom layer's config reader: any module may read a config key through `get` without
importing the modules whose choices `validation` checks.
"""

# Keys added after configs were first written: their value when a config lacks them (the
# behaviour before the key existed), so that configs saved in older checkpoints still load.
# Read them with `get`.
DEFAULTS = {'model.unet_norm': 'group', 'model.attention_impl': 'einsum',
             'model.remat': 'none', 'model.scan_blocks': True, 'model.unroll_blocks': 'auto',
             'optim.schedule': 'constant',
             'mesh.distributed': 'auto', 'checkpoint.max_to_keep': 3, 'input.space': 'pixels',
             'autoencoder.cache': True, 'autoencoder.cache_dtype': 'float32',
             'autoencoder.flip': False, 'autoencoder.batch_size': 256,
             'autoencoder.workers': 0, 'sampling.npz_keys': 'guidedflow',
             'sampling.guidance': 'cfg', 'sampling.classifier_scale': 0.0,
             'sampling.classifier_workdir': None, 'eval.classifier_scales': None,
             'train.allow_config_change': False, 'sampling.gather_weights': True,
             'sampling.cpu_dots': 'auto', 'train.cpu_dots': 'auto', 'model.arch': 'cnn', 'model.unet_attention_heads': 0,
             'eval.extra_feature_networks': (), 'train.time_budget_minutes': 0.0}


def get(config, dotted):
  """`config.<dotted>`, or its default when the config predates the key (`DEFAULTS`)."""
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return DEFAULTS.get(dotted)
    node = node[part]
  return node
