"""Ahead-of-time compilation of the real train step for TPU topologies this machine does not
have (`--mode=compile`): does a config fit, what does a step cost, what does it communicate.

With libtpu installed (`pip install -e '.[aot]'`; the default backend stays CPU),
`jax.experimental.topologies.get_topology_desc` gives the devices of a TPU topology and
`jit(...).lower(abstract arguments with their shardings).compile()` runs XLA:TPU here. What is
compiled is the loop's own jitted step (`StateBuilder.make_train_step(task.loss)`) on the
config's mesh laid over the topology's devices (a hybrid ICI × DCN mesh across slices), with a
global batch of `train.batch_size`: nothing is allocated, nothing runs. The compiler reports per
device the argument bytes (parameters, optimizer state, EMA, batch), output and temporary bytes,
the FLOPs of a step, and the collectives of its optimized HLO.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from guidedflow import atomic
from guidedflow import errors
from guidedflow import hlo_collectives
from guidedflow import latents
from guidedflow import sampler as sampler_lib
from guidedflow import sharding
from guidedflow import text_encoders
from guidedflow.models import precision
from guidedflow.tasks import registry
from guidedflow import train_state
from guidedflow import tree_compat

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int           # per chip
  peak_bf16_flops: float   # per chip, dense
  cores_per_chip: int      # how accelerator-type names count (v4-32 = 32 TensorCores)
  dims: int                # ICI topology dimensions


CHIPS = {
    'v4': Chip(32 * GiB, 275e12, 2, 3),
    'v5e': Chip(16 * GiB, 197e12, 1, 2),
    'v5p': Chip(95 * GiB, 459e12, 2, 3),
    'v6e': Chip(32 * GiB, 918e12, 1, 2),
}
_ALIASES = {'v5litepod': 'v5e', 'v6litepod': 'v6e'}


class DoesNotFitError(errors.UserError):
  """The compiled step needs more memory per device than the chip has."""


_FIT_ADVICE = ('Shard more (a larger fsdp axis in --config.mesh.shape), recompute activations '
               '(--config.model.remat=full), or lower the per-device batch '
               '(--config.train.batch_size).')


def _grid(chips, dims):
  """The ICI topology gcloud gives `chips` chips: 2D slices as 2^a × 2^b, 3D as 2×2×… cubes,
  the sizes ascending and any axis of 1 last (v5p-8 is 2x2x1, as libtpu expects)."""
  if chips < 1 or chips & (chips - 1):
    raise errors.ConfigError(f'{chips} chips is not a power of two; give the topology itself, '
                             'e.g. --config.compile.topology=v5p:4x4x2')
  shape = [1] * dims
  axis = 0
  while math.prod(shape) < chips:
    shape[axis] *= 2
    axis = (axis + 1) % dims
  shape = sorted(s for s in shape if s > 1) + [1] * shape.count(1)
  return 'x'.join(map(str, shape))


def parse_topology(name):
  """(generation, 'gen:AxBxC', number of chips) of an accelerator type ('v5p-64', 'v5e-32',
  'v5litepod-16', 'v4-32') or a raw topology ('v5p:4x4x2')."""
  raw = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+)*)', name or '')
  typed = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', name or '')
  generation = _ALIASES.get((raw or typed).group(1), (raw or typed).group(1)) if (
      raw or typed) else None
  if generation not in CHIPS:
    raise errors.ConfigError(
        f'config.compile.topology={name!r} is not a TPU accelerator type or topology: use e.g. '
        f'v5p-64, v5e-32, v4-32 or v5p:4x4x2 (generations: {", ".join(CHIPS)}).')
  chip = CHIPS[generation]
  if raw:
    return generation, f'{generation}:{raw.group(2)}', math.prod(map(int, raw.group(2).split('x')))
  cores = int(typed.group(2))
  if cores % chip.cores_per_chip:
    raise errors.ConfigError(f'config.compile.topology={name!r}: {generation} types count '
                             f'{chip.cores_per_chip} cores per chip.')
  chips = cores // chip.cores_per_chip
  return generation, f'{generation}:{_grid(chips, chip.dims)}', chips


def topology_devices(name, num_slices=1):
  """The devices of `num_slices` slices of topology `name` (needs libtpu; nothing runs)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  generation, topology, chips = parse_topology(name)
  # Compile-only: no TPU is opened, so several processes (parallel tests, two compiles) may
  # load libtpu at once; without this, the second stops at libtpu's multi-process lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # else libtpu logs a bogus error
  kwargs = {'num_slices': num_slices} if num_slices > 1 else {}
  dims = [int(d) for d in topology.partition(':')[2].split('x')] + [1, 1]
  if dims[0] < 2 or dims[1] < 2:  # smaller than libtpu's default host (2x2x1): one host
    kwargs['chips_per_host_bounds'] = tuple(dims[:3])
  if CHIPS[generation].cores_per_chip > 1:  # one device per chip, as a real v4 / v5p is
    kwargs['chip_config_name'] = 'megacore'
  try:
    devices = topologies.get_topology_desc(topology_name=topology, platform='tpu',
                                           **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except  # no libtpu, or it refuses the name
    fix = ("--mode=compile needs libtpu: pip install -e '.[aot]'."
           if importlib.util.find_spec('libtpu') is None else
           'libtpu refused it: give the slice as an accelerator type (e.g. v5p-8) or another '
           'topology (e.g. --config.compile.topology=v5p:2x2x1).')
    raise errors.ConfigError(
        f'cannot describe TPU topology {topology} ({errors.one_line(e)}). {fix}') from e
  return generation, topology, chips * num_slices, list(devices)


def _abstract_batch(task, config, image_shape, mesh_builder):
  batch = config.train.batch_size
  spec = task.abstract_batch(batch, tuple(image_shape))
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_builder.batch_sharding)
          for k, (shape, dtype) in spec.items()}


