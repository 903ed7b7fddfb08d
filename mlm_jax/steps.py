"""The pure train and eval steps of MLM pretraining, and their metrics.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch,
key) -> metrics` are top-level pure functions: static things (the graphdef,
the optimizer, the masker) are bound with functools.partial by `build`, which
jits them. Metrics travel as (sum, weight) pairs, divided only when reported.

Must not: read data, build shardings, jit anything, or log (they run traced).
"""
import functools
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from mlm_jax import masking
from mlm_jax import optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar
  params: Any          # nnx.State of the model's Params
  opt_state: Any
  rng: jax.Array       # raw key data (uint32), so Orbax can save it


def _summed(values, weights):
  """A metric as (sum, weight), divided only when reported."""
  return jnp.stack([jnp.sum(values * weights), jnp.sum(weights)])


def mlm_metrics(logits_BxKxV, masked: masking.Masked, loss_BxK,
                baseline_id=None):
  """Loss and accuracy, overall and by what the input showed at the target."""
  weights_BxK = masked.weights_BxK
  correct_BxK = (jnp.argmax(logits_BxKxV, -1) == masked.targets_BxK)
  correct_BxK = correct_BxK.astype(jnp.float32)
  at = lambda kind: weights_BxK * (masked.kinds_BxK == kind)
  metrics = {
      'loss': _summed(loss_BxK, weights_BxK),
      'accuracy': _summed(correct_BxK, weights_BxK),
      'mask_accuracy': _summed(correct_BxK, at(masking.REPLACED_MASK)),
      'random_accuracy': _summed(correct_BxK, at(masking.REPLACED_RANDOM)),
      'kept_accuracy': _summed(correct_BxK, at(masking.KEPT)),
  }
  if baseline_id is not None:
    hit_BxK = (masked.targets_BxK == baseline_id).astype(jnp.float32)
    metrics['baseline_accuracy'] = _summed(hit_BxK, at(masking.REPLACED_MASK))
  return metrics


def mask_telemetry(masked: masking.Masked, special_ids) -> dict:
  """What the masking did: realized rate, replacement split, span length."""
  w_BxK = masked.weights_BxK
  predictions = jnp.sum(w_BxK)
  special_hits = jnp.sum(w_BxK * jnp.isin(masked.targets_BxK,
                                          jnp.asarray(special_ids)))
  frac = lambda kind: jnp.stack(
      [jnp.sum(w_BxK * (masked.kinds_BxK == kind)), predictions])
  return {
      'mask_rate': jnp.stack([predictions,
                              jnp.sum(masked.maskable_B).astype(jnp.float32)]),
      'frac_mask': frac(masking.REPLACED_MASK),
      'frac_random': frac(masking.REPLACED_RANDOM),
      'frac_kept': frac(masking.KEPT),
      # Special tokens chosen per step: must be 0.
      'special_masked': jnp.stack([special_hits, 1.0]),
      'mean_span_length': jnp.stack(
          [predictions, jnp.sum(masked.units_B).astype(jnp.float32)]),
  }


def _forward(params, graphdef, masked, segment_ids_BxL, dropout_key):
  model_ = nnx.merge(graphdef, params)
  if dropout_key is None:
    logits_BxKxV = model_(masked.inputs_BxL, segment_ids_BxL,
                          masked.positions_BxK, deterministic=True)
  else:
    logits_BxKxV = model_(masked.inputs_BxL, segment_ids_BxL,
                          masked.positions_BxK, deterministic=False,
                          rngs=nnx.Rngs(dropout=dropout_key))
  loss_BxK = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxKxV, masked.targets_BxK)
  return logits_BxKxV, loss_BxK


