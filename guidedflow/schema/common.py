"""Config sections every task shares: data, the training loop, the optimizer, checkpoints, mesh.

Each task's schema (`guidedflow/schema/<task>.py`) builds its config from these, overriding the
values it tunes, so that the generator and the auxiliary networks cannot drift apart in what a
key means.
"""

import ml_collections
from ml_collections import config_dict


def data(**overrides):
  """The `input` section: which dataset, where, and its splits."""
  section = ml_collections.ConfigDict()
  # 'fashion_mnist' | 'tfds:<name>' (array_record) | 'imagefolder' | 'caption_folder' | 'webdataset'
  section.dataset = 'fashion_mnist'
  # None: /usr/share/datasets/fashion-mnist (or the TFDS default); imagefolder, caption_folder:
  # <data_dir>/<split>; webdataset: <data_dir>/<split>/*.tar, or a glob ('{split}' replaced)
  section.data_dir = config_dict.placeholder(str)
  section.image_key = 'image'        # feature names (TFDS datasets)
  section.label_key = 'label'
  section.num_classes = 10
  section.train_split = 'train'
  section.eval_split = 'test'
  section.num_train_examples = 0     # > 0: train on the first N examples only (0: all)
  section.update(overrides)
  return section


def image_data(**overrides):
  """`data()` with what a network that makes or encodes images reads of its input."""
  section = data()
  section.space = 'pixels'           # 'pixels' | 'latents' (train on config.autoencoder's latents)
  section.image_size = 0             # > 0: ADM center crop to this size (ImageFolder / TFDS JPEGs)
  section.caption_column = 'text'    # caption_folder: metadata.jsonl's column of the captions
  section.update(overrides)
  return section


def train(*, num_steps, batch_size, seed=0, log_every_steps=100, **extra):
  """The `train` section's keys every task reads, and the task's own (`extra`)."""
  section = ml_collections.ConfigDict()
  # Resuming refuses keys that change what the weights mean (model, path, parameterization,
  # classes, data); True resumes anyway (fine-tuning on purpose) and logs each such key.
  section.allow_config_change = False
  section.num_steps = num_steps
  section.batch_size = batch_size    # global batch, split over processes and devices
  section.seed = seed
  section.log_every_steps = log_every_steps
  # A workdir with a history but no checkpoint to continue from (result.json of a finished run
  # whose checkpoints are gone, or only damaged steps) is refused; True trains it again from 0.
  section.restart = False
  # Wall-clock budget of the whole run in minutes (0: none); with train.num_steps None the run
  # measures its step rate in the warm-up and chooses the count that fits (time_budget.py).
  section.time_budget_minutes = 0.0
  section.update(extra)
  return section


def optim(*, learning_rate, warmup_steps, schedule='constant', final_lr_factor=0.1,
          weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=1.0, ema_decay=0.0,
          ema_warmup=True):
  """The `optim` section: AdamW, linear warm-up, optional cosine decay, global-norm clipping and
  an EMA of the weights (what a run reports and samples from when ema_decay > 0)."""
  section = ml_collections.ConfigDict()
  section.learning_rate = learning_rate
  section.warmup_steps = warmup_steps
  section.schedule = schedule        # after warm-up: 'constant' | 'cosine' (to lr × final_lr_factor)
  section.final_lr_factor = final_lr_factor  # cosine only
  section.weight_decay = weight_decay
  section.b1 = b1
  section.b2 = b2
  section.grad_clip_norm = grad_clip_norm  # 0 disables clipping
  section.ema_decay = ema_decay      # 0: no EMA
  section.ema_warmup = ema_warmup    # decay_t = min(ema_decay, (1 + t) / (10 + t))
  return section


def checkpoint(*, every_steps, max_to_keep):
  """The `checkpoint` section: orbax checkpoints in <workdir>/checkpoints."""
  section = ml_collections.ConfigDict()
  section.every_steps = every_steps
  section.max_to_keep = max_to_keep
  return section


def mesh():
  """The `mesh` section: devices and processes (guidedflow/sharding.py; docs/scaling.md)."""
  section = ml_collections.ConfigDict()
  # (data, fsdp, tensor) sizes, -1 = all remaining devices. The batch is split over
  # data × fsdp; parameters, optimizer state and EMA over fsdp (ZeRO-3) and tensor (heads/MLP).
  section.shape = (-1, 1, 1)
  # Multi-slice / multi-host over a slower network (DCN): (data, fsdp, tensor) across slices
  # (TPU) or processes (GPU/CPU hosts); mesh.shape is then the mesh within one of them.
  section.dcn_shape = (1, 1, 1)
  section.min_shard_size = 4096      # parameters with fewer elements stay replicated
  # jax.distributed: 'auto' (when a coordinator is given, on a Cloud TPU VM, or in a Slurm step
  # with several tasks) | 'on' (always; JAX auto-detects TPU/Slurm/MPI) | 'off' (one process).
  section.distributed = 'auto'
  section.coordinator_address = config_dict.placeholder(str)  # 'host:port'; None: env JAX_COORDINATOR_ADDRESS
  section.num_processes = config_dict.placeholder(int)  # None: env JAX_NUM_PROCESSES (or auto-detected)
  section.process_id = config_dict.placeholder(int)     # None: env JAX_PROCESS_ID (or auto-detected)
  return section


def compile_target():
  """The `compile` section: --mode=compile compiles the task's train step ahead of time for a
  TPU target (needs libtpu: pip install -e '.[aot]') and reports per-device memory, FLOPs and
  collectives (guidedflow/aot.py)."""
  section = ml_collections.ConfigDict()
  section.topology = config_dict.placeholder(str)  # 'v5p-64', 'v5e-32', 'v4-32', 'v5p:4x4x2'
  section.num_slices = 1             # slices joined over DCN (config.mesh.dcn_shape spans them)
  section.step_time_s = 1.0          # the step time the reported MFU assumes
  section.image_shape = config_dict.placeholder(tuple)  # None: the dataset's (H, W, C)
  return section
