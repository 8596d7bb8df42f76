"""The loop's own mechanics, pinned with values computed independently of the code: the
learning-rate schedule, gradient clipping, EMA, the held-out mean, the periodic helper."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from guidedflow import input_pipeline
from guidedflow import sharding
from guidedflow import train_state
from guidedflow import run_context


def _optim(**overrides):
  optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=10, schedule='cosine', final_lr_factor=0.05,
      weight_decay=0.0, b1=0.9, b2=0.999, grad_clip_norm=0.0, ema_decay=0.0, ema_warmup=False))
  optim.update(overrides)
  return optim


def test_learning_rate_warmup_peak_and_cosine_end():
  peak, warmup, total = 1e-2, 10, 110
  schedule = train_state.learning_rate_schedule(_optim(), total)
  assert float(schedule(0)) == pytest.approx(peak / warmup, rel=1e-6)  # the first step learns
  assert float(schedule(warmup - 1)) == pytest.approx(peak, rel=1e-6)  # warm-up reaches the peak
  assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
  # Half-way through the cosine: peak · (f + (1 − f) · (1 + cos(π/2)) / 2).
  assert float(schedule(warmup + 50)) == pytest.approx(peak * (0.05 + 0.95 * 0.5), rel=1e-5)
  assert float(schedule(total)) == pytest.approx(peak * 0.05, rel=1e-5)  # peak × final factor
  constant = train_state.learning_rate_schedule(_optim(schedule='constant'), total)
  assert float(constant(total)) == pytest.approx(peak, rel=1e-6)
  no_warmup = train_state.learning_rate_schedule(_optim(warmup_steps=0), total)
  assert float(no_warmup(0)) == pytest.approx(peak, rel=1e-6)


def _adam(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Adam with bias correction, by hand: the updates of a sequence of gradients."""
  m = v = np.zeros_like(grads[0])
  updates = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    updates.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return updates


def test_gradient_clipping_bounds_the_gradient_adam_sees():
  """With grad_clip_norm = c, Adam runs on g · min(1, c / ‖g‖): a gradient 1000× larger than
  the previous one moves the parameters as a gradient of norm c would."""
  clip, lr = 1.0, 1e-2
  grads = [np.array([0.3, -0.4], np.float64), np.array([3000.0, 4000.0], np.float64)]
  clipped = [g * min(1.0, clip / np.linalg.norm(g)) for g in grads]
  tx = train_state.make_optimizer(_optim(grad_clip_norm=clip, schedule='constant',
                                         warmup_steps=0, learning_rate=lr), 100)
  params = jnp.zeros(2, jnp.float32)
  state = tx.init(params)
  got = []
  for g in grads:
    update, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    got.append(np.asarray(update))
  for a, b in zip(got, _adam(clipped, lr)):
    np.testing.assert_allclose(a, b, rtol=1e-4)
  assert not np.allclose(got[1], _adam(grads, lr)[1], rtol=1e-2)  # unclipped differs


class _Scale(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (3,)))


def _loss(model, batch, key):
  del key  # Unused.
  return jnp.mean((batch['image'][:, :3] * model.w[...] - 1.0) ** 2), {}


def _builder(**optim):
  config = ml_collections.ConfigDict({
      'optim': _optim(schedule='constant', warmup_steps=0, learning_rate=0.1, **optim),
      'train': {'num_steps': 100}, 'mesh': {'min_shard_size': 0}})
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return train_state.StateBuilder(lambda: _Scale(nnx.Rngs(0)), config, mesh)


