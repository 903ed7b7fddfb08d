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
  """Weight decay on matrices only: never on LayerNorm parameters or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create(config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1,
                  b2=config.adam_b2, eps=config.adam_eps,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
