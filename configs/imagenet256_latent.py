"""ImageNet 256×256 in latent space: the DiT-XL/2 / SiT-XL/2 recipe, for accelerators.

Not run in CI. The generator trains on 32×32×4 latents of 256×256 images (an 8× autoencoder),
stored as a TFDS dataset in array_record format with features `latent` (float32, 32×32×4,
already multiplied by the autoencoder's scale factor) and `label` (int, 1000 classes), e.g.
prepared with `tfds build` into $TFDS_DATA_DIR on the TPU VM or GCS.

Recipe (SiT-XL/2, in our conventions): linear path, velocity prediction, uniform t, label
dropout 0.1, AdamW lr 1e-4 constant, no weight decay, batch 256, EMA 0.9999, bf16 compute with
f32 parameters; 400k steps reach FID-50k ≈ 2.1 (SiT-XL/2, w = 1.5 with SDE sampling) in the
SiT paper. Sample with Heun / Euler–Maruyama at 250 NFE, guidance w = 1.5 (our w is DiT's s).

Mesh (config.mesh.shape = (data, fsdp, tensor); the global batch 256 is split over data × fsdp;
parameters, AdamW moments and EMA over fsdp). Pick it with the topology after the variant:
  configs/imagenet256_latent.py:XL/2,v4-32   → v4-32  = 16 chips (4 hosts × 4), 32 GiB HBM each:
      mesh (2, 8, 1): FSDP over 8 chips, 2 data-parallel groups; per-device batch 256/16 = 16.
  configs/imagenet256_latent.py:XL/2,v5p-64  → v5p-64 = 32 chips (8 hosts × 4), 95 GiB HBM each:
      mesh (4, 8, 1): per-device batch 256/32 = 8 (raise train.batch_size to 1024 for 32).
  configs/imagenet256_latent.py:XL/2,v5e-32  → v5e-32 = 32 chips (8 hosts × 4), 16 GiB HBM each:
      mesh (2, 16, 1): per-device batch 8.
  no topology: mesh (-1, 8, 1), FSDP-8 and data parallel over the rest (any multiple of 8 chips).
DiT-XL/2 (675M parameters) holds 10.06 GiB of f32 state (parameters, AdamW mu and nu, EMA);
FSDP-8 leaves 1.27 GiB of it per chip. Activations are ~0.9 GiB per sample (bf16, no remat), so
the largest per-device batch is ~30 on a 32 GiB v4 chip with FSDP-8 (we use 16), ~95 on v5p
(we use 8) and ~14 on a 16 GiB v5e (we use 8): `python benchmarks/memory.py` prints the table.
Tensor parallelism (mesh (d, f, t)) splits activations too; DiT-XL/2 at 256 px does not need it.
Multi-slice (e.g. 2 × v5p-64 over DCN): --config.mesh.dcn_shape=2,1,1 with mesh.shape per slice.

Usage:
  python -m guidedflow.main --config configs/imagenet256_latent.py --workdir gs://BUCKET/run
"""

from configs import default


# TPU topology → mesh (data, fsdp, tensor); the global batch must divide by data × fsdp.
TOPOLOGIES = {
    'v4-32': (2, 8, 1),
    'v5p-64': (4, 8, 1),
    'v5e-32': (2, 16, 1),
}


def get_config(arg='XL/2'):
  """arg: 'VARIANT' or 'VARIANT,TOPOLOGY', e.g. 'XL/2', 'B/2,v4-32'."""
  variant, _, topology = (arg or 'XL/2').partition(',')
  if topology and topology not in TOPOLOGIES:
    raise ValueError(f'Unknown topology {topology!r}; known: {sorted(TOPOLOGIES)} (or set '
                     '--config.mesh.shape=data,fsdp,tensor yourself).')
  config = default.get_config()
  config.model.name = 'dit'
  config.model.variant = variant or 'XL/2'
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'float32'

  config.input.dataset = 'tfds:imagenet256_latents'
  config.input.data_dir = None          # TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.input.image_key = 'latent'
  config.input.label_key = 'label'
  config.input.num_classes = 1000
  config.input.eval_split = 'validation'
  config.input.space = 'latents'

  config.path.schedule = 'linear'
  config.loss.parameterization = 'velocity'
  config.loss.label_dropout = 0.1
  config.loss.time_sampler = 'uniform'

  config.train.num_steps = 400_000
  config.train.batch_size = 256
  config.train.log_every_steps = 100
  config.train.sample_every_steps = 10_000
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0
  config.optim.schedule = 'constant'
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 0.0
  config.optim.ema_decay = 0.9999
  config.mesh.shape = TOPOLOGIES.get(topology, (-1, 8, 1))
  config.mesh.distributed = 'auto'      # Cloud TPU VMs are detected; launch/tpu_vm.sh sets 'on'
  config.checkpoint.every_steps = 5_000
  config.checkpoint.max_to_keep = 5

  config.sampling.method = 'heun'
  config.sampling.num_steps = 125
  config.sampling.guidance_scale = 1.5
  config.sampling.num_samples = 50_000
  config.sampling.batch_size = 256
  config.sampling.grid_samples_per_class = 4
  config.sampling.grid_classes = (88, 207, 279, 360, 387, 417, 812, 933, 974, 979)  # as DiT
  config.eval.guidance_scales = (1.0, 1.5, 2.0, 4.0)
  # FID needs pixels: Inception on decoded latents comes with the autoencoder (latent diffusion);
  # until then validation refuses a feature network on latents, so evaluation is held-out loss.
  config.eval.feature_network = 'none'
  config.eval.samples_per_class = 50  # 50k samples, the standard FID-50k
  return config
