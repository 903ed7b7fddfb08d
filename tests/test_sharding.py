"""Meshes, pmap and gradient accumulation agree with one device.

All on the 8 fake CPU devices of conftest.py, with a tiny model and rows of
different lengths (so rows carry different numbers of predictions and a mean
of per-device or per-micro-batch means would be wrong).
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from configs import base
from mlm_jax import build
from mlm_jax import masking
from mlm_jax import model_config
from mlm_jax import optimizer
from mlm_jax import sharding

V = 64
# float32 sums in another order (sharded reductions, psum, micro-batches):
# losses agree to 1e-5 relative. Parameters and Adam moments after 3 steps
# agree to STATE_RTOL relative per array (the norm of the difference over the
# array's norm; measured: at most 1.5e-6 over these meshes, pmap and
# accumulation). Element by element Adam amplifies the reordering (a few
# elements of 1e-3 relative) since it divides each gradient by its own size.
LOSS_RTOL = 1e-5
STATE_RTOL = 1e-5
# The attention key bias gets a gradient of exactly 0 (softmax ignores a
# score added to every key of a query), so its updates and moments are float
# noise (moments of 1e-13, moves of 1e-8): compared absolutely.
NOISE_ATOL = 1e-6
def _config(batch_size=8, **mesh):
  c = base.get_config()
  # No warmup: the first step has the full learning rate, so each of the 3
  # compared steps moves the parameters and the moments.
  c.num_steps, c.warmup_steps, c.learning_rate = 100, 0, 1e-2
  c.seq_len, c.batch_size = 16, batch_size
  c.model.update(size='tiny', num_layers=1, hidden_dim=32, num_heads=4,
                 mlp_dim=64, max_len=16, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  c.mesh.update(mesh)
  return c


_MASKER = masking.Masker(special_ids=(0, 1, 2, 3, 4), mask_id=4, vocab_size=V,
                         max_predictions=6)


def _batches(n, batch_size, seed=0):
  """Rows of random ids, each padded (id 0, segment 0) after its length."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(5, V, (batch_size, 16)).astype(np.int32)
    ids[:, 0] = 2
    lengths = rng.integers(4, 17, batch_size)
    real = np.arange(16)[None] < lengths[:, None]
    out.append({'input_ids': np.where(real, ids, 0).astype(np.int32),
                'segment_ids': real.astype(np.int32)})
  return out


def _train(c, batches, devices=None, tx=None):
  """(losses, final params as numpy) of a few steps through the real wrapper."""
  mesh = sharding.make_mesh(c, devices)
  mcfg = model_config.from_config(c, V)
  sharding.check_model(mcfg, mesh)
  tx = tx or optimizer.create(c)
  graphdef, state, state_sharding = build.init_state(mcfg, c.seed, tx, mesh)
  step, to_device = build.make_train_step(
      mesh, state_sharding, parallelism=c.parallelism,
      grad_accum_steps=c.grad_accum_steps, graphdef=graphdef, tx=tx,
      masker=_MASKER, rate_fn=lambda _: 0.3)
  losses, grad_norms = [], []
  for b in batches:
    state, m = step(state, to_device(b))
    losses.append(float(m['loss'][0] / m['loss'][1]))
    grad_norms.append(float(m['grad_norm'][0]))
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  return losses, grad_norms, params, state


@functools.cache
def _reference():
  return _train(_config(data=-1), _batches(3, 8), devices=jax.devices()[:1])


def _assert_same(got, want):
  """Losses, gradient norms, parameters and optimizer state agree."""
  np.testing.assert_allclose(got[0], want[0], rtol=LOSS_RTOL)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4)
  flat = lambda state: jax.tree_util.tree_flatten_with_path(
      (state.params, state.opt_state))[0]
  pairs = list(zip(flat(got[3]), flat(want[3])))
  assert len(pairs) == len(flat(want[3])) == len(flat(got[3]))
  for (path, a), (_, b) in pairs:
    name = jax.tree_util.keystr(path)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if "['key']['bias']" in name:
      np.testing.assert_allclose(a, b, rtol=0, atol=NOISE_ATOL, err_msg=name)
      continue
    assert np.linalg.norm(a - b) <= STATE_RTOL * np.linalg.norm(b), (
        name, np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize('mesh', [
    dict(data=8), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2),
    dict(data=-1, tensor=4)])
def test_meshes_match_one_device(mesh):
  assert jax.device_count() == 8
  got = _train(_config(**mesh), _batches(3, 8))
  _assert_same(got, _reference())


def test_fsdp_shards_params_and_optimizer_state():
  c = _config(data=1, fsdp=8)
  _, state, _ = build.init_state(model_config.from_config(c, V), c.seed,
                                 optimizer.create(c), sharding.make_mesh(c))
  kernel = state.params['encoder']['blocks'][0]['mlp_in']['kernel'][...]
  assert kernel.sharding.spec == P('fsdp', 'tensor')
  assert kernel.addressable_shards[0].data.shape == (4, 64)
  adam = state.opt_state[1][0]
  mu = adam.mu['encoder']['blocks'][0]['mlp_in']['kernel'][...]
  assert mu.sharding.spec == P('fsdp', 'tensor')
  assert mu.addressable_shards[0].data.shape == (4, 64)


