import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from mlm_jax import build
from mlm_jax import masking
from mlm_jax import metrics
from mlm_jax import model
from mlm_jax import model_config
from mlm_jax import optimizer
from mlm_jax import sharding
from mlm_jax import steps

V = 64


def _setup(num_steps=150):
  c = base.get_config()
  c.num_steps, c.warmup_steps, c.learning_rate = num_steps, 10, 1e-2
  c.seq_len, c.batch_size = 16, 8
  c.model.update(size='tiny', num_layers=1, hidden_dim=32, num_heads=2,
                 mlp_dim=64, max_len=16, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  mcfg = model_config.from_config(c, V)
  tx = optimizer.create(c)
  masker = masking.Masker(special_ids=(0, 1, 2, 3, 4), mask_id=4,
                          vocab_size=V, max_predictions=4)
  mesh = sharding.make_mesh(c)
  graphdef, state, _ = build.init_state(mcfg, c.seed, tx, mesh)
  return c, graphdef, tx, masker, state, mesh


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, V, (8, 16)).astype(np.int32)
  ids[:, 0] = 2
  return {'input_ids': jnp.asarray(ids), 'segment_ids': jnp.ones_like(ids)}


def test_loss_falls_on_a_repeated_batch():
  _, graphdef, tx, masker, state, _ = _setup()
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx,
                                   masker=masker, rate_fn=lambda _: 0.25))
  batch = _batch()
  losses = []
  for _ in range(150):
    state, m = step(state, batch)
    losses.append(float(m['loss'][0] / m['loss'][1]))
  assert int(state.step) == 150
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_metrics_are_sums_and_weights():
  _, graphdef, tx, masker, state, _ = _setup()
  # Jitted: op by op, the step takes about a minute on 2 cores.
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, tx=tx,
                                   masker=masker, rate_fn=lambda _: 0.25))
  _, m = step(state, _batch())
  # 8 rows x 15 maskable tokens x 0.25 -> round(3.75) = 4 predictions per row.
  # (Values against a hand-built mask: tests/test_metrics_by_hand.py.)
  assert float(m['loss'][1]) == 32.0 and float(m['accuracy'][1]) == 32.0
  # Accuracy by kind counts the slots of that kind that the telemetry counts.
  for kind in ('mask', 'random', 'kept'):
    assert float(m[f'{kind}_accuracy'][1]) == float(m[f'frac_{kind}'][0])
  # Telemetry: 32 of 8 x 15 maskable tokens; no special token chosen.
  np.testing.assert_allclose(m['mask_rate'], [32.0, 120.0])
  assert float(m['special_masked'][0]) == 0.0
  total = sum(float(m[k][0]) for k in ('frac_mask', 'frac_random',
                                       'frac_kept'))
  assert total == 32.0 and float(m['frac_mask'][1]) == 32.0
  np.testing.assert_allclose(m['mean_span_length'], [32.0, 32.0])


def test_eval_step_is_deterministic_and_reports_the_baseline():
  _, graphdef, _, masker, state, _ = _setup()
  fn = jax.jit(functools.partial(steps.eval_step, graphdef=graphdef,
                                 masker=masker, rate=0.25, baseline_id=7))
  batch = _batch(1)
  # Token 7 in every other position, so the baseline hits often.
  batch['input_ids'] = batch['input_ids'].at[:, 1::2].set(7)
  a = fn(state.params, batch, jax.random.key(3))
  b = fn(state.params, batch, jax.random.key(3))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  other = fn(state.params, batch, jax.random.key(4))
  assert float(other['loss'][0]) != float(a['loss'][0])
  # The baseline by hand, from the same mask: target 7 at the [MASK] slots.
  masked = jax.device_get(masker(jax.random.key(3), batch['input_ids'], None,
                                 0.25))
  at_mask = (masked.weights_BxK > 0) & (masked.kinds_BxK ==
                                         masking.REPLACED_MASK)
  hits = (masked.targets_BxK == 7) & at_mask
  assert 0 < hits.sum() < at_mask.sum()
  np.testing.assert_array_equal(a['baseline_accuracy'],
                                [hits.sum(), at_mask.sum()])


def test_decay_mask_skips_layernorm_and_biases():
  _, _, _, _, state, _ = _setup()
  mask = optimizer.decay_mask(state.params)
  flat = {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = {'/'.join(str(getattr(k, 'key', k)) for k in path): bool(v)
             for path, v in flat.items()}
  assert decayed, 'empty mask'
  for name, on in decayed.items():
    is_vector = any(p in name for p in ('bias', 'scale'))
    assert on != is_vector, name
  assert any(decayed.values()) and not all(decayed.values())


def test_decay_mask_is_by_name_under_scan_layers():
  """Stacked [layers, D] biases and scales are 2-D; they still get no decay."""
  params = {'blocks': {'mlp': {'bias': jnp.zeros((3, 8)),
                               'kernel': jnp.zeros((3, 8, 8))},
                       'norm': {'scale': jnp.ones((3, 8))}},
            'word': {'embedding': jnp.zeros((10, 8))}}
  mask = optimizer.decay_mask(params)
  assert mask == {'blocks': {'mlp': {'bias': False, 'kernel': True},
                             'norm': {'scale': False}},
                  'word': {'embedding': True}}


def test_train_flops_is_six_times_the_non_embedding_params_per_token():
  """Matmul FLOPs per token = 6 x non-embedding matrix parameters (+ the
  attention scores, 12 x layers x width x length; + the head per slot)."""
  for activation in ('gelu', 'geglu'):
    cfg = model_config.ModelConfig(
        vocab_size=1000, num_layers=2, hidden_dim=64, num_heads=2, mlp_dim=256,
        activation=activation, vocab_multiple=128)
    params = nnx.state(model.create(cfg, jax.random.key(0)), nnx.Param)
    matrices = sum(
        x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
        if x.ndim == 2 and 'blocks' in jax.tree_util.keystr(path))
    per_token = metrics.train_flops(cfg, seq_len=16, real_tokens=1,
                                    predictions=0, sparse_last_layer=False)
    assert per_token == 6 * matrices + 12 * 2 * 64 * 16
    per_prediction = metrics.train_flops(cfg, 16, 0, 1,
                                         sparse_last_layer=False)
    assert per_prediction == 6 * (64 * 64 + 64 * 1024)
    # Ours (sparse last layer): every token runs layer 1 and the last
    # layer's keys and values; each prediction slot the rest of the last
    # layer (its other matrices and attention) and the head.
    kv = 2 * 64 * 64
    assert metrics.train_flops(cfg, 16, 1, 0) == (
        6 * (matrices // 2 + kv) + 12 * 64 * 16)
    assert metrics.train_flops(cfg, 16, 0, 1) == (
        per_prediction + 6 * (matrices // 2 - kv) + 12 * 64 * 16)