def _largest_arrays(abstract_state, count=3):
  """'path (MB per device)' of the largest per-device shards of the state."""
  sizes = sorted(((math.prod(leaf.sharding.shard_shape(leaf.shape)) *
                   np.dtype(leaf.dtype).itemsize, path.removesuffix('/value'))
                  for path, leaf in tree_compat.flat_by_path(abstract_state).items()),
                 reverse=True)
  return ', '.join(f'{name} {size / 2**20:.0f} MB' for size, name in sizes[:count])


def _analytic_flops(task, image_shape, config, num_devices):
  """3 × the model's analytic forward FLOPs per image × the global batch ÷ devices (None when
  the model has no count)."""
  model = nnx.eval_shape(task.model_constructor(tuple(image_shape)))
  flops = model.flops_per_example() if hasattr(model, 'flops_per_example') else None
  if flops is None:
    return None
  return 3.0 * flops * config.train.batch_size / num_devices


def _builder(task, config, image_shape, devices):
  """The task's StateBuilder on the config's mesh over `devices`, with nothing allocated."""
  mesh = train_state.make_mesh(config, devices)
  builder = train_state.StateBuilder(task.model_constructor(tuple(image_shape)), config, mesh)
  builder.rest = jax.tree.map(np.asarray, jax.eval_shape(lambda: builder._init_fn()[1]))  # pylint: disable=protected-access
  if jax.tree.leaves(builder.rest):
    raise errors.ConfigError('--mode=compile: this model has non-parameter state, which the '
                             'compile-only path cannot make without running it.')
  return builder


def _compile(what, lower, state, keep_hlo):
  """XLA's figures for the program `lower()` returns, compiled for its devices (TPU).

  Raises:
    DoesNotFitError: XLA:TPU refused it for want of HBM.
  """
  t0 = time.time()
  lowered = lower()
  t1 = time.time()
  # A TPU executable cannot be read back from the persistent cache without a TPU client: keep
  # these compiles out of it (jax warns on every lookup otherwise).
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses what cannot fit in HBM
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    raise DoesNotFitError(
        f'the {what} does not fit the target ({str(e).strip().splitlines()[0]}); largest '
        f'arrays per device: {_largest_arrays(state)}. {_FIT_ADVICE}') from None
  finally:
    jax.config.update('jax_enable_compilation_cache', cache)
  t2 = time.time()
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  records, trips_known = hlo_collectives.instances(hlo)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      'argument_bytes': int(memory.argument_size_in_bytes),
      'output_bytes': int(memory.output_size_in_bytes),
      'alias_bytes': int(memory.alias_size_in_bytes),
      'temp_bytes': int(memory.temp_size_in_bytes),
      # XLA's cost analysis counts a while loop's body once: with scanned DiT blocks this is
      # about one block's share, so the MFU uses the analytic count.
      'compiler_flops_per_device': float(cost.get('flops', 0.0)),
      # per run of the program: loop bodies × their trip counts
      'collectives': hlo_collectives.summarize(records),
      'loop_trip_counts_known': trips_known,
      'largest_collectives': hlo_collectives.largest(records),
      'lower_s': round(t1 - t0, 2), 'compile_s': round(t2 - t1, 2),
  } | ({'hlo': hlo} if keep_hlo else {})


