"""optimizer: our global-norm clip against optax's, and the chain's state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from mlm_jax import optimizer


def _grads(scale):
  keys = jax.random.split(jax.random.key(0), 3)
  return {'w': scale * jax.random.normal(keys[0], (64, 32)),
          'layer': {'bias': scale * jax.random.normal(keys[1], (32,)),
                    'scale': scale * jax.random.normal(keys[2], (32,))}}


@pytest.mark.parametrize('scale', [1e-3, 1.0, 1e3])  # below and above max
def test_clip_equals_optax_with_and_without_the_norm_given(scale):
  grads = _grads(scale)
  ours = optimizer.clip_by_global_norm(1.0)
  theirs = optax.clip_by_global_norm(1.0)
  want, _ = theirs.update(grads, theirs.init(grads))
  got, _ = ours.update(grads, ours.init(grads))
  given, _ = ours.update(grads, ours.init(grads),
                         grad_norm=optax.global_norm(grads))
  for a, b, c in zip(*map(jax.tree.leaves, (want, got, given))):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(c, b)
  clipped_norm = float(optax.global_norm(got))
  assert clipped_norm == pytest.approx(min(float(optax.global_norm(grads)),
                                           1.0), rel=1e-6)


def test_chain_state_is_optax_chains_and_grad_norm_reaches_the_clip():
  config = base.get_config()
  params = jax.tree.map(jnp.ones_like, _grads(1.0))
  grads = _grads(1e3)  # clipped
  tx = optimizer.create(config)
  reference = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(optimizer.learning_rate_schedule(config),
                  b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                  weight_decay=config.weight_decay,
                  mask=optimizer.decay_mask))
  # Same state structure: checkpoints written before the custom clip load.
  assert (jax.tree.structure(tx.init(params)) ==
          jax.tree.structure(reference.init(params)))
  # Two steps, so the schedule's learning rate is not 0.
  state, ref_state, given_state = (t.init(params) for t in (tx, reference, tx))
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = reference.update(grads, ref_state, params)
    given, given_state = tx.update(grads, given_state, params,
                                   grad_norm=optax.global_norm(grads))
  for a, b, c in zip(*map(jax.tree.leaves, (ref_updates, updates, given))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(c, b)
  # A norm passed in is used, not recomputed: Adam's first moment holds the
  # clipped gradient (10x smaller with a norm 10x too large), the second
  # moment its square.
  true_norm = optax.global_norm(grads)
  _, wrong = tx.update(grads, tx.init(params), params,
                       grad_norm=10 * true_norm)
  _, right = tx.update(grads, tx.init(params), params)
  for name, factor in (('mu', 10), ('nu', 100)):
    for a, b in zip(*(jax.tree.leaves(optax.tree_utils.tree_get(s, name))
                      for s in (wrong, right))):
      np.testing.assert_allclose(a, b / factor, rtol=1e-5, atol=1e-20)


def test_update_if_applies_a_finite_step_and_keeps_the_state_otherwise():
  config = base.get_config()
  params = jax.tree.map(jnp.ones_like, _grads(1.0))
  grads = _grads(1.0)
  tx = optimizer.create(config)
  opt_state = tx.init(params)
  norm = optax.global_norm(grads)
  updates, want_state = tx.update(grads, opt_state, params)
  want = optax.apply_updates(params, updates)
  got, got_state = jax.jit(optimizer.update_if, static_argnums=1)(
      jnp.bool_(True), tx, grads, params, opt_state, norm)
  for a, b in zip(jax.tree.leaves((want, want_state)),
                  jax.tree.leaves((got, got_state))):
    np.testing.assert_allclose(b, a, rtol=1e-6)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  kept, kept_state = jax.jit(optimizer.update_if, static_argnums=1)(
      jnp.bool_(False), tx, bad, params, opt_state, jnp.float32(jnp.nan))
  for a, b in zip(jax.tree.leaves((params, opt_state)),
                  jax.tree.leaves((kept, kept_state))):
    np.testing.assert_array_equal(b, a)


def test_grad_clip_norm_0_means_no_clipping():
  config = base.get_config()
  config.grad_clip_norm = 0.0
  params = jax.tree.map(jnp.ones_like, _grads(1.0))
  grads = _grads(1e3)  # a norm far above any clip
  tx = optimizer.create(config)
  unclipped = optax.adamw(optimizer.learning_rate_schedule(config),
                          b1=config.adam_b1, b2=config.adam_b2,
                          eps=config.adam_eps,
                          weight_decay=config.weight_decay,
                          mask=optimizer.decay_mask)
  state, ref_state = tx.init(params), unclipped.init(params)
  # Same state structure as with a clip: a checkpoint loads either way.
  assert (jax.tree.structure(state) ==
          jax.tree.structure(optimizer.create(base.get_config()).init(params)))
  for _ in range(2):  # the first update has learning rate 0
    updates, state = tx.update(grads, state, params,
                               grad_norm=optax.global_norm(grads))
    want, ref_state = unclipped.update(grads, ref_state, params)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(updates)):
    np.testing.assert_allclose(b, a, rtol=1e-6)
  mu = optax.tree_utils.tree_get(state, 'mu')
  np.testing.assert_allclose(mu['w'], 0.19 * grads['w'], rtol=1e-5)
  config.grad_clip_norm = -1.0
  with pytest.raises(ValueError, match=r'grad_clip_norm=-1.0 must be >= 0 '
                     r'\(0 = no clipping\)'):
    optimizer.create(config)


def test_warmup_steps_0_starts_at_the_peak_learning_rate():
  config = base.get_config()
  config.learning_rate, config.num_steps = 1.0, 10
  config.warmup_steps = 0
  rates = [float(optimizer.learning_rate_schedule(config)(i))
           for i in range(11)]
  np.testing.assert_allclose(rates, np.linspace(1.0, 0.0, 11), atol=1e-6)
  config.warmup_steps = 2  # the first update still has rate 0 with warmup
  rates = [float(optimizer.learning_rate_schedule(config)(i))
           for i in range(4)]
  np.testing.assert_allclose(rates, [0.0, 0.5, 1.0, 0.875], atol=1e-6)
