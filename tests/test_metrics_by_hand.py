"""The reported numbers against values computed by hand (numpy).

One small batch with a mask built by hand (tests/test_masking.py checks the
masker itself): padded rows, two documents per row, every replacement kind,
weight-0 slots whose predictions are right (so a denominator that counts
them shows), a special token among the targets, and the baseline token
both at [MASK] slots and elsewhere. Each metric is checked as its (sum,
weight) pair, then as the reported ratio.
"""
import functools
import types

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from mlm_jax import build
from mlm_jax import masking
from mlm_jax import metrics as metrics_lib
from mlm_jax import model_config
from mlm_jax import optimizer
from mlm_jax import sharding
from mlm_jax import steps
from mlm_jax import train

V, L, K = 16, 8, 3
PAD, UNK, CLS, SEP, MASK_ID = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK_ID)
BASELINE = 5
M, R, KEPT = masking.REPLACED_MASK, masking.REPLACED_RANDOM, masking.KEPT

IDS_BxL = np.array([
    [CLS, 5, 6, SEP, 7, 8, 9, SEP],       # two documents
    [CLS, 5, 5, SEP, 10, SEP, PAD, PAD],  # two documents, padded
    [PAD] * L,                            # an all-padding row
    [CLS, 11, 12, 13, 14, 15, 6, SEP],    # one document
], np.int32)
SEGMENTS_BxL = np.array([
    [1, 1, 1, 1, 2, 2, 2, 2],
    [1, 1, 1, 1, 2, 2, 0, 0],
    [0] * L,
    [1] * L,
], np.int32)
POSITIONS_BxK = np.array([[1, 4, 6], [1, 2, 0], [0, 0, 0], [1, 2, 7]])
# Row 3's last target is [SEP] (the masker never picks one; the telemetry
# must count it); row 1's padding slot points at [CLS].
TARGETS_BxK = np.array([[5, 7, 9], [5, 5, CLS], [BASELINE, PAD, PAD],
                        [11, 12, SEP]])
WEIGHTS_BxK = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]],
                       np.float32)
KINDS_BxK = np.array([[M, R, KEPT], [M, KEPT, M], [M, M, M], [M, R, KEPT]])
MASKABLE_B = np.array([5, 3, 0, 6])
UNITS_B = np.array([3, 1, 0, 2])  # row 1: one word of two tokens
# Which slots the hand logits predict right: 5 of the 8 real ones, and
# every padding slot.
CORRECT_BxK = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0]], bool)


def _inputs_BxL():
  """What the encoder sees: the kinds applied (random replacement: 13)."""
  inputs = IDS_BxL.copy()
  for b in range(4):
    for k in range(K):
      if WEIGHTS_BxK[b, k]:
        inputs[b, POSITIONS_BxK[b, k]] = {M: MASK_ID, R: 13,
                                          KEPT: TARGETS_BxK[b, k]}[
                                              KINDS_BxK[b, k]]
  return inputs


def _masked():
  return masking.Masked(*(jnp.asarray(x) for x in (
      _inputs_BxL(), POSITIONS_BxK, TARGETS_BxK, WEIGHTS_BxK, KINDS_BxK,
      MASKABLE_B, UNITS_B)))


def _hand_logits():
  """[B, K, V] logits whose argmax is the target exactly where CORRECT."""
  logits = np.random.default_rng(0).normal(size=(4, K, V)).astype(np.float32)
  for b in range(4):
    for k in range(K):
      t = TARGETS_BxK[b, k]
      logits[b, k, t] = logits[b, k].max() + 1.0
      if not CORRECT_BxK[b, k]:
        logits[b, k, (t + 1) % V] = logits[b, k, t] + 1.0
  return logits


def _cross_entropy(logits_BxKxV):
  """-log softmax(logits)[target], written out in float64."""
  x = np.asarray(logits_BxKxV, np.float64)
  top = x.max(-1, keepdims=True)
  log_z = (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]
  return log_z - np.take_along_axis(x, TARGETS_BxK[..., None], -1)[..., 0]


