"""Memory per device of DiT training: sharded train state, activation estimate, largest batch.

    python benchmarks/memory.py [--variant XL/2] [--meshes 1,1,1 1,8,1 ...]
        [--capacities v5e=16,v4=32,v5p=95] [--margin 0.1] [--json] [--xla_check]

Model and recipe: configs/imagenet256_latent.py (32×32×4 latents, 1000 classes, AdamW + EMA,
f32 parameters, bf16 compute). Nothing is allocated and no accelerator is needed.

**Train state** (parameters, AdamW mu and nu, EMA; plus the int32 step counters) per device is
exact: `StateBuilder.abstract_state()` on an `AbstractMesh` gives ShapeDtypeStructs with the
NamedShardings that training uses, and `sharding.bytes_per_device` sums their shard shapes.

**Activations** saved for the backward pass, per sample, per transformer block, in bytes, with
s tokens, h width, a heads, r = mlp_dim / h, c bytes of the compute dtype (2 for bf16, 4 for
f32), t the tensor-parallel factor (mesh axis 'tensor'):

    A_block = s·h·(16 + (4 + r)·c/t) + 4·a·s²/t
            = 32·s·h + 4·a·s²  for bf16, r = 4, t = 1  (f32: 48·s·h + 4·a·s²)

Basis: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"): s·h·(34 + 5·a·s/h) bytes with 16-bit activations; of its 34·s·h, 2 are dropout masks
(attention and MLP output, 1 each) and of its 5·a·s² the softmax dropout mask (1) and dropout
output (2) — DiT has no dropout, leaving 32·s·h + 2·a·s² (with tensor parallel:
s·h·(8 + 24/t) + 2·a·s²/t). That count assumes fused kernels that keep only the inputs of each
matmul, LayerNorm and GeLU. Counted from guidedflow's DiT (models/dit.py; its LayerNorm, GeLU
and attention have hand-written derivatives that keep only what they need, and LayerNorm →
modulate → Linear and GeLU → Linear are single ops that recompute the matmul input:
models/layers.py, models/attention.py, models/fused.py) at the level of what JAX saves — the residuals of `jax.vjp`, which this
script also traces and prints next to the formula — it keeps:

  * LayerNorm in f32: its output (shared with the adaLN modulation's derivative) and the
    per-token 1/σ, one f32 (s, h) tensor per LayerNorm: 2 × 4 = 8·s·h (the paper: 4, its input
    in 16 bits). JAX's derivative of the formula kept three (24·s·h) before issue 12.
  * adaLN-Zero gates: d(gate) of gate·y needs y, the attention and MLP outputs in f32: 8·s·h.
  * matmul inputs in the compute dtype: q (scaled), k, v, attention projection input: 4·c·s·h,
    split over t. The modulated qkv and fc1 inputs are recomputed from the LayerNorm outputs
    (models/fused.py; 2·c·s·h more before).
  * tanh-GeLU: its input (fc1's output), r·h wide, in the compute dtype: r·c·s·h (the paper
    keeps its output too, fc2's input: 16·s·h; here it is recomputed, models/fused.py). JAX's
    derivative of the tanh formula kept five intermediates besides the input (6·r·c·s·h)
    before issue 12.
  * attention: the probabilities in f32 (4·a·s²; the paper: 2, 16 bits). The (a, s, s) scores
    are materialised (no flash attention); JAX's derivative of the softmax kept exp(logits −
    max) in f32 and the probabilities in the compute dtype ((4 + c)·a·s²) before issue 12.
  * not counted (< 0.3%): per-sample vectors (adaLN modulation, (s, 1) statistics).

Outside the blocks, per sample: patch-embedding input s·p²C·c, final LayerNorm 4·s·h (the final
projection's input is recomputed from it), loss residual 4·s·p²C. With `jax.checkpoint` around each block
(full rematerialisation: `--config.model.remat=full`, off by default) only each block's input is
kept — the f32 residual stream, 4·s·h (not 2·s·h: guidedflow's residual stream is f32) — plus one block's
activations while that block is recomputed: depth·4·s·h + A_block + outside terms. That saving
needs a backend that schedules each block's recomputation just before its backward pass; CPU
XLA does not (`--xla_check`'s '+remat' row: same temp bytes as without remat); XLA:TPU does,
keeping 40–75% more per sample than this count at XL/2 (`benchmarks/memory_compiled.py`).

**Largest per-device batch** (samples per data × fsdp shard; the global batch is that times
data × fsdp) = floor((capacity − margin − fixed) / activations per sample), where fixed is
  * train state (exact, above);
  * gradients: one more copy of the parameters per device (f32, sharded like them); counted
    whole, which is conservative while the backward pass produces them block by block;
  * compute-dtype copies of the local parameter shards (a JAX residual: the bf16 cast of each
    weight is kept from the forward to the backward pass), params × c/4 when c ≠ 4;
  * with fsdp > 1, the all-gather working set: 2 (prefetch of the next block) × one block's
    weights gathered over fsdp (still split over tensor) × (c + 4) bytes — the gathered
    compute-dtype weights and the full-size f32 weight gradient before its reduce-scatter;
    this assumes XLA gathers again in the backward pass (ZeRO-3); if it keeps the forward's
    gathered copies alive, add params·c/t;
  * margin: a fixed share of the capacity (default 10%) for XLA workspace, the backward pass's
    transient gradient buffers and fragmentation.

The activation count is meant as an upper estimate: a backend that fuses elementwise producers
(GeLU internals, LayerNorm) into their backward consumers keeps less, down to the Korthikanti
count (printed as a lower reference); how much less on TPU/GPU is not measured here.
`--xla_check` compiles the training step (`StateBuilder.make_train_step`: loss, gradients,
AdamW, EMA) of a smaller DiT on this machine's XLA for several batch sizes (a few minutes on a
2-core CPU) and prints XLA's temp bytes per sample (the difference between batch sizes) next to
the formula. On CPU, XLA runs bf16 matmuls in f32 (its
bf16 temp bytes are f32-like) and fuses differently from TPU/GPU, so there the f32 row is the
meaningful comparison.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

# The repository root, so that `configs` imports when run as `python benchmarks/memory.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import imagenet256_latent

from guidedflow import host_allocator
from guidedflow import sharding
from guidedflow.models import dit
from guidedflow.tasks import registry
from guidedflow import train_state
# pylint: enable=g-import-not-at-top,wrong-import-position

IMAGE_SHAPE = (32, 32, 4)
DEFAULT_MESHES = ('1,1,1', '1,8,1', '1,64,1', '1,16,4', '1,8,8')
DEFAULT_CAPACITIES = 'v5e=16,v4=32,v5p=95'  # GiB of HBM per chip
GIB, MIB = 2**30, 2**20
F32 = 4  # bytes of the f32 parts (residual stream, LayerNorm, softmax, gradients)
PREFETCH = 2  # blocks of gathered weights alive at once under FSDP (current + next)


def recipe(variant):
  """configs/imagenet256_latent.py's generator, fed 32×32×4 latents directly: the autoencoder
  is outside the train step (the latent cache supplies the moments; drawing z from them is one
  elementwise op), so no SD-VAE file is needed to measure the step."""
  config = imagenet256_latent.get_config(variant)
  config.input.space = 'pixels'
  return config


# ----------------------------------------------------------------------------- activations


def compute_bytes(config) -> int:
  return jnp.dtype(config.model.dtype).itemsize


def dit_config(config, image_shape=IMAGE_SHAPE) -> dit.DiTConfig:
  height, _, channels = image_shape
  return dit.resolve_config(config.model.variant, input_size=height, in_channels=channels,
                            num_classes=config.input.num_classes)


def tensor_split(cfg: dit.DiTConfig, tensor: int) -> tuple[int, int]:
  """(heads, mlp) split factors: the rules leave a dim the mesh axis does not divide whole."""
  heads = tensor if cfg.num_heads % tensor == 0 else 1
  mlp = tensor if cfg.mlp_dim % tensor == 0 else 1
  return heads, mlp


def block_activation_bytes(cfg: dit.DiTConfig, c: int, tensor: int = 1) -> float:
  """A_block: bytes one DiT block saves for the backward pass, per sample (module docstring)."""
  s, h, a, r = cfg.num_tokens, cfg.width, cfg.num_heads, cfg.mlp_dim / cfg.width
  t_heads, t_mlp = tensor_split(cfg, tensor)
  replicated = (2 * F32          # two f32 LayerNorm outputs
                + 2 * F32)       # attention and MLP outputs in f32 for d(gate)
  split = 4 * c / t_heads + r * c / t_mlp  # q, k, v, projection input; GeLU input
  attention = F32 * a * s * s / t_heads        # the probabilities
  return s * h * (replicated + split) + attention


def outside_activation_bytes(cfg: dit.DiTConfig, c: int) -> float:
  """Per-sample residuals outside the blocks: patch embedding, final layer, loss."""
  s, h, patch = cfg.num_tokens, cfg.width, cfg.patch_dim
  return s * patch * c + s * h * F32 + s * patch * F32


def activation_bytes_per_sample(cfg: dit.DiTConfig, c: int, tensor: int = 1,
                                remat: bool = False) -> float:
  """Saved activations per sample; `remat`: `jax.checkpoint` around every block."""
  block = block_activation_bytes(cfg, c, tensor)
  outside = outside_activation_bytes(cfg, c)
  if remat:  # the f32 residual stream at each block input, plus one block recomputed
    return cfg.depth * cfg.num_tokens * cfg.width * F32 + block + outside
  return cfg.depth * block + outside


def korthikanti_block_bytes(cfg: dit.DiTConfig, tensor: int = 1, dropout: bool = False) -> float:
  """The paper's per-block count with 16-bit activations (eq. 1 / eq. 2 with t)."""
  s, h, a = cfg.num_tokens, cfg.width, cfg.num_heads
  if dropout:
    return s * h * (10 + 24 / tensor + 5 * a * s / (h * tensor))
  return s * h * (8 + 24 / tensor + 2 * a * s / (h * tensor))


