"""The one training loop: `train_and_evaluate(config, workdir)` runs any task.

The task (`guidedflow.tasks`) builds the model and gives the loss and its periodic and final
work; this loop owns the rest, once: restore-or-init in shards, the jitted donated step with
the non-finite guard and optional EMA, logging with ETA, TensorBoard, orbax checkpoints
(periodic, on preemption, refusal of a mismatched checkpoint) and teardown in a `finally`.
"""

import contextlib
import json
import os
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from guidedflow import atomic
from guidedflow import batches
from guidedflow import errors
from guidedflow import resume_config
from guidedflow import run_context
from guidedflow import time_budget
from guidedflow import train_state
from guidedflow import trained
from guidedflow.tasks import registry


def _check_finite(state, ckpt, workdir):
  bad = int(state['nonfinite_step'])
  if bad >= 0:
    last = ckpt.latest_step()
    kept = (f'The last good checkpoint (step {last}) is kept in {workdir}/checkpoints.'
            if last is not None else 'No checkpoint was saved before it.')
    raise errors.TrainingError(
        f'Non-finite loss or gradient at step {bad + 1} (update {bad}); training stopped. '
        f'{kept} Lower config.optim.learning_rate, enable config.optim.grad_clip_norm, or check '
        'the data.')


def _log_metrics(step, num_steps, pending, chrono, writer, batch_size, extra_keys):
  """Logs the means of the steps since the last log (all to TensorBoard, `extra_keys` beside
  loss, gradient norm and learning rate to the log line); returns them."""
  summary = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
  steps_per_s, eta = chrono.tick(step)
  extra = ''.join(f'  {k} {summary[k]:.4g}' for k in extra_keys)
  logging.info('step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e%s  %.2f steps/s  %.0f img/s  '
               'ETA %s', step, num_steps, summary['loss'], summary['grad_norm'],
               summary['learning_rate'], extra, steps_per_s, steps_per_s * batch_size,
               run_context.format_seconds(eta))
  writer.scalars(step, {f'train/{k}': v for k, v in summary.items()})
  writer.scalars(step, {'train/steps_per_s': steps_per_s,
                        'train/images_per_s': steps_per_s * batch_size})
  return summary


def _check_no_history(config, workdir):
  """Refuses to train from step 0 over a run it cannot continue: result.json of a finished run
  whose checkpoints are gone, or only damaged steps (moved to checkpoints_damaged/)."""
  path = epath.Path(workdir)
  damaged = path / 'checkpoints_damaged'
  history = []
  if (path / 'result.json').exists():
    history.append('the result.json of a run')
  if damaged.is_dir() and any(damaged.iterdir()):
    history.append(f'damaged checkpoints in {damaged}')
  if not history:
    return
  if config.train.restart:
    logging.warning('--config.train.restart=true: training %s again from step 0 (it holds %s).',
                    workdir, ' and '.join(history))
    return
  raise errors.ConfigError(
      f'--workdir {workdir} holds {" and ".join(history)} but no checkpoint to continue from: '
      'pass --config.train.restart=true to train it again from step 0 (its outputs are '
      'replaced), or use another --workdir.')


def _write_config(config, workdir):
  if jax.process_index() == 0:
    atomic.write_text(epath.Path(workdir) / 'config.json', config.to_json_best_effort(indent=2))


def _fix_num_steps(config, num_steps, builder):
  """Sets the run's step count (config and schedule); the train step must be made again."""
  with config.unlocked():
    config.train.num_steps = int(num_steps)
  builder.set_num_steps(int(num_steps))
  return int(num_steps)


def _resume_budget(config, ckpt, start_step, builder, t_start):
  """The `TimeBudget` that chooses this run's step count, or None: the count is given, or a
  restored checkpoint's config has the count an earlier part of this run chose."""
  if not time_budget.is_active(config):
    return None
  if start_step:
    saved = (ckpt.restore_config(start_step) or {}).get('train', {}).get('num_steps')
    if saved:
      logging.info('Time budget: the run chose %d steps before it was interrupted; resuming '
                   'with them.', saved)
      _fix_num_steps(config, saved, builder)
      return None
  return time_budget.TimeBudget(config, t_start, start_step)