def _expected(logits_BxKxV):
  """{name: (sum, weight)} of mlm_metrics, from the definitions."""
  w = WEIGHTS_BxK.astype(bool)
  correct = np.argmax(logits_BxKxV, -1) == TARGETS_BxK
  loss = _cross_entropy(logits_BxKxV)
  at = lambda kind: w & (KINDS_BxK == kind)
  return {
      'loss': (loss[w].sum(), 8),
      'accuracy': (correct[w].sum(), 8),
      'mask_accuracy': (correct[at(M)].sum(), 3),
      'random_accuracy': (correct[at(R)].sum(), 2),
      'kept_accuracy': (correct[at(KEPT)].sum(), 3),
  }


def _check(got, want, names=None):
  for name in names or want:
    np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name],
                               rtol=1e-5, err_msg=name)


def test_mlm_metrics_count_only_real_slots_of_each_kind():
  logits = _hand_logits()
  got = steps.mlm_metrics(jnp.asarray(logits), _masked(),
                          jnp.asarray(_cross_entropy(logits), jnp.float32),
                          baseline_id=BASELINE)
  # By hand: 8 real slots (3 [MASK], 2 random, 3 kept); right at 5 of them.
  assert np.argmax(logits, -1)[CORRECT_BxK].tolist() == (
      TARGETS_BxK[CORRECT_BxK].tolist())
  want = _expected(logits)
  assert [want[k][0] for k in ('accuracy', 'mask_accuracy',
                               'random_accuracy', 'kept_accuracy')] == [
                                   5, 2, 1, 2]
  # Baseline: the real [MASK] slots whose target is BASELINE: 2 of 3 (not
  # row 1's kept 5, not row 2's padding slot).
  want['baseline_accuracy'] = (2, 3)
  _check(got, want)
  assert set(got) == set(want)
  reported = metrics_lib.summarize(jax.device_get(got), 'eval')
  assert reported['eval/accuracy'] == pytest.approx(5 / 8)
  assert reported['eval/mask_accuracy'] == pytest.approx(2 / 3)
  assert reported['eval/random_accuracy'] == pytest.approx(1 / 2)
  assert reported['eval/kept_accuracy'] == pytest.approx(2 / 3)
  assert reported['eval/baseline_accuracy'] == pytest.approx(2 / 3)
  assert reported['eval/loss'] == pytest.approx(
      _cross_entropy(logits)[WEIGHTS_BxK.astype(bool)].mean(), rel=1e-6)


def test_mask_telemetry_by_hand():
  got = steps.mask_telemetry(_masked(), SPECIALS)
  want = {
      'mask_rate': (8, 14),       # predictions / maskable tokens (5+3+0+6)
      'frac_mask': (3, 8),        # of the predictions
      'frac_random': (2, 8),
      'frac_kept': (3, 8),
      'special_masked': (1, 1),   # row 3's [SEP]; not row 1's weight-0 [CLS]
      'mean_span_length': (8, 6),  # predictions / units (3+1+0+2)
  }
  _check(got, want)
  assert set(got) == set(want)


def test_a_window_is_pooled_not_a_mean_of_step_ratios():
  """Two steps' sums added (train._accumulate), divided once."""
  a = {'accuracy': jnp.array([1.0, 2.0]), 'nonfinite': jnp.zeros(2)}
  b = {'accuracy': jnp.array([6.0, 6.0]), 'nonfinite': jnp.zeros(2)}
  carry = (jax.tree.map(jnp.zeros_like, a), jnp.int32(2**31 - 1))
  for step, m in enumerate((a, b), 1):
    carry = train._accumulate(carry, m, step)  # pylint: disable=protected-access
  sums = jax.device_get(carry[0])
  assert metrics_lib.summarize(sums, 'train')['train/accuracy'] == 7 / 8


# --------------------------------------------- through the real jitted steps


class _HandMasker:
  """Returns the hand mask whatever the key: the steps' masker interface."""
  special_ids = SPECIALS
  max_predictions = K

  def __call__(self, key, ids_BxL, example_ids_B, rate):
    del key, ids_BxL, example_ids_B, rate
    return _masked()


