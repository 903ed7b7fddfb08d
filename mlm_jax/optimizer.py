"""The optax chain: global-norm clipping, AdamW with a decay mask, schedule;
and the update that a non-finite step skips."""
import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then linear decay to 0 at `num_steps`.

  The update of step s (optax count s - 1) has rate lr * (s - 1) / warmup
  during the warmup, so step 1 has 0; warmup_steps=0 starts at the peak.
  """
  if config.warmup_steps <= 0:
    return optax.linear_schedule(config.learning_rate, 0.0,
                                 max(config.num_steps, 1))
  warmup = int(config.warmup_steps)
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


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm that can take the norm the caller has.

  `tx.update(grads, state, params, grad_norm=norm)` skips reading every
  gradient once more for the norm (train_step computes it anyway, for its
  non-finite check and metrics); without `grad_norm` it computes it. Same
  state (none) as optax's.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    if grad_norm is None:
      grad_norm = optax.global_norm(updates)
    # One scalar factor, so XLA fuses the product into Adam's moment updates
    # instead of writing the clipped gradients out (optax divides each one).
    scale = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def create(config) -> optax.GradientTransformationExtraArgs:
  """The chain of `config`; grad_clip_norm=0 leaves gradients unclipped.

  Without clipping the chain keeps its shape (optax.identity has the clip's
  empty state), so a checkpoint loads whatever the clip setting.
  """
  if config.grad_clip_norm < 0:
    raise ValueError(f'grad_clip_norm={config.grad_clip_norm} must be >= 0 '
                     '(0 = no clipping).')
  return optax.chain(
      (clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm
       else optax.identity()),
      optax.adamw(learning_rate_schedule(config), b1=config.adam_b1,
                  b2=config.adam_b2, eps=config.adam_eps,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )


def update_if(finite, tx, grads, params, opt_state, grad_norm):
  """(params, opt_state) after one update of `tx`, or unchanged if not finite.

  A lax.cond, not a where per leaf: selecting between new and old made XLA
  copy the old Adam moments every step (BENCHMARKS.md, speed work).
  `grad_norm` (of `grads`) goes to the clip, which then need not recompute it.
  """
  def update(grads_params_opt):
    grads, params, opt_state = grads_params_opt
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_norm=grad_norm)
    return optax.apply_updates(params, updates), opt_state

  return jax.lax.cond(finite, update, lambda args: args[1:],
                      (grads, params, opt_state))
