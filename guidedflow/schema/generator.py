"""The generator's config schema (task 'generate'): every key guidedflow reads, with its meaning.

`configs/default.py` returns it; the other generator configs start from it and override what
they change. A config that lacks a key (a user's own, or one saved by an older version) gets
it from here when the run loads it (`guidedflow.schema.complete`). Override any key on the
command line, e.g. `--config.train.num_steps=2000 --config.sampling.guidance_scale=3`.
"""

import ml_collections
from ml_collections import config_dict

from guidedflow.schema import common


def get_config():
  """The generator schema: a Fashion-MNIST-sized DiT (configs/fashion_mnist.py is the tuned one)."""
  config = ml_collections.ConfigDict()
  # The task guidedflow.main runs (guidedflow/tasks/registry.py): 'generate' (this schema) |
  # 'classifier' | 'noisy_classifier' | 'autoencoder' (guidedflow/schema/<task>.py).
  config.task = 'generate'

  # ---- Model: u_θ(x|y) / s_θ(x|y) / ε_θ(x|y) depending on loss.parameterization.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'dit'            # 'dit' | 'unet'
  config.model.variant = 'T/4'         # DiT variant 'S/2', 'B/4', 'XL/2', 'T/2', ... (dit only)
  config.model.unet_channels = (32, 64, 128)   # U-Net channels per resolution (unet only)
  config.model.unet_num_residual_layers = 2    # residual blocks per U-Net stage (unet only)
  config.model.unet_norm = 'group'     # 'group' (GroupNorm in every residual block) | 'none' (unet only)
  config.model.unet_attention_heads = 0  # > 0: self-attention with this many heads at the lowest resolution (unet only)
  # unet with a text encoder (text.encoder != 'none'): cross-attention to the caption tokens after
  # each residual block at these resolutions, indices into unet_channels (-1 = the lowest; the
  # default (-2, -1) is 14×14 and 7×7 for 28×28 images), with at most unet_text_heads heads
  # (fewer where a head would be narrower than 16 channels).
  config.model.unet_text_attention_levels = (-2, -1)
  config.model.unet_text_heads = 4
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
  config.input = common.image_data()

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

  # ---- Text (captions as y; guidedflow/text_encoders.py, text_cache.py). For now a frozen
  # encoder's outputs are cached by --mode=encode; text-conditioned training is issue 48.
  config.text = ml_collections.ConfigDict()
  config.text.encoder = 'none'         # 'none' | 'clip' | 't5' | 'trained' (small, trained with the generator)
  config.text.weights = config_dict.placeholder(str)  # clip / t5: a Hugging Face model folder
  config.text.tokenizer = config_dict.placeholder(str)  # None: found in or beside text.weights
  config.text.max_length = config_dict.placeholder(int)  # None: the encoder's (77 CLIP, 120 T5, trained: 64 bytes or 16 words)
  config.text.cache_dir = config_dict.placeholder(str)  # None: <workdir>/text_cache
  config.text.cache_dtype = 'float16'  # 'float16' | 'bfloat16' | 'float32' (hidden states on disk)
  config.text.batch_size = 64          # encoding batch
  config.text.null = 'learned'         # CFG's ∅: 'learned' (PixArt-α's null tokens) | 'empty' (the encoded '', trained encoder)
  config.text.encoder_width = 128      # trained: the small encoder's width, blocks and heads
  config.text.encoder_depth = 3
  config.text.encoder_heads = 4
  config.text.tokenizer_kind = 'bytes'  # trained: 'bytes' (UTF-8, no vocabulary) | 'words' (the training captions' words, kept in <workdir>/text_vocabulary.json)

  # ---- Training loop.
  config.train = common.train(
      # Steps to train; None with train.time_budget_minutes > 0: the run measures its step rate
      # in the warm-up and chooses the count that fits the budget (guidedflow/time_budget.py).
      num_steps=config_dict.FieldReference(20_000, field_type=int),
      batch_size=128,
      sample_every_steps=5_000,  # sample grid (PNG + TensorBoard); 0 = only at the end
      # XLA:CPU: 'auto' | 'ynnpack' | 'onednn' (auto: oneDNN's dot fusions for an f32 DiT on an
      # Intel CPU with AMX and jaxlib >= 0.12, where they train faster)
      cpu_dots='auto')

  # ---- Optimizer (sampling uses the EMA weights).
  config.optim = common.optim(learning_rate=3e-4, warmup_steps=500, ema_decay=0.999)

  # ---- Sampling (training-time grids and --mode=sample).
  config.sampling = ml_collections.ConfigDict()
  config.sampling.method = 'heun'      # 'euler' | 'heun' | 'euler_maruyama' | 'dpmpp_2m' | 'unipc' (docs/solvers.md)
  config.sampling.num_steps = 50
  config.sampling.guidance_scale = 2.0  # w: (1 − w)·u(x|∅) + w·u(x|y); 1 = conditional, 0 = unconditional
  # 'cfg' (classifier-free, w) | 'classifier' (the unconditional field + w_c b_t ∇log p_t(y|x) of
  # the noise-aware classifier in classifier_workdir) | 'cfg+classifier' (both, w and w_c).
  config.sampling.guidance = 'cfg'
  config.sampling.classifier_scale = 1.0  # w_c of classifier guidance
  config.sampling.classifier_workdir = 'runs/fmnist_noisy_classifier'  # made by: python -m guidedflow.main --config configs/fmnist_noisy_classifier.py --workdir runs/fmnist_noisy_classifier
  config.sampling.guidance_interval = config_dict.placeholder(tuple)  # None or (t_lo, t_hi): w and w_c apply only there (w = 1, w_c = 0 outside)
  # How CFG combines u_c = u(x|y) and u_∅ = u(x|∅), in velocity space (docs/guidance_methods.md):
  # 'cfg' | 'rescale' (Lin et al. 2024) | 'cfg_zero_star' (Fan et al. 2025) | 'apg' (Sadat et al. 2024)
  # | 'cfg_pp' (Chung et al. 2024: guidance_scale is its λ, typically in [0, 1]; euler, dpmpp_2m, unipc)
  # | 'autoguidance' (Karras et al. 2024: a weaker checkpoint of the same model in u(x|∅)'s place).
  # Each knob's default is the neutral one, where its method is plain CFG (or adds nothing to it).
  config.sampling.guidance_method = 'cfg'
  config.sampling.rescale_phi = 0.0    # rescale: φ in [0, 1], mix of the std-rescaled field (0 = CFG)
  config.sampling.zero_star_optimized_scale = True  # cfg_zero_star: s* = <u_c, u_∅>/|u_∅|² per sample (False: s* = 1)
  config.sampling.zero_star_init_steps = 0  # cfg_zero_star: K, the first K steps have zero velocity (and no model evaluation)
  config.sampling.apg_eta = 1.0        # apg: η, weight of Δ's part parallel to u_c (1 = CFG)
  config.sampling.apg_norm_threshold = 0.0  # apg: r, ‖Δ‖ clipped to r per sample (0 = no clipping)
  config.sampling.apg_momentum = 0.0   # apg: β in (-1, 1), Δ ← Δ + β Δ_prev across steps (< 0: reverse momentum; 0 = none)
  config.sampling.autoguidance_step = config_dict.placeholder(int)  # autoguidance: the weak model's checkpoint step (None: the newest of autoguidance_workdir), e.g. an early step of this run
  config.sampling.autoguidance_workdir = config_dict.placeholder(str)  # autoguidance: the weak model's run, the same model (None: this run's workdir)
  config.sampling.sigma_schedule = 'constant'  # euler_maruyama: 'constant' | 'decreasing' | 'path'
  config.sampling.sigma = 0.0          # euler_maruyama noise level σ
  config.sampling.num_samples = 1000   # --mode=sample: total samples, balanced over classes
  # --mode=sample holds its uint8 samples in memory: more than this many GiB is refused up front.
  config.sampling.max_output_gib = 4.0
  config.sampling.batch_size = 500     # samples per compiled sampler call
  config.sampling.gather_weights = True  # FSDP: gather the weights once per sampler call, not at every model evaluation (holds them whole per device)
  config.sampling.cpu_dots = 'auto'   # XLA:CPU: 'auto' | 'ynnpack' | 'eigen' | 'onednn' (auto, f32 on an Intel CPU with AMX: Eigen's GEMMs with jaxlib < 0.12, oneDNN's dot fusions for a DiT from 0.12, where they sample faster)
  config.sampling.seed = 0
  config.sampling.npz_keys = 'guidedflow'  # samples.npz keys: 'guidedflow' (images, labels) | 'adm' (arr_0, arr_1)
  config.sampling.grid_guidance_scales = (1.0, 2.0, 4.0)  # grid columns: one block per w
  config.sampling.prompts = config_dict.placeholder(str)  # a text model: 'a dark wide pullover;a small light sandal'
  config.sampling.prompts_file = config_dict.placeholder(str)  # or a file, one prompt per line
  config.sampling.negative_prompt = config_dict.placeholder(str)  # takes ∅'s place in CFG
  config.sampling.grid_samples_per_class = 4  # images per (class, w) cell of the grid
  config.sampling.grid_classes = config_dict.placeholder(tuple)  # None: every class; or a tuple of class ids (grid rows)

  # ---- Device mesh and processes.
  config.mesh = common.mesh()

  # ---- --mode=compile: the train step compiled ahead of time for a TPU target.
  config.compile = common.compile_target()

  # ---- Checkpoints (orbax) in <workdir>/checkpoints.
  config.checkpoint = common.checkpoint(every_steps=1_000, max_to_keep=3)

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
  config.eval.samples_per_composition = 20  # text models: samples per class × attribute × level prompt (guidedflow/text_evaluate.py)
  config.eval.nearest_k = 3            # k of the k-NN precision/recall and density/coverage
  config.eval.grid_rows_per_class = 2  # guidance_grid.png: rows per class, one column per w
  config.eval.num_batches = 20         # held-out loss: batches of train.batch_size (0 = whole split)
  config.eval.num_examples = 0         # > 0: the eval split's first N examples only (0: all)
  config.eval.every_steps = 0          # periodic evaluation during training (TensorBoard); 0 = only at the end
  config.eval.periodic_samples_per_class = 20  # samples per class of the periodic evaluation (0: held-out loss only)

  return config