def train_and_evaluate(config, workdir):
  """Trains the task of `config` in `workdir` (resuming from its newest checkpoint), then runs
  the task's final work.

  Returns:
    (final train state, the task's JSON-able result, also written to <workdir>/result.json).
  """
  t_start, workdir = time.time(), os.fspath(workdir)
  registry.prepare(config)  # no second check of a config guidedflow.main prepared
  task = registry.get_task(config, workdir)
  # Workdir files go through etils.epath: a local path or gs://BUCKET/... (Cloud TPU).
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  dataset = task.train_dataset()
  task.check_inputs()  # every other split the run reads: fail now, not after training
  task.prepare()
  builder = train_state.StateBuilder(task.model_constructor(dataset.image_shape), config,
                                     train_state.make_mesh(config))
  batch_size = config.train.batch_size
  with contextlib.ExitStack() as stack:  # closes everything, also when training fails
    ckpt = stack.enter_context(train_state.open_checkpointer(config, workdir))
    state, data_state = train_state.restore_or_init(builder, ckpt,
                                                    check_config=resume_config.check)
    start_step = int(state['step'])
    if not start_step:
      _check_no_history(config, workdir)
    budget = _resume_budget(config, ckpt, start_step, builder, t_start)
    _write_config(config, workdir)
    trained.write_run_info(workdir, task.name, dataset.image_shape)
    num_steps = config.train.num_steps or time_budget.PROVISIONAL_STEPS
    logging.info('Task %s: %.3fM parameters; data %s %s (%d examples); mesh %s.', task.name,
                 builder.param_count(state) / 1e6, config.input.dataset, dataset.image_shape,
                 dataset.num_examples, dict(builder.mesh.shape))
    iterator = stack.enter_context(batches.BatchIterator(
        dataset, global_batch_size=batch_size, seed=config.train.seed,
        sharding=builder.batch_sharding, start_step=start_step))
    if data_state is not None:
      iterator.set_state(data_state)
    writer = run_context.Writer(os.path.join(workdir, 'tensorboard'))
    stack.callback(writer.close)
    run = run_context.Run(config, workdir, builder, writer, tuple(dataset.image_shape), num_steps, task)
    train_step = task.make_train_step(builder)
    base_key = jax.random.PRNGKey(config.train.seed)
    chrono = run_context.Chrono(start_step, num_steps, batch_size)

    def save(step):
      _check_finite(state, ckpt, workdir)
      ckpt.save(step, state, data_state=iterator.get_state(), config=config.to_dict(),
                force=True)

    step, pending, last_summary = start_step, [], {}
    while step < num_steps:
      state, metrics = train_step(state, next(iterator), base_key)
      step += 1
      if step == start_step + 1:
        chrono.first_step(state)
      pending.append(metrics)
      if budget is not None and (chosen := budget.observe(step, state, chrono.compile_s)) is not None:
        num_steps = run.num_steps = chrono.num_steps = _fix_num_steps(config, chosen, builder)
        train_step, budget = task.make_train_step(builder), None
        _write_config(config, workdir)
      if run_context.itstime(step, config.train.log_every_steps, num_steps):
        _check_finite(state, ckpt, workdir)
        last_summary = _log_metrics(step, num_steps, pending, chrono, writer, batch_size,
                                    task.log_keys)
        pending = []
      with chrono.paused():
        writer.scalars(step, task.periodic(run, state, step))
      if ckpt.should_stop(step):
        logging.warning('Stop requested (%s): saving step %d and exiting.',
                        ckpt.stop_signal or 'preemption', step)
        save(step)
        ckpt.wait_until_finished()
        logging.warning('Saved step %d; rerun the same command to resume from it.', step)
        return state, {'task': task.name, 'step': step, 'preempted': True,
                       'stop_signal': ckpt.stop_signal, 'exit_status': ckpt.exit_status}
      if run_context.itstime(step, config.checkpoint.every_steps, num_steps, last=False):
        with chrono.paused():
          save(step)
    if step > start_step:
      save(step)
    with chrono.paused():
      result = task.final(run, state)
    return state, _finish(task, run, step, result, last_summary, chrono, t_start, ckpt.warnings)


def _finish(task, run, step, result, last_summary, chrono, t_start, warnings=()):
  """The run's result (the task's, with the loop's step, losses and times): logged, and
  written to <workdir>/result.json."""
  result = {'task': task.name, 'step': step, 'num_steps': run.num_steps,
            'image_shape': list(run.image_shape), **result,
            **{f'train_{k}': round(v, 5) for k, v in last_summary.items()
               if k in ('loss', 'accuracy')},
            'setup_s': round(chrono.t_start - t_start, 2), **chrono.summary(step),
            'seconds': round(time.time() - t_start, 2)}
  if warnings:
    result['warnings'] = list(warnings)
  if jax.process_index() == 0:
    atomic.write_text(epath.Path(run.workdir) / 'result.json', json.dumps(result, indent=2))
  logging.info('Done: %s', json.dumps(result))
  return result