def test_pmap_matches_one_device():
  c = _config(data=-1)
  c.parallelism = 'pmap'
  _assert_same(_train(c, _batches(3, 8)), _reference())


def test_four_micro_batches_equal_one_step_on_the_4x_batch():
  # SGD with lr 1: the update is the gradient itself (Adam's normalisation
  # would hide a wrong scale but for its moments, compared below). Micro-
  # batches of 8 rows on 8 devices.
  batches = _batches(3, 32, seed=1)
  for tx in (optax.sgd(1.0), None):  # None: the config's AdamW
    whole = _train(_config(32, data=-1), batches, jax.devices()[:1], tx=tx)
    c = _config(32, data=-1)
    c.grad_accum_steps = 4
    _assert_same(_train(c, batches, tx=tx), whole)
    c.parallelism = 'pmap'
    _assert_same(_train(c, batches, tx=tx), whole)


def test_a_mean_of_micro_batch_means_would_differ():
  """The rows carry unequal predictions: the exactness check can fail."""
  ids = _batches(1, 32, seed=1)[0]
  masked = _MASKER(jax.random.key(0), ids['input_ids'], None, 0.3)
  w = np.asarray(masked.weights_BxK).sum(1)
  per_micro = w.reshape(8, 4).T.sum(1)
  assert len(set(per_micro.tolist())) > 1, per_micro


@pytest.mark.parametrize('mesh, batch, message', [
    (dict(data=3), 8, r'mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but '
     r'there are 8'),
    (dict(data=-1, fsdp=3), 8, r'fixed axes \(3 devices\) do not divide the 8'),
    (dict(data=2, fsdp=2, tensor=2), 10, r'batch_size=10 must be divisible '
     r'by the 4 data-parallel devices \(mesh data=2 x fsdp=2\)'),
])
def test_mesh_and_batch_errors_give_the_numbers(mesh, batch, message):
  with pytest.raises(ValueError, match=message):
    sharding.check_batch_size(batch, sharding.make_mesh(_config(**mesh)))


def test_heads_and_accumulation_errors_give_the_numbers():
  mesh = sharding.make_mesh(_config(data=1, tensor=8))
  with pytest.raises(ValueError, match='num_heads=4 is not divisible by mesh '
                     'tensor=8'):
    sharding.check_model(model_config.from_config(_config(), V), mesh)
  with pytest.raises(ValueError, match='grad_accum_steps=4 micro-batches '
                     r'each divisible by the 8 .* multiple of 32'):
    sharding.check_batch_size(16, sharding.make_mesh(_config()), 4)


def _grad_norms_over_keys(rate, keys=32, **overrides):
  """One step's gradient norm from the same params and batch, per RNG key.

  Each key changes the masks and the dropout draws; the masks are the same
  for every variant (they depend on the key and the example ids only).
  Weights at std 0.5 (not 0.02) make the gradient norm sensitive to the
  dropout rate, so the statistic can tell laws apart.
  """
  c = _config(32, data=-1)
  c.model.update(dropout_rate=rate, attention_dropout_rate=rate,
                 initializer_range=0.5)
  c.update(overrides)
  one = c.grad_accum_steps == 1 and c.parallelism == 'pjit'
  mesh = sharding.make_mesh(c, jax.devices()[:1] if one else None)
  mcfg = model_config.from_config(c, V)
  tx = optimizer.create(c)
  graphdef, state, state_sharding = build.init_state(mcfg, c.seed, tx, mesh)
  step, to_device = build.make_train_step(
      mesh, state_sharding, parallelism=c.parallelism,
      grad_accum_steps=c.grad_accum_steps, graphdef=graphdef, tx=tx,
      masker=_MASKER, rate_fn=lambda _: 0.3)
  batch = _batches(1, 32, seed=1)[0]
  norms = []
  for k in range(keys):
    fresh = jax.tree.map(jnp.copy, state).replace(
        rng=jax.random.key_data(jax.random.key(100 + k)))
    _, m = step(fresh, to_device(batch))
    norms.append(float(m['grad_norm'][0]))
  return np.array(norms)


def _z(a, b):
  """The paired mean difference of a and b in standard errors."""
  d = a - b
  return d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))


def test_with_dropout_accumulation_and_pmap_have_the_same_law_not_draws():
  full = _grad_norms_over_keys(0.3)
  for variant in (dict(grad_accum_steps=4), dict(parallelism='pmap')):
    other = _grad_norms_over_keys(0.3, **variant)
    # Other draws: each micro-batch (device) folds its index into the key.
    assert np.abs(other - full).min() > 1e-4, variant
    # The same law: the paired mean difference is within sampling error.
    assert abs(_z(other, full)) < 4, (variant, _z(other, full))
  # ... where another dropout rate (another law) is many errors away.
  assert abs(_z(_grad_norms_over_keys(0.6), full)) > 4
