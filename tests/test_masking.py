import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mlm_jax import masking
from mlm_jax.masking import bits
from mlm_jax.masking import strategies

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
  words = jax.random.bits(jax.random.key(6), (200_000,), jnp.uint32)
  draws = np.asarray(bits.random_nonspecial(words, 20, SPECIALS))
  counts = np.bincount(draws, minlength=20)
  assert (counts[list(SPECIALS)] == 0).all()
  expected = draws.size / 15
  assert np.abs(counts[5:] - expected).max() < 0.05 * expected


def test_threefry_is_jaxs_bit_for_bit():
  from jax.extend.random import threefry2x32_p  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  k0, k1, x0, x1 = (jnp.asarray(rng.integers(0, 2**32, n, dtype=np.uint64),
                                jnp.uint32) for n in (1, 1, 4096, 4096))
  want = threefry2x32_p.bind(jnp.broadcast_to(k0, x0.shape),
                             jnp.broadcast_to(k1, x0.shape), x0, x1)
  got = bits.threefry2x32(k0[0], k1[0], x0, x1)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _floyd_reference(words, n, k):
  """Floyd's algorithm, one step at a time, with the same draws."""
  out = []
  for row_words, row_n, row_k in zip(words, n, k):
    taken = []
    for i in range(row_k):
      j = row_n - row_k + i
      t = int(row_words[i]) % (j + 1)
      taken.append(j if t in taken else t)
    out.append(taken)
  return out


@pytest.mark.parametrize('max_k', [19, 70])  # one loop turn, and three
def test_floyd_matches_the_sequential_algorithm(max_k):
  rng = np.random.default_rng(max_k)
  batch = 2000
  n = rng.integers(0, 2 * max_k, batch)  # small n: many repeated draws
  k = np.minimum(np.floor(0.6 * n + 0.5), max_k).astype(int)
  words = rng.integers(0, 2**32, (batch, max_k), dtype=np.uint64)
  got = np.asarray(jax.jit(bits.floyd)(
      jnp.asarray(words, jnp.uint32), jnp.asarray(n, jnp.int32),
      jnp.asarray(k, jnp.int32)))
  for row, want, row_k, row_n in zip(got, _floyd_reference(words, n, k), k,
                                     n):
    assert row[:row_k].tolist() == want
    assert len(set(want)) == row_k and all(0 <= o < row_n for o in want)


def test_nth_set_bit_over_several_words():
  rng = np.random.default_rng(1)
  flags = rng.random((300, 100)) < rng.random((300, 1))  # some rows empty
  flags[:, 32:64] &= rng.random((300, 1)) < 0.5          # empty middle words
  words = bits.bitset(jnp.asarray(flags))
  n = jnp.broadcast_to(jnp.arange(100, dtype=jnp.int32), (300, 100))
  got = np.asarray(bits.nth_set_bit(words, n))
  for row, row_flags in zip(got, flags):
    want = np.flatnonzero(row_flags)
    np.testing.assert_array_equal(row[:len(want)], want)


def test_token_choice_is_uniform_over_subsets():
  # 8 maskable tokens among specials, K = 3: all 56 subsets equally likely.
  row = [2, 9, 9, 3, 9, 9, 9, 3, 9, 9, 9, 0]
  ids = jnp.tile(jnp.asarray(row, jnp.int32), (28_000, 1))
  m = _mask(jax.random.key(22), ids, rate=0.375)
  pos = np.asarray(m.positions_BxK)
  assert (np.asarray(m.weights_BxK).sum(1) == 3).all()
  codes = (1 << pos[:, :3]).sum(1)
  subsets, counts = np.unique(codes, return_counts=True)
  assert len(subsets) == 56
  maskable = np.flatnonzero(~np.isin(row, SPECIALS))
  assert np.isin(pos[:, :3], maskable).all()
  assert stats.chisquare(counts).pvalue > 1e-3


def test_a_rows_mask_ignores_the_other_rows():
  ids = _rows(jax.random.key(23), 16, 64)
  masker = jax.jit(_masker('token', 10))
  whole = masker(jax.random.key(24), ids, 100 + jnp.arange(16))
  part = masker(jax.random.key(24), ids[5:9], 100 + jnp.arange(5, 9))
  for field in whole._fields:
    np.testing.assert_array_equal(np.asarray(getattr(whole, field))[5:9],
                                  np.asarray(getattr(part, field)))


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


# ---------------------------------------------------------------------------
# Strategies, laws, determinism across topologies, schedules.

WORD_START_V = np.zeros(V, bool)
WORD_START_V[5:600] = True  # ids >= 600 continue the previous word


def _masker(strategy, max_predictions, **kw):
  return masking.Masker(SPECIALS, MASK_ID, V, max_predictions,
                        strategy=strategy, word_start_V=WORD_START_V, **kw)


