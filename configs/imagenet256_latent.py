"""ImageNet 256×256 in latent space: the DiT-XL/2 / SiT-XL/2 recipe, for accelerators.

Not run in CI (tests/imagenet_pipeline_test.py runs the same path on a tiny stand-in). The
whole path of latent diffusion (guidedflow/latents.py, latent_cache.py, image_folder.py):
  ImageNet JPEGs (an ImageFolder `<data_dir>/train/<wnid>/*.JPEG`, `<data_dir>/val/<wnid>/...`,
  or TFDS `imagenet2012` prepared as array_record: --config.input.dataset=tfds:imagenet2012
  --config.input.eval_split=validation) → ADM center crop to 256 → the Stable Diffusion VAE
  (`sd-vae-ft-ema`, a file you download: --config.autoencoder.weights=PATH) encodes every
  image and its mirror once into the latent cache (float16 moments, 32×32×4) → DiT-XL/2 on
  z = (mean + std·ε) · 0.18215, ε fresh each step → sampling → SD-VAE decode → Inception-v3
  FID (pytorch-fid's weights file: --config.eval.inception_weights=PATH) against the val split;
  `--mode=sample` writes samples.npz with ADM's keys (arr_0 images, arr_1 labels) for the ADM
  evaluator (guided-diffusion/evaluations) with its VIRTUAL_imagenet256_labeled.npz.
Steps: `--mode=encode` (writes the cache; every process encodes its slice, JPEG decoding in
`autoencoder.workers` grain processes), then train, `--mode=sample`, `--mode=evaluate`. The
cache directory must be visible to every host (each reads the rows of its part of each batch).

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
FSDP-8 leaves 1.27 GiB of it per chip. XLA:TPU's own figures for the three recipes
(--mode=compile, docs/scaling.md, "Compile for a TPU target"; no remat): 7.7 of 32 GiB per v4 chip,
5.0 of 95 GiB per v5p chip, 3.9 of 16 GiB per v5e chip; the CFG sampler beside the train
state stays under 4 GiB. `python benchmarks/memory.py` prints the formula's table of the
largest per-device batch.
One GPU: model.attention_impl 'auto' (the default) runs cuDNN flash attention there; on one
H200 the recipe's batch 256 trains at 459 img/s, 0.43 of the bf16 matmul peak, in 108.5 GiB
(no remat; benchmarks/README.md). On an 80 GB card add
--config.model.remat=dots_with_no_batch_dims_saveable (26.3 GiB at batch 256, 8 % slower).
Tensor parallelism (mesh (d, f, t)) splits activations too; DiT-XL/2 at 256 px does not need it.
Multi-slice (e.g. 2 × v5p-64 over DCN): --config.mesh.dcn_shape=2,1,1 with mesh.shape per slice.

Usage:
  python -m guidedflow.main --config configs/imagenet256_latent.py --workdir gs://BUCKET/run
"""

from configs import default


# Where --mode=compile shows the step does not fit without recomputing the blocks' activations
# (none of the recipes, since the DiT pins its activations to the batch split).
REMAT = {}
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

  config.input.dataset = 'imagefolder'  # or 'tfds:imagenet2012' (eval_split 'validation')
  config.input.data_dir = '/data/imagenet'
  config.input.image_size = 256          # ADM center crop
  config.input.num_classes = 1000
  config.input.train_split = 'train'
  config.input.eval_split = 'val'
  config.input.space = 'latents'
  config.autoencoder.weights = '/data/sd-vae-ft-ema/diffusion_pytorch_model.safetensors'
  config.autoencoder.cache_dir = '/data/latent_cache/imagenet256_sd-vae-ft-ema'
  config.autoencoder.cache_dtype = 'float16'  # 1.28M × 2 views × 32·32·4 × 2 moments: 42 GB
  config.autoencoder.flip = True         # fast-DiT: each image and its mirror
  config.autoencoder.batch_size = 64
  config.autoencoder.workers = 16        # grain processes decoding JPEGs

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
  config.model.remat = REMAT.get(topology, config.model.remat)
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
  config.sampling.npz_keys = 'adm'       # samples.npz: arr_0 (uint8 images), arr_1 (labels)
  config.eval.guidance_scales = (1.0, 1.5, 2.0, 4.0)
  config.eval.feature_network = 'inception_v3'
  config.eval.inception_weights = '/data/pt_inception-2015-12-05-6726825d.pth'
  config.eval.num_real_images = 50_000   # the val split's statistics
  config.eval.samples_per_class = 50     # 50k samples, the standard FID-50k
  return config