def traced_residual_bytes_per_sample(config, image_shape=IMAGE_SHAPE) -> int:
  """Bytes per sample of the residuals that `jax.vjp` of the training loss keeps (traced with
  `jax.eval_shape`; nothing runs): the difference between batch sizes 2 and 1."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  builder = train_state.builder(config, image_shape, mesh)
  builder.init_rest()
  params = builder.abstract_state()['params']
  loss = registry.get_task(config).loss

  def residual_bytes(batch_size):
    batch = _abstract_batch(batch_size, image_shape)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    pullback = jax.eval_shape(
        lambda p, b, k: jax.vjp(lambda q: loss(builder.merge(q), b, k)[0], p)[1],
        params, batch, key)
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(pullback))

  return residual_bytes(2) - residual_bytes(1)


def _abstract_batch(batch_size, image_shape):
  return {'image': jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32),
          'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


# ----------------------------------------------------------------------------- state


def abstract_mesh(shape) -> AbstractMesh:
  return AbstractMesh(tuple(shape), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def state_bytes(abstract) -> dict:
  """Per-device bytes of each part of the abstract train state."""
  parts = {name: sharding.bytes_per_device(abstract[name])
           for name in ('params', 'opt_state', 'ema_params')}
  parts['scalars'] = sharding.bytes_per_device([abstract['step'], abstract['nonfinite_step']])
  parts['total'] = sum(parts.values())
  return parts


def _key_name(entry):
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def gathered_block_elements(abstract_params, block_index: int = 0) -> int:
  """Elements one device holds of block `block_index` once its weights are all-gathered over
  'fsdp' (dims split over 'tensor' stay split). Works for stacked (scanned) blocks — leaves
  `blocks/...` with a leading layer axis, of which one slice is taken — and for unscanned ones
  (`blocks/<index>/...`)."""
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(abstract_params):
    names = [_key_name(p) for p in path]
    if len(names) < 2 or names[0] != 'blocks':
      continue
    stacked = not isinstance(names[1], int) and not str(names[1]).isdigit()
    if not stacked and int(names[1]) != block_index:
      continue
    shape = list(x.sharding.shard_shape(x.shape))
    fsdp = x.sharding.mesh.shape['fsdp']
    for i, axes in enumerate(x.sharding.spec):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      if 'fsdp' in axes:
        shape[i] *= fsdp
    total += math.prod(shape[1:] if stacked else shape)  # one layer of a stacked leaf
  return total


@dataclasses.dataclass
class MeshMemory:
  """Per-device bytes of one mesh: state parts and the fixed terms of the batch estimate."""
  mesh: tuple
  param_count: int
  state: dict
  gradients: int
  weight_casts: int
  gathered: int
  activation_per_sample: float
  activation_per_sample_remat: float

  @property
  def fixed(self) -> int:
    return self.state['total'] + self.gradients + self.weight_casts + self.gathered

  def max_batch(self, capacity: float, margin: float, remat: bool = False) -> int:
    per_sample = self.activation_per_sample_remat if remat else self.activation_per_sample
    free = capacity * (1.0 - margin) - self.fixed
    return max(0, math.floor(free / per_sample))


def mesh_memory(config, mesh_shape, image_shape=IMAGE_SHAPE) -> MeshMemory:
  abstract = train_state.builder(config, image_shape,
                                       abstract_mesh(mesh_shape)).abstract_state()
  parts = state_bytes(abstract)
  c = compute_bytes(config)
  param_itemsize = jnp.dtype(config.model.param_dtype).itemsize
  casts = parts['params'] * c // param_itemsize if c != param_itemsize else 0
  gathered = 0
  if mesh_shape[1] > 1:
    gathered = PREFETCH * gathered_block_elements(abstract['params']) * (c + F32)
  cfg = dit_config(config, image_shape)
  return MeshMemory(
      mesh=tuple(mesh_shape), param_count=sum(x.size for x in jax.tree.leaves(abstract['params'])),
      state=parts, gradients=parts['params'], weight_casts=casts,
      gathered=gathered,
      activation_per_sample=activation_bytes_per_sample(cfg, c, mesh_shape[2]),
      activation_per_sample_remat=activation_bytes_per_sample(cfg, c, mesh_shape[2], True))


# ----------------------------------------------------------------------------- XLA check


def xla_temp_bytes(config, batch_sizes, image_shape=IMAGE_SHAPE) -> list:
  """XLA's temp bytes of one compiled training step (loss, grad, AdamW, EMA) per batch size,
  on one local device (`train_step.jitted.lower(abstract).compile().memory_analysis()`)."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  builder = train_state.builder(config, image_shape, mesh)
  state = builder.abstract_state()
  # The jitted (donated) step the training loop runs.
  step = registry.get_task(config).make_train_step(builder).jitted
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  temps = []
  for batch_size in batch_sizes:
    batch = _abstract_batch(batch_size, image_shape)
    with jax.set_mesh(mesh):
      compiled = step.lower(state, batch, key).compile()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  return temps