def _word_of_each_token(ids_row):
  """Word number per token (-1 for specials), by the same rule, in numpy."""
  words, w, prev_special = [], -1, True
  for t in ids_row:
    if t in SPECIALS:
      words.append(-1)
      prev_special = True
      continue
    if WORD_START_V[t] or prev_special:
      w += 1
    words.append(w)
    prev_special = False
  return np.array(words)


@pytest.mark.parametrize('strategy', strategies.STRATEGIES)
def test_strategies_never_choose_specials_and_respect_the_budget(strategy):
  ids = _rows(jax.random.key(10), 256, 64)
  masker = _masker(strategy, masking.static_max_predictions(64, 0.15))
  m = jax.jit(masker)(jax.random.key(11), ids, None, 0.15)
  w = np.asarray(m.weights_BxK) > 0
  assert not np.isin(np.asarray(m.targets_BxK)[w], SPECIALS).any()
  k = np.floor(0.15 * np.asarray(m.maskable_B) + 0.5)
  got = w.sum(1)
  assert (got <= k).all()
  if strategy == 'token':
    np.testing.assert_array_equal(got, k)
  else:  # whole words rarely leave the budget unfilled
    assert got.sum() >= 0.97 * k.sum()


@pytest.mark.parametrize('strategy', ['whole_word', 'span'])
def test_word_strategies_never_split_a_word(strategy):
  ids = _rows(jax.random.key(12), 128, 64)
  m = jax.jit(_masker(strategy, 10))(jax.random.key(13), ids, None, 0.15)
  for row, pos, w in zip(np.asarray(ids), np.asarray(m.positions_BxK),
                         np.asarray(m.weights_BxK) > 0):
    words = _word_of_each_token(row)
    chosen = set(pos[w].tolist())
    for word in {words[p] for p in chosen}:
      assert set(np.flatnonzero(words == word).tolist()) <= chosen


def _mean_span_words(p: float, max_words: int) -> float:
  """Mean span length in words under `span_length_probs`."""
  probs = strategies.span_length_probs(p, max_words)
  return float(np.sum(probs * np.arange(1, max_words + 1)))


def test_span_lengths_follow_the_truncated_geometric_law():
  lengths = np.asarray(strategies.sample_span_lengths(jax.random.key(14),
                                                      (100_000,), 0.2, 10))
  observed = np.bincount(lengths, minlength=11)[1:]
  expected = strategies.span_length_probs(0.2, 10) * lengths.size
  assert lengths.min() >= 1 and lengths.max() <= 10
  assert stats.chisquare(observed, expected).pvalue > 1e-3
  assert abs(_mean_span_words(0.2, 10) - 3.8) < 0.01  # SpanBERT's 3.8


def test_realized_spans_have_the_law_mean():
  # One-token words, long rows: spans in tokens are spans in words. Only the
  # last span of a row can be cut short by the budget, so the mean is close.
  ids = jax.random.randint(jax.random.key(15), (256, 512), 5, 600)
  m = jax.jit(_masker('span', 80))(jax.random.key(16), ids, None, 0.15)
  mean = float(m.weights_BxK.sum() / m.units_B.sum())
  assert abs(mean - _mean_span_words(0.2, 10)) < 0.4, mean


def _first_span_lengths(p, max_words, rows=20_000, num_words=64):
  """Words in the first span of each row, and whether it ends the row.

  One attempt per row, so no earlier span can reject or cut it; the budget
  (40 words) never cuts it; one-token words and no specials leave only the
  row's end, which the caller conditions on.
  """
  ids = jnp.full((num_words,), 7, jnp.int32)  # a word-start piece

  def first_span(key, ids):
    maskable = jnp.ones_like(ids, bool)
    word_L, len_W, run_W, n_words = strategies.words(
        strategies.word_starts(ids, maskable, jnp.asarray(WORD_START_V)),
        maskable)
    chosen_L, spans = strategies.choose_spans(
        key, word_L, len_W, run_W, n_words, 40, p=p, max_words=max_words,
        attempts=1)
    return jnp.sum(chosen_L), chosen_L[-1], spans

  keys = jax.random.split(jax.random.key(21), rows)
  length, at_end, spans = map(np.asarray, jax.jit(
      jax.vmap(first_span, (0, None)))(keys, ids))
  assert (spans == 1).all()
  return length, at_end


def _span_law_pvalue(length, at_end, p, max_words, num_words=64):
  # A span of l words at a uniform start misses the last word with
  # probability (num_words - l) / num_words, so among those spans
  # P(l) is proportional to span_length_probs(p)[l] * (num_words - l).
  counts = np.bincount(length[~at_end], minlength=max_words + 1)[1:]
  law = strategies.span_length_probs(p, max_words) * (
      num_words - np.arange(1, max_words + 1))
  return stats.chisquare(counts, law / law.sum() * counts.sum()).pvalue