@pytest.fixture(scope='module')
def tiny():
  c = base.get_config()
  c.seq_len, c.batch_size, c.num_steps, c.warmup_steps = L, 4, 10, 1
  c.model.update(size='tiny', num_layers=1, hidden_dim=16, num_heads=2,
                 mlp_dim=32, max_len=L, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  mcfg = model_config.from_config(c, V)
  tx = optimizer.create(c)
  graphdef, state, _ = build.init_state(mcfg, c.seed, tx, sharding.make_mesh(c))
  batch = {'input_ids': jnp.asarray(IDS_BxL),
           'segment_ids': jnp.asarray(SEGMENTS_BxL)}
  return graphdef, tx, state, batch


def _model_logits(graphdef, params):
  """The model's logits at the hand mask, by a plain call of the model."""
  bert = nnx.merge(graphdef, params)
  return np.asarray(bert(jnp.asarray(_inputs_BxL()),
                         jnp.asarray(SEGMENTS_BxL),
                         jnp.asarray(POSITIONS_BxK), deterministic=True))


@pytest.mark.parametrize('accum', [1, 2])
def test_train_step_reports_the_hand_values(tiny, accum):
  graphdef, tx, state, batch = tiny
  step = jax.jit(functools.partial(
      steps.train_step, graphdef=graphdef, tx=tx, masker=_HandMasker(),
      rate_fn=lambda _: 0.15, grad_accum_steps=accum))
  logits = _model_logits(graphdef, state.params)
  _, m = step(state, batch)
  want = _expected(logits)
  want.update({'mask_rate': (8, 14), 'frac_mask': (3, 8),
               'frac_random': (2, 8), 'frac_kept': (3, 8),
               'special_masked': (1, 1), 'mean_span_length': (8, 6),
               'nonfinite': (0, 1)})
  _check(m, want)
  reported = metrics_lib.summarize(jax.device_get(
      {k: v for k, v in m.items() if k != 'nonfinite'}), 'train')
  real = WEIGHTS_BxK.astype(bool)
  assert reported['train/loss'] == pytest.approx(
      _cross_entropy(logits)[real].mean(), rel=1e-5)
  right = np.argmax(logits, -1) == TARGETS_BxK
  assert reported['train/accuracy'] == pytest.approx(right[real].mean())
  assert reported['train/mask_accuracy'] == pytest.approx(
      right[real & (KINDS_BxK == M)].mean())

  # The gradient is that of the mean loss over the 8 real slots (not over
  # all 12): its norm, from a loss written out here.
  def loss_fn(params):
    logits_BxKxV = nnx.merge(graphdef, params)(
        jnp.asarray(_inputs_BxL()), jnp.asarray(SEGMENTS_BxL),
        jnp.asarray(POSITIONS_BxK), deterministic=True)
    log_p = jax.nn.log_softmax(logits_BxKxV.astype(jnp.float32))
    picked = jnp.take_along_axis(log_p, jnp.asarray(TARGETS_BxK)[..., None],
                                 -1)[..., 0]
    return -jnp.sum(picked * WEIGHTS_BxK) / 8.0

  grad_norm = optax.global_norm(jax.jit(jax.grad(loss_fn))(state.params))
  np.testing.assert_allclose(m['grad_norm'], [float(grad_norm), 1.0],
                             rtol=1e-4)


def test_eval_step_reports_the_hand_values(tiny):
  graphdef, _, state, batch = tiny
  fn = jax.jit(functools.partial(steps.eval_step, graphdef=graphdef,
                                 masker=_HandMasker(), rate=0.15,
                                 baseline_id=BASELINE))
  m = fn(state.params, batch, jax.random.key(0))
  want = _expected(_model_logits(graphdef, state.params))
  want['baseline_accuracy'] = (2, 3)
  _check(m, want)
  assert set(m) == set(want)


# ------------------------------------------------- the real masker, by count

def test_configured_masker_predicts_round_rate_n_per_row_split_80_10_10():
  """make_maskers from a run config: K per row = floor(rate * n + 0.5) of
  the row's n non-special tokens (any padding, any documents), and the
  config's mask_prob / random_prob reach the replacement split."""
  c = base.get_config()
  c.seq_len, c.num_steps = 64, 10
  tok = types.SimpleNamespace(special_ids=SPECIALS, mask_id=MASK_ID,
                              vocab_size=1000)
  masker, rate_fn, eval_masker = masking.from_config(c, tok)
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 1000, (512, 64)).astype(np.int32)
  ids[:, 0] = CLS
  for row in ids:  # documents end in [SEP]; some rows end in padding
    row[rng.integers(1, 64, 3)] = SEP
    if rng.random() < 0.3:
      row[rng.integers(2, 64):] = PAD
  n_B = np.isin(ids, SPECIALS, invert=True).sum(1)
  for m, rate in ((masker, float(rate_fn(0))), (eval_masker,
                                                c.mask.eval_rate)):
    out = jax.device_get(m(jax.random.key(0), jnp.asarray(ids), None, rate))
    k_B = np.floor(rate * n_B + 0.5).astype(int)
    np.testing.assert_array_equal(out.weights_BxK.sum(1), k_B)
    np.testing.assert_array_equal(out.maskable_B, n_B)
    real = out.weights_BxK > 0
    rows = np.nonzero(real)[0]
    assert not np.isin(ids[rows, out.positions_BxK[real]], SPECIALS).any()
    kinds = out.kinds_BxK[real]
    # 512 rows x ~9 slots: ~4.7k draws, standard errors under 0.006.
    assert abs(np.mean(kinds == M) - c.mask.mask_prob) < 0.03
    assert abs(np.mean(kinds == R) - c.mask.random_prob) < 0.03
    inputs = out.inputs_BxL[rows, out.positions_BxK[real]]
    assert (inputs[kinds == M] == MASK_ID).all()
    assert (inputs[kinds == KEPT] == out.targets_BxK[real][kinds == KEPT]).all()