def run_xla_check(variant, modes, batch_sizes) -> list:
  """XLA temp bytes per sample vs the formula; `modes` like 'float32', 'bfloat16+remat'
  ('+remat' is remat 'full'; '+POLICY' any of dit.REMAT_POLICIES, compared with the no-remat
  formula, its upper bound)."""
  rows = []
  for mode in modes:
    dtype, _, remat = mode.partition('+')
    remat = {'': 'none', 'remat': 'full'}.get(remat, remat)
    config = recipe(variant)
    config.model.dtype = dtype
    config.model.remat = remat
    start = time.perf_counter()
    temps = xla_temp_bytes(config, batch_sizes)
    traced = traced_residual_bytes_per_sample(config)
    cfg, c = dit_config(config), compute_bytes(config)
    slopes = [(temps[i + 1] - temps[i]) / (batch_sizes[i + 1] - batch_sizes[i])
              for i in range(len(temps) - 1)]
    rows.append(dict(
        variant=variant, mode=mode, batch_sizes=list(batch_sizes), temp_bytes=temps,
        xla_per_sample=slopes, formula_per_sample=activation_bytes_per_sample(
            cfg, c, remat=remat == 'full'),
        traced_per_sample=traced,
        korthikanti_per_sample=cfg.depth * korthikanti_block_bytes(cfg)
        + outside_activation_bytes(cfg, 2),
        seconds=time.perf_counter() - start))
  return rows


