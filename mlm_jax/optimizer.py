"""The optax chain: global-norm clipping, AdamW with a decay mask, schedule."""
import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then linear decay to 0 at `num_steps`."""
  warmup = max(int(config.warmup_steps), 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup),
       optax.linear_schedule(config.learning_rate, 0.0,
                             max(config.num_steps - warmup, 1))],
      boundaries=[warmup])


def decay_mask(params):
  """Weight decay on weight matrices and embeddings only.

  Decided by name, not by rank: with `model.scan_layers` the stacked biases
  and LayerNorm scales of all layers are 2-D, and still get no decay.
  """
  def decays(path, _):
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    return not any(n in ('bias', 'scale') for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def create(config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1,
                  b2=config.adam_b2, eps=config.adam_eps,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