def compile_train_step(task, config, image_shape, devices, *, keep_hlo=False, builder=None):
  """Lowers and compiles the loop's train step for `devices`; returns the compiler's figures
  (with `keep_hlo`, also the optimized HLO text as 'hlo')."""
  builder = builder or _builder(task, config, image_shape, devices)
  step = task.make_train_step(builder)
  state = builder.abstract_state()
  batch = _abstract_batch(task, config, image_shape, builder)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=builder.replicated)

  def lower():
    with jax.set_mesh(builder.mesh):
      return step.jitted.lower(state, batch, key)

  return {'mesh': dict(builder.mesh.shape), 'devices': len(devices),
          'analytic_flops_per_device': _analytic_flops(task, image_shape, config, len(devices)),
          'parameters': builder.param_count(state),
          **_compile('train step', lower, state, keep_hlo),
          'largest_arrays': _largest_arrays(state)}


def compile_sampler(task, config, image_shape, devices, *, builder=None):
  """Lowers and compiles the generator's CFG sampler (`Sampler.lower_cfg`: the `sampling.*`
  settings at `sampling.batch_size`, rounded up to the batch shards) for `devices`; None for a
  task without one. A latent generator's sampler decodes with an abstract SD-VAE (an
  `autoencoder.weights` config); a guidedflow autoencoder's sizes live in its run, so then the
  sampler is compiled without decoding ('decodes': False)."""
  if task.name != 'generate':
    return None
  builder = builder or _builder(task, config, image_shape, devices)
  state = builder.abstract_state()
  space = latents.CompileStandIn(config) if latents.is_latent(config) else None
  decodes = space is not None and space.has_decoder
  sampler = sampler_lib.Sampler(config, builder, sampler_lib.sampled_weights(state),
                                image_shape=image_shape, latent_space=space if decodes else None)
  shards = sharding.batch_axes_size(builder.mesh)
  batch = -(-int(config.sampling.batch_size) // shards) * shards
  condition = task.sample_condition(batch)
  figures = _compile('CFG sampler', lambda: sampler.lower_cfg(batch, condition), state, False)
  return {'batch_size': batch, 'num_steps': int(config.sampling.num_steps),
          'method': config.sampling.method, 'decodes': decodes, **figures}


def compile_text_encoder(task, config, devices, *, builder):
  """Lowers and compiles the frozen text encoder's forward pass (`text.batch_size` captions,
  rounded up to the batch shards) with its parameters sharded over the mesh by their logical
  axis names, as the generator's are: what a pod holds to encode captions itself beside the
  train state, not reading them from the text cache. None without a frozen encoder."""
  if task.name != 'generate' or config.text.encoder not in text_encoders.FROZEN:
    return None
  model, pool, length = text_encoders.abstract(config)
  graphdef, params = nnx.split(model)
  shardings = sharding.state_shardings(params, builder.mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, shardings)
  shards = sharding.batch_axes_size(builder.mesh)
  batch = -(-int(config.text.batch_size) // shards) * shards
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=builder.batch_sharding)
  encode = jax.jit(lambda p, ids, mask: pool(nnx.merge(graphdef, p), ids, mask),
                   in_shardings=(shardings, builder.batch_sharding, builder.batch_sharding))

  def lower():
    with jax.set_mesh(builder.mesh):
      return encode.lower(params, tokens, tokens)

  return {'encoder': config.text.encoder, 'weights': config.text.weights, 'batch_size': batch,
          'tokens': length, 'parameters': int(sum(math.prod(x.shape)
                                                  for x in jax.tree.leaves(params))),
          **_compile('text encoder', lower, params, False)}


def run(config, workdir):
  """--mode=compile: compiles the task's train step (and a generator's sampler) for
  `config.compile.topology`, logs the table and returns the report, also written to
  <workdir>/compile.json.

  The image shape is `compile.image_shape`, else the train split's; a latent generator reads no
  data and loads no autoencoder: with an SD-VAE (fixed architecture) its latent shape follows
  from `input.image_size`, a guidedflow autoencoder's must be given."""
  task = registry.get_task(config, workdir)
  shape = config.compile.image_shape
  if not shape and task.name == 'generate' and latents.is_latent(config):
    shape = _latent_shape(config)
  image_shape = tuple(shape) if shape else tuple(task.train_dataset().image_shape)
  task.prepare()
  result = report(task, config, image_shape)
  if jax.process_index() == 0:
    atomic.write_text(epath.Path(workdir) / 'compile.json', json.dumps(result, indent=2))
  return result


def _latent_shape(config):
  space = latents.CompileStandIn(config)
  size = config.input.image_size
  if not space.has_decoder or not size:
    raise errors.ConfigError(
        '--mode=compile of this latent generator needs its latent shape (no autoencoder is '
        'loaded and no data read): e.g. --config.compile.image_shape=8,8,4 for the latents of '
        'your autoencoder.')
  f = space.downsample_factor
  if size % f:
    raise errors.ConfigError(f'config.input.image_size={size} is not divisible by the SD-VAE\'s '
                             f'downsampling factor {f}.')
  return (size // f, size // f, space.latent_channels)


def report(task, config, image_shape):
  """`_report` with the models built for the TPU, not this host (`precision.building_for`:
  bf16 compute is kept where the host CPU would compute in f32)."""
  with precision.building_for('tpu'):
    return _report(task, config, image_shape)


def _report(task, config, image_shape):
  """The compile of `task`'s train step and (a generator's) CFG sampler: the table (logged)
  and the JSON-able report (the train step's figures at the top level, the sampler's under
  'sampler').

  Raises:
    DoesNotFitError: the step, or the sampler beside the resident train state (the periodic
      grids of a training), needs more per-device memory than the chip has; names the largest
      arrays and what to change.
  """
  options = config.compile
  name, slices = options.topology, int(options.num_slices or 1)
  if not name:
    raise errors.ConfigError('--mode=compile needs a target: --config.compile.topology=v5p-64 '
                             '(or v5e-32, v4-32, v5p:4x4x2).')
  generation, topology, chips, devices = topology_devices(name, slices)
  chip = CHIPS[generation]
  builder = _builder(task, config, image_shape, devices)
  figures = compile_train_step(task, config, image_shape, devices, builder=builder)
  per_device_hbm = chip.hbm_bytes * chips / len(devices)
  total = _total(figures)
  step_time = float(options.step_time_s or 1.0)
  peak = chip.peak_bf16_flops * chips / len(devices)
  report = dict(topology=name, ici_topology=topology, num_slices=slices, chips=chips,
                **figures, total_bytes=int(total), hbm_bytes_per_device=int(per_device_hbm),
                headroom=round(1 - total / per_device_hbm, 3), step_time_s=step_time,
                mfu_at_step_time=(None if figures['analytic_flops_per_device'] is None else round(
                    figures['analytic_flops_per_device'] / step_time / peak, 4)))
  _check_fits(report, 'the train step', total, figures)
  sampler = compile_sampler(task, config, image_shape, devices, builder=builder)
  if sampler is not None:
    # Its arguments (the EMA weights) are part of the train state, resident while a training
    # samples its periodic grids: that peak is the train state + the sampler's own buffers.
    sampler['total_bytes'] = int(_total(sampler))
    sampler['with_train_state_bytes'] = int(
        figures['argument_bytes'] + sampler['output_bytes'] + sampler['temp_bytes'])
    report['sampler'] = sampler
  encoder = compile_text_encoder(task, config, devices, builder=builder)
  if encoder is not None:
    # On the pod beside the train state: its parameters and one encoding call's buffers.
    encoder['total_bytes'] = int(_total(encoder))
    encoder['with_train_state_bytes'] = int(figures['argument_bytes'] + _total(encoder))
    report['text_encoder'] = encoder
  _log_table(report)
  if sampler is not None:
    _check_fits(report, 'the CFG sampler beside the train state',
                sampler['with_train_state_bytes'], sampler | {'argument_bytes': figures[
                    'argument_bytes'], 'largest_arrays': figures['largest_arrays']})
  return report


def _total(figures):
  return (figures['argument_bytes'] + figures['output_bytes'] - figures['alias_bytes']
          + figures['temp_bytes'])


def _check_fits(report, what, total, figures):
  hbm = report['hbm_bytes_per_device']
  if total > hbm:
    raise DoesNotFitError(
        f'config does not fit {report["topology"]}: {what} needs {total / GiB:.2f} GiB per '
        f'device (arguments {figures["argument_bytes"] / GiB:.2f}, temporaries '
        f'{figures["temp_bytes"] / GiB:.2f}) but a device has {hbm / GiB:.1f} GiB; largest '
        f'arrays per device: {figures["largest_arrays"]}. {_FIT_ADVICE}')


def _collectives_row(figures):
  return ', '.join(f'{op} ×{c["count"]} ({c["bytes"] / 2**20:.1f} MB)'
                   for op, c in sorted(figures['collectives'].items())) or 'none'


def _log_table(r):
  gib = lambda b: f'{b / GiB:.3f} GiB'  # pylint: disable=unnecessary-lambda-assignment
  rows = [('target', f'{r["topology"]} ({r["ici_topology"]} × {r["num_slices"]} slice(s), '
                     f'{r["devices"]} devices)'),
          ('mesh', r['mesh']), ('parameters', f'{r["parameters"] / 1e6:.2f}M'),
          ('arguments / device', gib(r['argument_bytes'])),
          ('outputs / device (donated)', f'{gib(r["output_bytes"])} ({gib(r["alias_bytes"])})'),
          ('temporaries / device', gib(r['temp_bytes'])),
          ('total / HBM per device', f'{gib(r["total_bytes"])} / {gib(r["hbm_bytes_per_device"])}'
                                     f' (headroom {r["headroom"]:.1%})'),
          ('FLOPs / step / device', f'{r["analytic_flops_per_device"] or float("nan"):.4g} '
                                    f'(analytic; XLA counts {r["compiler_flops_per_device"]:.4g})'),
          (f'MFU at {r["step_time_s"]} s/step', f'{(r["mfu_at_step_time"] or 0):.2%}'),
          ('collectives / step', _collectives_row(r)),
          ('lower / compile', f'{r["lower_s"]} s / {r["compile_s"]} s')]
  s = r.get('sampler')
  if s:
    rows += [('CFG sampler', f'{s["method"]}, {s["num_steps"]} steps, batch {s["batch_size"]}'
                             f'{", decoding to pixels" if s["decodes"] else ""}'),
             ('  args / temps / outputs', f'{gib(s["argument_bytes"])} / {gib(s["temp_bytes"])}'
                                          f' / {gib(s["output_bytes"])}'),
             ('  with the train state', f'{gib(s["with_train_state_bytes"])} / '
                                        f'{gib(r["hbm_bytes_per_device"])}'),
             ('  collectives / call', _collectives_row(s)),
             ('  lower / compile', f'{s["lower_s"]} s / {s["compile_s"]} s')]
  e = r.get('text_encoder')
  if e:
    rows += [(f'frozen {e["encoder"]} encoder', f'{e["weights"]}, {e["parameters"] / 1e9:.3g}B '
                                             f'parameters, batch {e["batch_size"]} × '
                                             f'{e["tokens"]} tokens'),
             ('  args / temps / outputs', f'{gib(e["argument_bytes"])} / {gib(e["temp_bytes"])}'
                                          f' / {gib(e["output_bytes"])}'),
             ('  with the train state', f'{gib(e["with_train_state_bytes"])} / '
                                        f'{gib(r["hbm_bytes_per_device"])}'),
             ('  collectives / call', _collectives_row(e)),
             ('  lower / compile', f'{e["lower_s"]} s / {e["compile_s"]} s')]
  logging.info('Ahead-of-time compile of the train step%s:\n%s',
               ' and the CFG sampler' if s else '', '\n'.join(f'  {k:28s} {v}' for k, v in rows))