# ----------------------------------------------------------------------------- main


def parse_capacities(text: str) -> list:
  """'v5e=16,v4=32,95' → [('v5e', 16.0), ('v4', 32.0), ('95 GiB', 95.0)] (GiB)."""
  result = []
  for item in text.split(','):
    name, _, value = item.rpartition('=')
    result.append((name or f'{value} GiB', float(value)))
  return result


def parse_mesh(text: str) -> tuple:
  shape = tuple(int(v) for v in text.split(','))
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(f'mesh {text!r} must be three positive sizes data,fsdp,tensor')
  return shape


def _g(value_bytes):
  return f'{value_bytes / GIB:.3f}'


def _m(value_bytes):
  return f'{value_bytes / MIB:.1f}'


def print_report(report, meshes, capacities, margin):
  m = report['model']
  print(f"# Memory per device: DiT-{m['variant']} training ({m['config']})\n")
  print(f"{m['params'] / 1e6:.1f}M parameters ({m['param_dtype']}), compute {m['dtype']}; "
        f"{m['tokens']} tokens × width {m['width']}, {m['heads']} heads, {m['depth']} blocks, "
        f"MLP {m['mlp_dim']}; AdamW (mu, nu) + EMA.\n")
  print('## Train state per device (from the shardings of the abstract state)\n')
  print('| mesh (data,fsdp,tensor) | devices | params GiB | opt_state GiB | EMA GiB | '
        'total GiB | vs replicated |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  replicated = report['replicated_state_bytes']
  for mm in meshes:
    s = mm.state
    print(f"| {','.join(map(str, mm.mesh))} | {math.prod(mm.mesh)} | {_g(s['params'])} | "
          f"{_g(s['opt_state'])} | {_g(s['ema_params'])} | {_g(s['total'])} | "
          f"1/{replicated / s['total']:.1f} |")

  act = report['activations']
  print('\n## Activations saved for the backward pass (per sample; formula in the docstring)\n')
  print('A_block = s·h·(16 + (4 + r)·c/t) + 4·a·s²/t bytes; here s = '
        f"{m['tokens']}, h = {m['width']}, a = {m['heads']}, r = {m['mlp_dim'] / m['width']:g}, "
        f"c = {act['compute_bytes']}.\n")
  print('| quantity (t = 1) | MiB |')
  print('|---|---:|')
  print(f"| one block, A_block | {_m(act['block'])} |")
  print(f"| outside the blocks (patch embedding, final layer, loss) | {_m(act['outside'])} |")
  print(f"| **per sample, no remat** ({m['depth']} × A_block + outside) | "
        f"**{_m(act['per_sample'])}** |")
  print(f"| per sample, traced `jax.vjp` residuals (check of the formula) | "
        f"{_m(act['traced_per_sample'])} ({act['traced_per_sample'] / act['per_sample']:.4f}×) |")
  print(f"| per sample, remat every block (depth × 4·s·h + A_block + outside) | "
        f"{_m(act['per_sample_remat'])} |")
  print(f"| per sample, Korthikanti 16-bit, no dropout (fused-kernel lower reference) | "
        f"{_m(act['korthikanti_per_sample'])} |")

  print(f'\n## Largest per-device batch (samples per data×fsdp shard), margin {margin:.0%}\n')
  print('Fixed = state + gradients + compute-dtype weight copies + FSDP gathered working set '
        '(GiB). Cells: no remat / remat every block (`--config.model.remat=full`).\n')
  header = ('| mesh | state | grads | weight casts | gathered | fixed | act/sample MiB | '
            + ' | '.join(f'{name} {cap:g} GiB' for name, cap in capacities) + ' |')
  print(header)
  print('|---' * (7 + len(capacities)) + '|')
  for mm in meshes:
    cells = [f'{mm.max_batch(cap * GIB, margin)} / {mm.max_batch(cap * GIB, margin, True)}'
             for _, cap in capacities]
    print(f"| {','.join(map(str, mm.mesh))} | {_g(mm.state['total'])} | {_g(mm.gradients)} | "
          f"{_g(mm.weight_casts)} | {_g(mm.gathered)} | {_g(mm.fixed)} | "
          f"{_m(mm.activation_per_sample)} | " + ' | '.join(cells) + ' |')


def print_xla_check(rows):
  print('\n## XLA check: temp bytes of the compiled training step on this machine\'s XLA '
        f'({jax.devices()[0].platform}; CPU runs bf16 matmuls in f32 and fuses differently from '
        'TPU/GPU). Traced JAX: `jax.vjp` residuals per sample (with +remat: block inputs only; '
        'the formula adds one recomputed block).\n')
  print('| model | compute | batch sizes | XLA temp MiB | XLA MiB/sample (Δ) | formula MiB | '
        'traced JAX MiB | Korthikanti MiB | XLA (last Δ) / formula |')
  print('|---|---|---|---|---|---:|---:|---:|---:|')
  for r in rows:
    print(f"| DiT-{r['variant']} | {r['mode']} | {','.join(map(str, r['batch_sizes']))} | "
          f"{', '.join(_m(t) for t in r['temp_bytes'])} | "
          f"{', '.join(_m(s) for s in r['xla_per_sample'])} | {_m(r['formula_per_sample'])} | "
          f"{_m(r['traced_per_sample'])} | {_m(r['korthikanti_per_sample'])} | "
          f"{r['xla_per_sample'][-1] / r['formula_per_sample']:.2f} |")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='XL/2', help="DiT variant, e.g. 'XL/2', 'S/2'")
  parser.add_argument('--meshes', nargs='+', type=parse_mesh, default=None,
                      help='mesh shapes data,fsdp,tensor (default: '
                      + ' '.join(DEFAULT_MESHES) + ')')
  parser.add_argument('--capacities', default=DEFAULT_CAPACITIES,
                      help='device memory in GiB, NAME=GIB or GIB, comma-separated')
  parser.add_argument('--margin', type=float, default=0.10,
                      help='share of the capacity kept free for XLA workspace / fragmentation')
  parser.add_argument('--json', action='store_true', help='print JSON instead of tables')
  parser.add_argument('--xla_check', action='store_true',
                      help='compile training steps of --xla_variant (--xla_modes, --xla_batches) '
                      'and compare XLA temp bytes per sample with the formula (minutes)')
  parser.add_argument('--xla_variant', default='S/2')
  parser.add_argument('--xla_modes', default='float32,bfloat16,float32+remat',
                      help="compute dtypes to compile; +remat: config.model.remat='full', "
                      "+POLICY: that remat policy (e.g. +dots_with_no_batch_dims_saveable)")
  parser.add_argument('--xla_batches', default='2,4,8',
                      help='batch sizes; per-sample bytes are differences of neighbours (small '
                      'batches are dominated by the optimizer update, not by activations)')
  args = parser.parse_args(argv)

  config = recipe(args.variant)
  meshes_shapes = args.meshes or [parse_mesh(m) for m in DEFAULT_MESHES]
  capacities = parse_capacities(args.capacities)
  meshes = [mesh_memory(config, shape) for shape in meshes_shapes]
  # State is replicated over 'data': any (D, 1, 1) mesh holds what one device would.
  replicated = next((mm for mm in meshes if mm.mesh[1:] == (1, 1)), None)
  replicated = replicated or mesh_memory(config, (1, 1, 1))
  cfg, c = dit_config(config), compute_bytes(config)
  report = dict(
      model=dict(variant=args.variant, config='configs/imagenet256_latent.py',
                 params=replicated.param_count,
                 param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                 tokens=cfg.num_tokens, width=cfg.width, heads=cfg.num_heads, depth=cfg.depth,
                 mlp_dim=cfg.mlp_dim),
      replicated_state_bytes=replicated.state['total'],
      activations=dict(
          compute_bytes=c, block=block_activation_bytes(cfg, c),
          outside=outside_activation_bytes(cfg, c),
          per_sample=activation_bytes_per_sample(cfg, c),
          per_sample_remat=activation_bytes_per_sample(cfg, c, remat=True),
          traced_per_sample=traced_residual_bytes_per_sample(config),
          korthikanti_per_sample=cfg.depth * korthikanti_block_bytes(cfg)
          + outside_activation_bytes(cfg, 2)),
      margin=args.margin,
      meshes=[dict(mesh=list(mm.mesh), state=mm.state, gradients=mm.gradients,
                   weight_casts=mm.weight_casts, gathered=mm.gathered, fixed=mm.fixed,
                   activation_per_sample=mm.activation_per_sample,
                   activation_per_sample_remat=mm.activation_per_sample_remat,
                   max_batch={name: mm.max_batch(cap * GIB, args.margin)
                              for name, cap in capacities},
                   max_batch_remat={name: mm.max_batch(cap * GIB, args.margin, True)
                                    for name, cap in capacities})
              for mm in meshes])
  if args.xla_check:
    report['xla_check'] = run_xla_check(args.xla_variant, args.xla_modes.split(','),
                                        [int(b) for b in args.xla_batches.split(',')])
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print_report(report, meshes, capacities, args.margin)
    if args.xla_check:
      print_xla_check(report['xla_check'])
  return report


if __name__ == '__main__':
  host_allocator.skip_tpu_probe_without_tpu()  # libtpu installed, no TPU: use the CPU quietly
  main()