@pytest.mark.parametrize('warmup', [True, False])
def test_ema_follows_warmup_formula_and_its_cap(warmup):
  """ema_{t+1} = d_t · ema_t + (1 − d_t) · p_{t+1}, d_t = min(0.2, (1 + t) / (10 + t)) with
  warm-up (0.1, 0.18, then the cap 0.2 from t = 2), d_t = 0.2 without."""
  builder = _builder(ema_decay=0.2, ema_warmup=warmup)
  step = builder.make_train_step(_loss)
  state = builder.init_state()
  ema = np.asarray(state['ema_params']['w'][...])
  batch = {'image': jnp.ones((4, 5)), 'label': jnp.zeros((4,), jnp.int32)}
  for t in range(5):
    state, _ = step(state, batch, jax.random.PRNGKey(0))
    decay = min(0.2, (1 + t) / (10 + t)) if warmup else 0.2
    ema = decay * ema + (1 - decay) * np.asarray(state['params']['w'][...])
    np.testing.assert_allclose(np.asarray(state['ema_params']['w'][...]), ema, rtol=1e-6)
  assert [round(min(0.2, (1 + t) / (10 + t)), 3) for t in range(3)] == [0.1, 0.182, 0.2]


def test_no_ema_when_decay_is_zero():
  state = _builder(ema_decay=0.0).init_state()
  assert set(state) == {'step', 'params', 'opt_state', 'nonfinite_step'}


def test_heldout_is_the_mean_over_real_rows_of_a_padded_split():
  """11 examples in batches of 4: the last batch has 3 real rows and one padding copy. The
  metric of each example is its label, so the held-out mean is mean(0..10) = 5. (Averaging the
  padding in gives 4.39; dividing by all 12 rows gives 5.33.)"""
  builder = _builder()

  def metrics(model, batch, key):
    del model, key  # Unused: the loss is the label.
    value = batch['label'].astype(jnp.float32)
    mask = batch['mask']
    return {'loss': jnp.sum(value * mask) / jnp.sum(mask)}

  images = np.zeros((11, 4, 4, 1), np.uint8)
  dataset = input_pipeline.ArrayDataset(images, np.arange(11), num_classes=11)
  result = run_context.heldout_metrics(builder.make_eval_step(metrics), builder.init_state()['params'],
                                 dataset, batch_size=4, num_batches=0,
                                 batch_sharding=builder.batch_sharding, seed=0)
  assert result['loss'] == pytest.approx(5.0, abs=1e-6)
  first_two = run_context.heldout_metrics(builder.make_eval_step(metrics),
                                    builder.init_state()['params'], dataset, batch_size=4,
                                    num_batches=2, batch_sharding=builder.batch_sharding, seed=0)
  assert first_two['loss'] == pytest.approx(3.5, abs=1e-6)  # mean(0..7)


def test_itstime():
  due = [s for s in range(1, 11) if run_context.itstime(s, 4, 10)]
  assert due == [4, 8, 10]
  assert [s for s in range(1, 11) if run_context.itstime(s, 4, 10, last=False)] == [4, 8]
  assert [s for s in range(1, 11) if run_context.itstime(s, 0, 10)] == [10]
  assert not any(run_context.itstime(s, 0, 10, last=False) for s in range(1, 11))


def test_format_seconds():
  assert run_context.format_seconds(3725.9) == '1:02:05'
  assert run_context.format_seconds(math.nan) == '?'


def test_a_train_step_whose_xla_options_are_refused_compiles_with_the_defaults():
  """Options XLA refuses (here one it does not know, as a jaxlib without a flag would) cost
  nothing: the first call compiles the step with XLA's defaults and the run goes on, bit for
  bit the plain step's; options XLA accepts are kept."""
  builder = _builder(ema_decay=0.2)
  batch = {'image': jnp.ones((4, 5)), 'label': jnp.zeros((4,), jnp.int32)}
  plain = builder.make_train_step(_loss)
  refused = builder.make_train_step(_loss, {'xla_guidedflow_no_such_option': True})
  kept = builder.make_train_step(_loss, {'xla_cpu_prefer_vector_width': 256})
  first_refused, first_kept = refused.jitted, kept.jitted
  states = [builder.init_state() for _ in range(3)]
  for _ in range(3):
    states = [step(s, batch, jax.random.PRNGKey(0))[0]
              for step, s in zip((plain, refused, kept), states)]
  assert refused.jitted is not first_refused and kept.jitted is first_kept
  for state in states[1:]:
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