def test_realized_span_lengths_follow_the_clipped_geometric_law():
  length, at_end = _first_span_lengths(0.2, 10)
  assert length.min() >= 1 and length.max() <= 10
  assert (~at_end).sum() > 18_000  # about 6% of spans reach the end
  # Fixed seed, so the outcome is fixed; at a true law a p-value below 1e-3
  # would happen once in a thousand seeds.
  assert _span_law_pvalue(length, at_end, 0.2, 10) > 1e-3
  # The test can tell nearby laws apart: the same spans fail against them.
  for wrong_p, wrong_max in [(0.22, 10), (0.18, 10), (0.2, 9)]:
    clipped = np.minimum(length, wrong_max)
    assert _span_law_pvalue(clipped if wrong_max < 10 else length, at_end,
                            wrong_p, wrong_max) < 1e-6, (wrong_p, wrong_max)


def test_random_replacements_pass_a_chi_square_test():
  vocab = 40
  ids = jax.random.randint(jax.random.key(17), (4096, 128), 5, vocab)
  m = masking.mask_tokens(jax.random.key(18), ids, special_ids=SPECIALS,
                          mask_id=MASK_ID, vocab_size=vocab,
                          max_predictions=19, mask_prob=0.0, random_prob=1.0)
  new = np.asarray(jnp.take_along_axis(m.inputs_BxL, m.positions_BxK, 1))
  new = new[np.asarray(m.weights_BxK) > 0]
  counts = np.bincount(new, minlength=vocab)
  assert (counts[list(SPECIALS)] == 0).all()
  assert stats.chisquare(counts[5:]).pvalue > 1e-3


@pytest.mark.parametrize('strategy', ['token', 'span'])
def test_masks_depend_on_example_ids_not_on_the_topology(strategy):
  # One host with 8 devices masks the global batch of 16; two hosts with 4
  # devices each mask their halves, with the same global example ids.
  ids = _rows(jax.random.key(19), 16, 64)
  example_ids = 1000 + jnp.arange(16)
  masker = _masker(strategy, 10)
  devices = np.asarray(jax.devices())
  assert devices.size == 8

  def run(mesh_devices, rows, ex):
    mesh = jax.sharding.Mesh(mesh_devices, ('data',))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    fn = jax.jit(lambda k, x, e: masker(k, x, e, 0.15), in_shardings=(
        None, shard, shard))
    return fn(jax.random.key(20), rows, ex)

  whole = run(devices, ids, example_ids)
  halves = [run(devices[4 * h:4 * h + 4], ids[8 * h:8 * h + 8],
                example_ids[8 * h:8 * h + 8]) for h in range(2)]
  for field in whole._fields:
    joined = np.concatenate([np.asarray(getattr(h, field)) for h in halves])
    np.testing.assert_array_equal(np.asarray(getattr(whole, field)), joined)
  # And a row's mask moves with it when the batch is reordered.
  perm = np.arange(16)[::-1]
  flipped = run(devices, ids[perm], example_ids[perm])
  np.testing.assert_array_equal(np.asarray(flipped.inputs_BxL)[perm],
                                np.asarray(whole.inputs_BxL))


@pytest.mark.parametrize('schedule,mid', [('constant', 0.3), ('linear', 0.225),
                                          ('cosine', 0.225)])
def test_rate_schedules(schedule, mid):
  rate = lambda s: float(masking.rate_at(s, schedule=schedule, rate=0.3,
                                         final_rate=0.15, num_steps=100))
  end = 0.3 if schedule == 'constant' else 0.15
  assert rate(0) == pytest.approx(0.3)
  assert rate(50) == pytest.approx(mid)
  assert rate(100) == pytest.approx(end)
  assert rate(1000) == pytest.approx(end)
  if schedule == 'cosine':
    assert rate(25) > 0.2625  # cosine stays high longer than linear


def test_unknown_strategy_or_missing_word_table_fails_clearly():
  with pytest.raises(ValueError, match='strategy'):
    masking.Masker(SPECIALS, MASK_ID, V, 4, strategy='sentence')
  with pytest.raises(ValueError, match='word_start_V'):
    masking.Masker(SPECIALS, MASK_ID, V, 4, strategy='whole_word')


# ---------------------------------------------------------------------------
# Property tests: random lengths, padding and special-token placements.

_PROPERTY_MASKERS = {s: _masker(s, 12) for s in strategies.STRATEGIES}
_PROPERTY_FNS = {s: jax.jit(m) for s, m in _PROPERTY_MASKERS.items()}


