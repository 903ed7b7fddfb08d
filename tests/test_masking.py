import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_jax import masking

SPECIALS = (0, 1, 2, 3, 4)  # PAD UNK CLS SEP MASK
MASK_ID, V = 4, 1000


def _rows(key, batch, seq_len, min_real=2):
  """Packed-looking rows: [CLS] tokens [SEP] ... then a random amount of PAD."""
  k1, k2, k3 = jax.random.split(key, 3)
  ids = np.asarray(jax.random.randint(k1, (batch, seq_len), 5, V))
  lengths = np.asarray(jax.random.randint(k2, (batch,), min_real, seq_len + 1))
  seps = np.asarray(jax.random.uniform(k3, (batch, seq_len))) < 0.05
  ids = np.where(seps, 3, ids)
  ids[:, 0] = 2
  ids[np.arange(seq_len)[None, :] >= lengths[:, None]] = 0
  return jnp.asarray(ids, jnp.int32)


def _mask(key, ids, rate=0.15, **kw):
  max_predictions = kw.pop('max_predictions', None) or \
      masking.static_max_predictions(ids.shape[1], rate)
  fn = jax.jit(lambda k, x: masking.mask_tokens(
      k, x, special_ids=SPECIALS, mask_id=MASK_ID, vocab_size=V, rate=rate,
      max_predictions=max_predictions, **kw))
  return fn(key, ids)


def test_exact_k_per_row_and_specials_never_chosen():
  ids = _rows(jax.random.key(0), 512, 64)
  m = _mask(jax.random.key(1), ids)
  maskable = ~np.isin(np.asarray(ids), SPECIALS)
  expected_k = np.floor(0.15 * maskable.sum(1) + 0.5)
  np.testing.assert_array_equal(np.asarray(m.weights_BxK).sum(1), expected_k)
  w = np.asarray(m.weights_BxK) > 0
  targets = np.asarray(m.targets_BxK)[w]
  assert not np.isin(targets, SPECIALS).any()
  # Special positions are untouched in the inputs.
  special = ~maskable
  np.testing.assert_array_equal(np.asarray(m.inputs_BxL)[special],
                                np.asarray(ids)[special])
  # Chosen positions are distinct within a row.
  for row_pos, row_w in zip(np.asarray(m.positions_BxK), w):
    assert len(set(row_pos[row_w])) == row_w.sum()


def test_targets_are_the_original_tokens_and_only_chosen_change():
  ids = _rows(jax.random.key(2), 64, 32)
  m = _mask(jax.random.key(3), ids)
  ids, inputs = np.asarray(ids), np.asarray(m.inputs_BxL)
  pos, w = np.asarray(m.positions_BxK), np.asarray(m.weights_BxK) > 0
  for b in range(ids.shape[0]):
    np.testing.assert_array_equal(m.targets_BxK[b][w[b]], ids[b, pos[b][w[b]]])
    untouched = np.ones(ids.shape[1], bool)
    untouched[pos[b][w[b]]] = False
    np.testing.assert_array_equal(inputs[b, untouched], ids[b, untouched])


def test_80_10_10_split_on_a_large_sample():
  ids = _rows(jax.random.key(4), 4096, 128, min_real=100)
  m = _mask(jax.random.key(5), ids)
  w = np.asarray(m.weights_BxK) > 0
  kinds = np.asarray(m.kinds_BxK)[w]
  new = np.asarray(jnp.take_along_axis(m.inputs_BxL, m.positions_BxK, 1))[w]
  old = np.asarray(m.targets_BxK)[w]
  n = kinds.size
  assert n > 50_000
  # +-1 point is > 10 standard deviations at this sample size.
  assert abs((kinds == masking.REPLACED_MASK).mean() - 0.8) < 0.01
  assert abs((kinds == masking.REPLACED_RANDOM).mean() - 0.1) < 0.01
  assert abs((kinds == masking.KEPT).mean() - 0.1) < 0.01
  assert (new[kinds == masking.REPLACED_MASK] == MASK_ID).all()
  assert (new[kinds == masking.KEPT] == old[kinds == masking.KEPT]).all()
  rand = new[kinds == masking.REPLACED_RANDOM]
  assert not np.isin(rand, SPECIALS).any() and (rand < V).all()


def test_random_replacements_are_uniform_over_non_special_ids():
  # Many draws from a small vocabulary: every non-special id, none special.
  draws = np.asarray(masking._random_nonspecial(
      jax.random.key(6), (200_000,), 20, SPECIALS))
  counts = np.bincount(draws, minlength=20)
  assert (counts[list(SPECIALS)] == 0).all()
  expected = draws.size / 15
  assert np.abs(counts[5:] - expected).max() < 0.05 * expected


def test_same_key_same_mask_other_key_other_mask():
  ids = _rows(jax.random.key(7), 8, 64)
  a, b = _mask(jax.random.key(8), ids), _mask(jax.random.key(8), ids)
  c = _mask(jax.random.key(9), ids)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.positions_BxK, c.positions_BxK)


def test_token_id_zero_is_a_real_target_when_not_special():
  # HF Flax's `labels > 0` drops a masked id 0; SentencePiece uses 0 for
  # real pieces in some vocabularies. Here 0 is an ordinary token.
  ids = jnp.zeros((4, 40), jnp.int32)
  m = masking.mask_tokens(jax.random.key(0), ids, special_ids=(1, 2, 3),
                          mask_id=3, vocab_size=50, rate=0.25,
                          max_predictions=10)
  assert float(m.weights_BxK.sum()) == 4 * 10
  assert (np.asarray(m.targets_BxK) == 0).all()


def test_bad_arguments_fail_clearly():
  ids = jnp.full((1, 8), 7, jnp.int32)
  with pytest.raises(ValueError, match='max_predictions'):
    _mask(jax.random.key(0), ids, max_predictions=9)
  with pytest.raises(ValueError, match='mask_prob'):
    _mask(jax.random.key(0), ids, mask_prob=0.9, random_prob=0.2)