def _split_micro(x, n: int):
  """[B, ...] -> [n, B/n, ...]; micro-batch a holds rows a, n + a, 2n + a, ...

  Strided, so each device's contiguous block of rows splits evenly into the
  micro-batches and no row moves between devices.
  """
  return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def train_step(state: TrainState, batch, *, graphdef, tx,
               masker: masking.Masker, rate_fn, grad_accum_steps: int = 1,
               axis_name=None):
  """One optimizer update on a global batch; returns (state, metrics).

  Row b of the batch is example `step * B + b` of the data stream; its mask
  is drawn from that id, so masks do not depend on the device layout or on
  accumulation. The loss is sum(loss * weight) / total weight of the whole
  batch; with `grad_accum_steps` = n > 1 the batch is masked whole, split
  into n micro-batches, and their gradients (each already divided by the
  total weight) are summed in a lax.scan: the result is the full batch's
  gradient, and only one micro-batch's activations are alive at a time.

  `axis_name` (under pmap) makes `batch` this device's rows: gradients and
  (sum, weight) metrics are psummed over that axis, which is exact where a
  pmean of per-device means would not be.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  mask_key, dropout_key = jax.random.split(key)
  local_size = batch['input_ids'].shape[0]
  if axis_name is None:
    reduce = lambda tree: tree
    batch_size, first_row = local_size, 0
  else:
    reduce = functools.partial(jax.lax.psum, axis_name=axis_name)
    batch_size = local_size * jax.lax.axis_size(axis_name)
    first_row = jax.lax.axis_index(axis_name) * local_size
    dropout_key = jax.random.fold_in(dropout_key,
                                     jax.lax.axis_index(axis_name))
  example_ids_B = state.step * batch_size + first_row + jnp.arange(local_size)
  masked = masker(mask_key, batch['input_ids'], example_ids_B,
                  rate_fn(state.step))
  total_weight = jnp.maximum(reduce(masked.weights_BxK.sum()), 1.0)

  def micro_step(params, micro_masked, segment_ids_BxL, micro_key):
    """(loss share, gradient share, metrics) of some rows of the batch."""
    def loss_fn(params):
      logits_BxKxV, loss_BxK = _forward(params, graphdef, micro_masked,
                                        segment_ids_BxL, micro_key)
      loss = jnp.sum(loss_BxK * micro_masked.weights_BxK) / total_weight
      return loss, (logits_BxKxV, loss_BxK)

    (loss, (logits_BxKxV, loss_BxK)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, grads, mlm_metrics(logits_BxKxV, micro_masked, loss_BxK)

  if grad_accum_steps == 1:
    loss, grads, metrics = micro_step(state.params, masked,
                                      batch['segment_ids'], dropout_key)
  else:
    micro = jax.tree.map(functools.partial(_split_micro, n=grad_accum_steps),
                         (masked, batch['segment_ids']))

    def body(carry, xs):
      (micro_masked, segment_ids_BxL), i = xs
      out = micro_step(state.params, micro_masked, segment_ids_BxL,
                       jax.random.fold_in(dropout_key, i))
      return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(micro_step, state.params, *first, dropout_key))
    (loss, grads, metrics), _ = jax.lax.scan(
        body, zeros, (micro, jnp.arange(grad_accum_steps)))
  loss, grads, metrics = reduce((loss, grads, metrics))
  grad_norm = optax.global_norm(grads)
  # A step with a non-finite loss or gradient changes nothing but the step
  # count: the state stays finite, and the loop skips or stops per config.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state = optimizer.update_if(finite, tx, grads, state.params,
                                          state.opt_state, grad_norm)
  telemetry = reduce(mask_telemetry(masked, masker.special_ids))
  # Special tokens chosen per step (a count, not a per-device mean).
  telemetry['special_masked'] = telemetry['special_masked'].at[1].set(1.0)
  metrics.update(telemetry)
  metrics['grad_norm'] = jnp.stack([grad_norm, 1.0])
  # Leave a bad step out of the averages (NaN * 0 is NaN, hence where).
  metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), metrics)
  metrics['nonfinite'] = jnp.stack([1.0 - finite, 1.0])
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, key, *, graphdef, masker: masking.Masker, rate,
              baseline_id):
  """Metrics on one eval batch with a fixed masking key (no dropout)."""
  masked = masker(key, batch['input_ids'], None, rate)
  logits_BxKxV, loss_BxK = _forward(params, graphdef, masked,
                                    batch['segment_ids'], None)
  return mlm_metrics(logits_BxKxV, masked, loss_BxK, baseline_id)