@st.composite
def _batches(draw):
  """4 rows of 32: random real length, specials sprinkled anywhere, padding."""
  rows = []
  for _ in range(4):
    real = draw(st.integers(0, 32))
    tokens = draw(st.lists(st.integers(5, V - 1), min_size=real,
                           max_size=real))
    specials = draw(st.lists(st.tuples(st.integers(0, 31),
                                       st.sampled_from([1, 2, 3, 4])),
                             max_size=8))
    row = np.zeros(32, np.int32)
    row[:real] = tokens
    for pos, sid in specials:
      row[pos] = sid
    rows.append(row)
  return np.stack(rows)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(ids=_batches(), strategy=st.sampled_from(strategies.STRATEGIES),
                  rate=st.sampled_from([0.1, 0.15, 0.3]),
                  seed=st.integers(0, 2**31 - 1))
def test_masking_invariants_hold_for_any_row(ids, strategy, rate, seed):
  m = _PROPERTY_FNS[strategy](jax.random.key(seed), jnp.asarray(ids), None,
                              jnp.float32(rate))
  inputs, pos = np.asarray(m.inputs_BxL), np.asarray(m.positions_BxK)
  w = np.asarray(m.weights_BxK) > 0
  maskable = ~np.isin(ids, SPECIALS)
  k = np.minimum(np.floor(rate * maskable.sum(1) + 0.5), 12)
  np.testing.assert_array_equal(np.asarray(m.maskable_B), maskable.sum(1))
  for b in range(ids.shape[0]):
    chosen = pos[b][w[b]]
    assert len(set(chosen.tolist())) == len(chosen)       # distinct
    assert maskable[b, chosen].all()                      # never special
    assert (np.diff(chosen) > 0).all()                    # ascending
    if strategy == 'token':
      assert len(chosen) == k[b]                          # exact K
    else:
      assert len(chosen) <= k[b]                          # within budget
    untouched = np.ones(32, bool)
    untouched[chosen] = False
    np.testing.assert_array_equal(inputs[b, untouched], ids[b, untouched])
    np.testing.assert_array_equal(np.asarray(m.targets_BxK)[b][w[b]],
                                  ids[b, chosen])
    if strategy != 'token':
      words = _word_of_each_token(ids[b])
      for word in {words[p] for p in chosen}:
        assert set(np.flatnonzero(words == word)) <= set(chosen.tolist())


def test_wordpiece_continuations_stay_with_their_word():
  from mlm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  pieces = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'un',
            '##believ', '##able', 'cat', '##s', 'sat']
  starts = tokenizer_lib.word_starts(pieces, 'wordpiece')
  np.testing.assert_array_equal(starts[5:], [1, 1, 0, 0, 1, 0, 1])
  ids = jnp.array([[2, 5, 6, 7, 8, 9, 10, 11, 3]] * 64)
  m = masking.Masker(SPECIALS, MASK_ID, len(pieces), 4,
                     strategy='whole_word', word_start_V=starts)(
                         jax.random.key(0), ids, None, 0.5)
  words = {2: 'un', 3: 'un', 4: 'un', 5: 'cat', 6: 'cat'}  # by position
  for pos, w in zip(np.asarray(m.positions_BxK), np.asarray(m.weights_BxK)):
    chosen = set(pos[w > 0].tolist())
    for p in chosen & set(words):
      assert {q for q in words if words[q] == words[p]} <= chosen


def test_a_new_row_strategy_is_one_function_and_one_entry(monkeypatch):
  def prefix(key, ids_L, maskable_L, word_start_L, k, masker):
    """The first k maskable tokens (README, "Extend")."""
    del key, ids_L, word_start_L, masker
    return maskable_L & (jnp.cumsum(maskable_L) <= k), k

  monkeypatch.setitem(strategies.ROW_STRATEGIES, 'prefix', prefix)
  ids = jnp.asarray([[1, 9, 9, 0, 9, 9, 9, 9, 9, 9, 2, 0]], jnp.int32)
  m = masking.Masker((0, 1, 2), 3, 20, 4, strategy='prefix',
                     word_start_V=np.ones(20, bool), mask_prob=1.0,
                     random_prob=0.0)(jax.random.key(0), ids, rate=0.5)
  # 8 maskable tokens at rate 0.5: K = 4, the first four of them.
  np.testing.assert_array_equal(m.positions_BxK, [[1, 2, 4, 5]])
  np.testing.assert_array_equal(m.inputs_BxL[0, [1, 2, 4, 5]], [3] * 4)
  with pytest.raises(ValueError, match='prefix'):
    monkeypatch.delitem(strategies.ROW_STRATEGIES, 'prefix')
    masking.Masker((0, 1, 2), 3, 20, 4, strategy='prefix')