# ------------------------------------------------------- MFU's peak by dtype

@pytest.mark.parametrize('kind,bf16,fp32', [
    ('NVIDIA H100 80GB HBM3', 989e12, 494.5e12),
    ('NVIDIA H100 PCIe', 756e12, 378e12),
    ('NVIDIA H200', 989e12, 494.5e12),
    ('NVIDIA A100-SXM4-80GB', 312e12, 156e12),
    ('TPU v4', 275e12, 275e12),
    ('TPU v5 lite', 197e12, 197e12),
    ('TPU v5p', 459e12, 459e12),
    ('TPU v6 lite', 918e12, 918e12),
    ('cpu', None, None),
])
def test_peak_flops_are_those_of_the_step_dtype(monkeypatch, kind, bf16,
                                                fp32):
  monkeypatch.setattr(metrics_lib.jax, 'devices',
                      lambda: [types.SimpleNamespace(device_kind=kind)])
  assert metrics_lib.peak_flops_per_device(0.0, 'bfloat16') == bf16
  assert metrics_lib.peak_flops_per_device(0.0, 'float32') == fp32
  assert metrics_lib.peak_flops_per_device(0.0, 'float16') == bf16
  assert metrics_lib.peak_flops_per_device(100.0, 'float32') == 100e12
  with pytest.raises(ValueError, match='float64'):
    metrics_lib.peak_flops_per_device(0.0, 'float64')


@pytest.mark.slow
def test_train_mfu_uses_the_peak_of_the_model_dtype(data_dir, tmp_path,
                                                    monkeypatch):
  """train/mfu = train FLOPs / seconds / (peak of the step's dtype x devices)."""
  import tiny  # pylint: disable=g-import-not-at-top
  asked = []

  def peak(override_tflops, dtype):
    asked.append((override_tflops, dtype))
    return 1e9

  monkeypatch.setattr(metrics_lib, 'peak_flops_per_device', peak)
  c = tiny.config(data_dir, **{'model.dtype': 'bfloat16', 'num_steps': 4,
                               'eval_every': 4, 'checkpoint_every': 4})
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert asked == [(0.0, 'bfloat16')]
  records = [r for r in tiny.read_metrics(str(tmp_path / 'run'))
             if 'train/mfu' in r]
  assert [r['step'] for r in records] == [2, 4]
  mcfg = model_config.from_config(c, c.data.vocab_size)
  k = masking.static_max_predictions(c.seq_len, c.mask.rate)
  for r in records:
    # A window of 2 steps of 8 full rows of 32 (the demo rows are packed
    # full but for the split's last one): FLOPs per real token.
    tokens = 2 * 8 * 32
    per_token = metrics_lib.train_flops(mcfg, 32, tokens, 2 * 8 * k) / tokens
    assert r['train/mfu'] * 8 * 1e9 / r['train/tokens_per_second'] == (
        pytest.approx(per_token, rel=0.02))
