"""Default configuration: every key guidedflow reads, with its meaning.

Other configs import this one and override what they change. Override any key on the command
line, e.g. `--config.train.num_steps=2000 --config.sampling.guidance_scale=3`.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  """Returns the default config (Fashion-MNIST-sized DiT; see fashion_mnist.py for the tuned one)."""
  config = ml_collections.ConfigDict()
  # The task guidedflow.main trains (guidedflow/tasks/): 'generate' (this file: a generative
  # model) | 'classifier' (the feature network for the sample metrics; configs/fmnist_classifier.py).
  config.task = 'generate'

  # ---- Model: u_θ(x|y) / s_θ(x|y) / ε_θ(x|y) depending on loss.parameterization.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'dit'            # 'dit' | 'unet'
  config.model.variant = 'T/4'         # DiT variant 'S/2', 'B/4', 'XL/2', 'T/2', ... (dit only)
  config.model.unet_channels = (32, 64, 128)   # U-Net channels per resolution (unet only)
  config.model.unet_num_residual_layers = 2    # residual blocks per U-Net stage (unet only)
  config.model.unet_norm = 'group'     # 'group' (GroupNorm in every residual block) | 'none' (unet only)
  config.model.unet_attention_heads = 0  # > 0: self-attention with this many heads at the lowest resolution (unet only)
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16' (accelerators)
  config.model.param_dtype = 'float32'  # parameter dtype
  # dit: what the backward pass keeps of each block: 'none' | 'full' (block inputs only: least
  # memory, ~1/3 more compute) | 'dots_with_no_batch_dims_saveable' (weight-matmul outputs).
  # Typed `object` so that older configs' and command lines' True / False (= full / none) pass.
  config.model.remat = config_dict.FieldReference('none', field_type=object)
  # dit: blocks stacked on a 'layers' axis and run by one nnx.scan (compile time independent of
  # depth); False: one module per block, the layout of checkpoints written before scanning.
  config.model.scan_blocks = True
  # dit: scanned blocks per scan iteration: 'auto' (all on a CPU: no stacked residuals, faster
  # training; one elsewhere: compile time independent of depth) | a positive int.
  config.model.unroll_blocks = config_dict.FieldReference('auto', field_type=object)
  # dit: 'auto' ('cudnn' on an NVIDIA GPU (Ampere on) with bfloat16 compute, else 'einsum') | 'einsum' | 'xla'
  # (jax.nn.dot_product_attention) | 'cudnn' (its cuDNN flash attention: GPU, bfloat16 compute).
  config.model.attention_impl = 'auto'

  # ---- Probability path x_t = α_t z + β_t ε (t = 0 noise, t = 1 data).
  config.path = ml_collections.ConfigDict()
  config.path.schedule = 'linear'      # 'linear' (CondOT) | 'cosine' | 'vp'

  # ---- Training objective.
  config.loss = ml_collections.ConfigDict()
  config.loss.parameterization = 'velocity'  # 'velocity' → guided CFM; 'score' | 'noise' → guided DSM
  config.loss.label_dropout = 0.1      # η: probability of replacing y by the null label ∅
  config.loss.time_sampler = 'uniform'  # 'uniform' (the lecture's) | 'logit_normal' (SD3)
  config.loss.logit_normal_mean = 0.0  # logit_normal only
  config.loss.logit_normal_std = 1.0   # logit_normal only
  config.loss.dsm_weighting = 'noise'  # DSM only: 'none' (raw ‖s_θ − s‖²) | 'noise' (× β², ε-MSE)
  config.loss.t_eps = 1e-3             # distance kept from the singular end of [0, 1]

  # ---- Data.
  config.input = ml_collections.ConfigDict()
  config.input.dataset = 'fashion_mnist'  # 'fashion_mnist' | 'tfds:<name>' (array_record)
  config.input.data_dir = config_dict.placeholder(str)  # None: /usr/share/datasets/fashion-mnist (or TFDS default)
  config.input.image_key = 'image'     # feature names (TFDS datasets)
  config.input.label_key = 'label'
  config.input.num_classes = 10
  config.input.train_split = 'train'
  config.input.eval_split = 'test'
  config.input.space = 'pixels'        # 'pixels' | 'latents' (train on config.autoencoder's latents)
  config.input.image_size = 0          # > 0: ADM center crop to this size (ImageFolder / TFDS JPEGs)
  config.input.num_train_examples = 0  # > 0: train on the first N examples only (0: all)

  # ---- Latent diffusion (input.space='latents'; guidedflow/latents.py, latent_cache.py).
  config.autoencoder = ml_collections.ConfigDict()
  config.autoencoder.workdir = config_dict.placeholder(str)  # a finished configs/fmnist_autoencoder.py run
  config.autoencoder.weights = config_dict.placeholder(str)  # or a Stable Diffusion VAE file
  config.autoencoder.cache = True      # encode each split once into the latent cache; False: on the fly
  config.autoencoder.cache_dir = config_dict.placeholder(str)  # None: <workdir>/latent_cache
  config.autoencoder.cache_dtype = 'float32'  # 'float32' | 'float16' (half the disk)
  config.autoencoder.flip = False      # also encode horizontal mirrors (2 examples per image)
  config.autoencoder.batch_size = 256  # encoding batch
  config.autoencoder.workers = 0       # grain worker processes decoding JPEGs while encoding

  # ---- Training loop.
  config.train = ml_collections.ConfigDict()
  # Steps to train; None with train.time_budget_minutes > 0: the run measures its step rate
  # in the warm-up and chooses the count that fits the budget (guidedflow/time_budget.py).
  config.train.num_steps = config_dict.FieldReference(20_000, field_type=int)
  config.train.time_budget_minutes = 0.0  # wall-clock budget of the whole run (0: none)
  config.train.batch_size = 128        # global batch, split over processes and devices
  config.train.seed = 0
  config.train.log_every_steps = 100
  config.train.sample_every_steps = 5_000   # sample grid (PNG + TensorBoard); 0 = only at the end
  # Resuming refuses keys that change what the weights mean (model, path, parameterization,
  # classes, data); True resumes anyway (fine-tuning on purpose) and logs each such key.
  config.train.allow_config_change = False
  config.train.cpu_dots = 'auto'      # XLA:CPU: 'auto' | 'ynnpack' | 'onednn' (auto: oneDNN's dot fusions for an f32 DiT on an Intel CPU with AMX and jaxlib ≥ 0.12, where they train faster)

  # ---- Optimizer: AdamW, linear warm-up, optional cosine decay, global-norm clipping, EMA.
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 500
  config.optim.schedule = 'constant'   # after warm-up: 'constant' | 'cosine' (to lr × final_lr_factor)
  config.optim.final_lr_factor = 0.1   # cosine only
  config.optim.weight_decay = 0.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.grad_clip_norm = 1.0    # 0 disables clipping
  config.optim.ema_decay = 0.999       # EMA of parameters; sampling uses the EMA weights
  config.optim.ema_warmup = True       # decay_t = min(ema_decay, (1 + t) / (10 + t))

  # ---- Sampling (training-time grids and --mode=sample).
  config.sampling = ml_collections.ConfigDict()
  config.sampling.method = 'heun'      # 'euler' | 'heun' | 'euler_maruyama'
  config.sampling.num_steps = 50
  config.sampling.guidance_scale = 2.0  # w: (1 − w)·u(x|∅) + w·u(x|y); 1 = conditional, 0 = unconditional
  # 'cfg' (classifier-free, w) | 'classifier' (the unconditional field + w_c b_t ∇log p_t(y|x) of
  # the noise-aware classifier in classifier_workdir) | 'cfg+classifier' (both, w and w_c).
  config.sampling.guidance = 'cfg'
  config.sampling.classifier_scale = 1.0  # w_c of classifier guidance
  config.sampling.classifier_workdir = 'runs/fmnist_noisy_classifier'  # made by: python -m guidedflow.main --config configs/fmnist_noisy_classifier.py --workdir runs/fmnist_noisy_classifier
  config.sampling.guidance_interval = config_dict.placeholder(tuple)  # None or (t_lo, t_hi): w and w_c apply only there (w = 1, w_c = 0 outside)
  config.sampling.sigma_schedule = 'constant'  # euler_maruyama: 'constant' | 'decreasing' | 'path'
  config.sampling.sigma = 0.0          # euler_maruyama noise level σ
  config.sampling.num_samples = 1000   # --mode=sample: total samples, balanced over classes
  config.sampling.batch_size = 500     # samples per compiled sampler call
  config.sampling.gather_weights = True  # FSDP: gather the weights once per sampler call, not at every model evaluation (holds them whole per device)
  config.sampling.cpu_dots = 'auto'   # XLA:CPU: 'auto' | 'ynnpack' | 'eigen' | 'onednn' (auto, f32 on an Intel CPU with AMX: Eigen's GEMMs with jaxlib < 0.12, oneDNN's dot fusions for a DiT from 0.12, where they sample faster)
  config.sampling.seed = 0
  config.sampling.npz_keys = 'guidedflow'  # samples.npz keys: 'guidedflow' (images, labels) | 'adm' (arr_0, arr_1)
  config.sampling.grid_guidance_scales = (1.0, 2.0, 4.0)  # grid columns: one block per w
  config.sampling.grid_samples_per_class = 4  # images per (class, w) cell of the grid
  config.sampling.grid_classes = config_dict.placeholder(tuple)  # None: every class; or a tuple of class ids (grid rows)

  # ---- Device mesh and processes (guidedflow/sharding.py; docs/scaling.md).
  config.mesh = ml_collections.ConfigDict()
  # (data, fsdp, tensor) sizes, -1 = all remaining devices. The batch is split over
  # data × fsdp; parameters, optimizer state and EMA over fsdp (ZeRO-3) and tensor (heads/MLP).
  config.mesh.shape = (-1, 1, 1)
  # Multi-slice / multi-host over a slower network (DCN): (data, fsdp, tensor) across slices
  # (TPU) or processes (GPU/CPU hosts); mesh.shape is then the mesh within one of them.
  config.mesh.dcn_shape = (1, 1, 1)
  config.mesh.min_shard_size = 4096    # parameters with fewer elements stay replicated
  # jax.distributed: 'auto' (when a coordinator is given, on a Cloud TPU VM, or in a Slurm step
  # with several tasks) | 'on' (always; JAX auto-detects TPU/Slurm/MPI) | 'off' (one process).
  config.mesh.distributed = 'auto'
  config.mesh.coordinator_address = config_dict.placeholder(str)  # 'host:port'; None: env JAX_COORDINATOR_ADDRESS
  config.mesh.num_processes = config_dict.placeholder(int)  # None: env JAX_NUM_PROCESSES (or auto-detected)
  config.mesh.process_id = config_dict.placeholder(int)     # None: env JAX_PROCESS_ID (or auto-detected)

  # ---- --mode=compile: the train step compiled ahead of time for a TPU target (needs libtpu:
  # pip install -e '.[aot]'); per-device memory, FLOPs, collectives (guidedflow/aot.py).
  config.compile = ml_collections.ConfigDict()
  config.compile.topology = config_dict.placeholder(str)  # 'v5p-64', 'v5e-32', 'v4-32', 'v5p:4x4x2'
  config.compile.num_slices = 1        # slices joined over DCN (config.mesh.dcn_shape spans them)
  config.compile.step_time_s = 1.0     # the step time the reported MFU assumes
  config.compile.image_shape = config_dict.placeholder(tuple)  # None: the dataset's (H, W, C)

  # ---- Checkpoints (orbax) in <workdir>/checkpoints.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1_000
  config.checkpoint.max_to_keep = 3

  # ---- Evaluation (--mode=evaluate and periodic).
  config.eval = ml_collections.ConfigDict()
  # --mode=evaluate samples `samples_per_class` images per class from the EMA weights and
  # measures them with a feature network against the real eval split: FD, per-class FD,
  # precision/recall, density/coverage, class accuracy (see guidedflow/evaluate.py).
  config.eval.feature_network = 'fmnist_classifier'  # 'fmnist_classifier' | 'fmnist_gap_classifier' | 'fmnist_encoder' | 'inception_v3' | 'none' (held-out loss only)
  config.eval.classifier_workdir = 'runs/fmnist_classifier'  # made by: python -m guidedflow.main --config configs/fmnist_classifier.py --workdir runs/fmnist_classifier
  # More judges: feature spaces measured beside eval.feature_network (FD, KID, per class, worst
  # class in each; docs/quality.md): 'fmnist_gap_classifier' | 'fmnist_encoder' | ...
  config.eval.extra_feature_networks = ()
  config.eval.gap_classifier_workdir = 'runs/fmnist_gap_classifier'  # made by: python -m guidedflow.main --config configs/fmnist_gap_classifier.py --workdir runs/fmnist_gap_classifier
  config.eval.encoder_workdir = 'runs/fmnist_encoder'  # made by: python -m guidedflow.main --config configs/fmnist_encoder.py --workdir runs/fmnist_encoder
  config.eval.inception_weights = config_dict.placeholder(str)  # inception_v3: path to pt_inception-2015-12-05-6726825d.pth
  config.eval.reference_path = config_dict.placeholder(str)  # None: <workdir>/eval/reference_<split>_<network>_<n>.npz (cached)
  config.eval.feature_batch_size = 0   # images per feature-network call (0: 500 classifier, 50 Inception)
  config.eval.num_real_images = 10_000  # real images for the reference (eval split) and the floor (train split)
  config.eval.samples_per_class = 100  # generated images per class for each evaluated setting
  config.eval.guidance_scales = config_dict.placeholder(tuple)  # None: sampling.guidance_scale; several = guidance sweep, e.g. 1,1.5,2,3,4
  config.eval.classifier_scales = config_dict.placeholder(tuple)  # None: sampling.classifier_scale; several = w_c sweep (classifier guidance)
  config.eval.num_steps = config_dict.placeholder(tuple)  # steps sweep (quality vs NFE), e.g. 5,10,20,50; None: no sweep
  config.eval.methods = config_dict.placeholder(tuple)  # samplers of the steps sweep; None: (sampling.method,)
  config.eval.nearest_k = 3            # k of the k-NN precision/recall and density/coverage
  config.eval.grid_rows_per_class = 2  # guidance_grid.png: rows per class, one column per w
  config.eval.num_batches = 20         # held-out loss: batches of train.batch_size (0 = whole split)
  config.eval.num_examples = 0         # > 0: the eval split's first N examples only (0: all)
  config.eval.every_steps = 0          # periodic evaluation during training (TensorBoard); 0 = only at the end
  config.eval.periodic_samples_per_class = 20  # samples per class of the periodic evaluation (0: held-out loss only)

  return config
