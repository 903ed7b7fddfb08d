"""Masked-language-model masking: pure, jittable functions of explicit keys.

Three strategies choose which tokens of a row are predicted, under a budget
of K = round(rate * n) tokens for a row of n maskable tokens (special tokens
are never chosen):
  token       K single tokens, uniformly at random (BERT): exactly K.
  whole_word  whole words in random order, each taken if it still fits the
              budget (BERT's whole-word masking); never splits a word.
  span        SpanBERT: spans of whole words with lengths from a geometric
              law (p, truncated at span_max_words), at random starts, until
              the budget is met; the last span keeps only the words that fit.
Then each chosen token becomes [MASK] (mask_prob), a random non-special
token (random_prob), or stays (the rest).

The mask of a row depends only on the key and the row's example id (its
index in the global data stream), never on the batch layout or on how many
devices or hosts there are.

Shapes: B batch, L sequence length, K = `max_predictions`, a static bound on
the predictions per row; rows with fewer are padded with weight 0. Word
arrays are indexed by word number and have L slots (W = L).
"""
import dataclasses
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ('token', 'whole_word', 'span')
# Values of `Masked.kinds_BxK`: what happened to the input at that position.
REPLACED_MASK, REPLACED_RANDOM, KEPT = 0, 1, 2


class Masked(NamedTuple):
  inputs_BxL: jax.Array     # token ids the encoder sees
  positions_BxK: jax.Array  # where predictions are made, ascending (0 if unused)
  targets_BxK: jax.Array    # the original ids at those positions
  weights_BxK: jax.Array    # 1.0 for a real prediction, 0.0 for padding
  kinds_BxK: jax.Array      # REPLACED_MASK, REPLACED_RANDOM or KEPT
  maskable_B: jax.Array     # maskable (non-special) tokens per row
  units_B: jax.Array        # tokens, words or spans chosen per row


def num_predictions(num_real: jax.Array, rate) -> jax.Array:
  """K for a row with `num_real` maskable tokens: round half up of rate * n."""
  return jnp.floor(rate * num_real.astype(jnp.float32) + 0.5).astype(jnp.int32)


def static_max_predictions(seq_len: int, rate: float) -> int:
  """The smallest `max_predictions` that never truncates a row of seq_len."""
  return int(np.floor(rate * seq_len + 0.5))


def span_length_probs(p: float, max_words: int) -> np.ndarray:
  """P(span = l words), l = 1..max_words: geometric(p) truncated, renormalized."""
  probs = p * (1 - p) ** np.arange(max_words)
  return probs / probs.sum()


def sample_span_lengths(key, shape, p: float, max_words: int) -> jax.Array:
  """Span lengths in words, drawn from `span_length_probs(p, max_words)`."""
  logits = jnp.log(jnp.asarray(span_length_probs(p, max_words), jnp.float32))
  return 1 + jax.random.categorical(key, logits, shape=shape)


def rate_at(step, *, schedule: str, rate: float, final_rate: float,
            num_steps: int):
  """The mask rate at `step`: constant, or linear/cosine from rate to final_rate."""
  if schedule == 'constant':
    return jnp.asarray(rate, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0, 1)
  if schedule == 'linear':
    return rate + (final_rate - rate) * frac
  if schedule == 'cosine':
    return final_rate + (rate - final_rate) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
  raise ValueError(f"Unknown mask schedule {schedule!r}; use 'constant', "
                   "'linear' or 'cosine'.")


def _random_nonspecial(key, shape, vocab_size: int, special_ids: Sequence[int]):
  """Uniform over [0, vocab_size) minus `special_ids`, without a lookup table.

  Draw r in [0, V - S) and shift it past each special id in increasing order;
  this is a bijection onto the non-special ids, so the result stays uniform.
  """
  specials = sorted(set(int(s) for s in special_ids if 0 <= s < vocab_size))
  ids = jax.random.randint(key, shape, 0, vocab_size - len(specials), jnp.int32)
  for s in specials:
    ids = ids + (ids >= s).astype(jnp.int32)
  return ids


def _choose_tokens(key, maskable_L, k):
  """Exactly k maskable tokens, uniformly at random, without sorting.

  Each maskable token gets a distinct integer score (random high bits, its
  position in the low bits, top bit set); the k-th largest score is found
  bit by bit (radix select), and the tokens at or above it are chosen.
  Sorting (top_k) is several times slower on CPU. Ties in the random bits
  (24 of them for L = 128) are broken by position: a negligible bias.
  """
  seq_len = maskable_L.shape[0]
  pos_bits = max(int(np.ceil(np.log2(seq_len))), 1)
  random_L = jax.random.bits(key, (seq_len,), jnp.uint32) >> (pos_bits + 1)
  scores_L = jnp.where(
      maskable_L,
      jnp.uint32(1 << 31) | (random_L << pos_bits) |
      jnp.arange(seq_len, dtype=jnp.uint32), jnp.uint32(0))

  def try_bit(bit, threshold):
    candidate = threshold | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
    return jnp.where(jnp.sum(scores_L >= candidate) >= k, candidate, threshold)

  threshold = jax.lax.fori_loop(0, 32, try_bit, jnp.uint32(0))
  return (scores_L >= threshold) & maskable_L & (k > 0)


def _words(ids_L, maskable_L, word_start_V):
  """Word number of each token (L where none), word lengths, run of each word.

  A word starts at a word-start piece or right after a special token; a
  run is a stretch between special tokens (spans never cross one).
  """
  seq_len = ids_L.shape[0]
  after_special_L = jnp.concatenate([jnp.ones((1,), bool), ~maskable_L[:-1]])
  start_L = maskable_L & (word_start_V[ids_L] | after_special_L)
  word_L = jnp.where(maskable_L, jnp.cumsum(start_L) - 1, seq_len)
  len_W = jnp.zeros(seq_len + 1, jnp.int32).at[word_L].add(1)[:seq_len]
  run_L = jnp.cumsum(~maskable_L)
  run_W = jnp.zeros(seq_len + 1, jnp.int32).at[word_L].set(run_L)[:seq_len]
  return word_L, len_W, run_W, jnp.sum(start_L)


def _tokens_of_words(word_L, taken_W):
  seq_len = word_L.shape[0]
  return jnp.concatenate([taken_W, jnp.zeros((1,), bool)])[
      jnp.minimum(word_L, seq_len)]


def _choose_whole_words(key, word_L, len_W, num_words, k):
  """Words in random order, each taken if it fits the remaining budget."""
  seq_len = word_L.shape[0]
  w = jnp.arange(seq_len)
  order_W = jnp.argsort(jnp.where(w < num_words,
                                  jax.random.uniform(key, (seq_len,)), 2.0))

  def take(total, word):
    fits = (len_W[word] > 0) & (total + len_W[word] <= k)
    return total + fits * len_W[word], fits

  _, taken_in_order = jax.lax.scan(take, jnp.int32(0), order_W)
  taken_W = jnp.zeros(seq_len, bool).at[order_W].set(taken_in_order)
  return _tokens_of_words(word_L, taken_W), jnp.sum(taken_W)


def _choose_spans(key, word_L, len_W, run_W, num_words, k, *, p, max_words,
                  attempts):
  """SpanBERT spans of whole words until the budget k is met."""
  seq_len = word_L.shape[0]
  w = jnp.arange(seq_len)
  len_key, start_key = jax.random.split(key)
  lengths_T = sample_span_lengths(len_key, (attempts,), p, max_words)
  starts_T = jnp.floor(jax.random.uniform(start_key, (attempts,)) *
                       num_words).astype(jnp.int32)

  def add_span(carry, length_start):
    taken_W, total, spans = carry
    length, start = length_start
    in_span_W = ((w >= start) & (w < start + length) & (w < num_words) &
                 (run_W == run_W[start]))
    # Words are in order, so the words that fit the budget are a prefix.
    fits_W = in_span_W & (total + jnp.cumsum(jnp.where(in_span_W, len_W, 0))
                          <= k)
    ok = ~jnp.any(in_span_W & taken_W) & jnp.any(fits_W)
    add_W = fits_W & ok
    return (taken_W | add_W, total + jnp.sum(jnp.where(add_W, len_W, 0)),
            spans + ok), None

  (taken_W, _, spans), _ = jax.lax.scan(
      add_span, (jnp.zeros(seq_len, bool), jnp.int32(0), jnp.int32(0)),
      (lengths_T, starts_T))
  return _tokens_of_words(word_L, taken_W), spans


def _mask_row(key, ids_L, rate, *, strategy, word_start_V, special_ids,
              mask_id, vocab_size, mask_prob, random_prob, max_predictions,
              span_p, span_max_words):
  seq_len = ids_L.shape[0]
  select_key, kind_key, random_key = jax.random.split(key, 3)
  maskable_L = ~jnp.isin(ids_L, jnp.asarray(list(special_ids), jnp.int32))
  num_maskable = jnp.sum(maskable_L)
  k = jnp.minimum(num_predictions(num_maskable, rate), max_predictions)
  if strategy == 'token':
    chosen_L = _choose_tokens(select_key, maskable_L, k)
    units = jnp.sum(chosen_L)
  else:
    word_L, len_W, run_W, num_words = _words(ids_L, maskable_L, word_start_V)
    if strategy == 'whole_word':
      chosen_L, units = _choose_whole_words(select_key, word_L, len_W,
                                            num_words, k)
    else:
      chosen_L, units = _choose_spans(
          select_key, word_L, len_W, run_W, num_words, k, p=span_p,
          max_words=span_max_words, attempts=max_predictions + 8)
  # Chosen positions, ascending, packed into K slots (at most K are chosen).
  slot_L = jnp.where(chosen_L, jnp.cumsum(chosen_L) - 1, max_predictions)
  positions_K = jnp.zeros(max_predictions, jnp.int32).at[slot_L].set(
      jnp.arange(seq_len, dtype=jnp.int32), mode='drop')
  valid_K = jnp.arange(max_predictions) < jnp.sum(chosen_L)
  targets_K = ids_L[positions_K]

  u_K = jax.random.uniform(kind_key, (max_predictions,))
  kinds_K = jnp.where(u_K < mask_prob, REPLACED_MASK,
                      jnp.where(u_K < mask_prob + random_prob,
                                REPLACED_RANDOM, KEPT)).astype(jnp.int32)
  random_K = _random_nonspecial(random_key, (max_predictions,), vocab_size,
                                special_ids)
  new_K = jnp.where(kinds_K == REPLACED_MASK, mask_id,
                    jnp.where(kinds_K == REPLACED_RANDOM, random_K, targets_K))
  # Unused slots point past the row and are dropped.
  inputs_L = ids_L.at[jnp.where(valid_K, positions_K, seq_len)].set(
      new_K, mode='drop')
  return Masked(inputs_L, positions_K, targets_K, valid_K.astype(jnp.float32),
                kinds_K, num_maskable, units)


@dataclasses.dataclass(frozen=True, eq=False)
class Masker:
  """A masking strategy with its settings; call it on a batch of rows."""
  special_ids: tuple
  mask_id: int
  vocab_size: int
  max_predictions: int
  strategy: str = 'token'
  mask_prob: float = 0.8
  random_prob: float = 0.1
  word_start_V: Optional[np.ndarray] = None  # [V] bool, for word strategies
  span_p: float = 0.2
  span_max_words: int = 10

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f'Unknown masking strategy {self.strategy!r}; choose '
                       f'one of {STRATEGIES}.')
    if not 0.0 <= self.mask_prob + self.random_prob <= 1.0:
      raise ValueError(f'mask_prob + random_prob must be in [0, 1], got '
                       f'{self.mask_prob} + {self.random_prob}.')
    if self.strategy != 'token':
      if self.word_start_V is None or len(self.word_start_V) != self.vocab_size:
        raise ValueError(f'The {self.strategy} strategy needs word_start_V, a '
                         f'[vocab_size={self.vocab_size}] bool array from the '
                         'tokenizer.')
    if not 0 < self.span_p <= 1 or self.span_max_words < 1:
      raise ValueError('span_p must be in (0, 1] and span_max_words >= 1, got '
                       f'{self.span_p} and {self.span_max_words}.')

  def __call__(self, key, ids_BxL, example_ids_B=None, rate=0.15) -> Masked:
    """Masks each row with fold_in(key, its example id); ids default 0..B-1."""
    batch, seq_len = ids_BxL.shape
    if not 0 < self.max_predictions <= seq_len:
      raise ValueError(f'max_predictions={self.max_predictions} must be in '
                       f'[1, seq_len={seq_len}].')
    if example_ids_B is None:
      example_ids_B = jnp.arange(batch)
    word_start_V = (jnp.zeros((self.vocab_size,), bool)
                    if self.word_start_V is None
                    else jnp.asarray(self.word_start_V, bool))
    keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
    row = lambda k, ids: _mask_row(
        k, ids, rate, strategy=self.strategy, word_start_V=word_start_V,
        special_ids=self.special_ids, mask_id=self.mask_id,
        vocab_size=self.vocab_size, mask_prob=self.mask_prob,
        random_prob=self.random_prob, max_predictions=self.max_predictions,
        span_p=self.span_p, span_max_words=self.span_max_words)
    return jax.vmap(row)(keys_B, ids_BxL)


def mask_tokens(key, ids_BxL, *, special_ids, mask_id, vocab_size, rate=0.15,
                mask_prob=0.8, random_prob=0.1, max_predictions,
                strategy='token', word_start_V=None, example_ids_B=None,
                span_p=0.2, span_max_words=10) -> Masked:
  """Functional form of `Masker(...)(key, ids_BxL, example_ids_B, rate)`."""
  return Masker(tuple(special_ids), mask_id, vocab_size, max_predictions,
                strategy, mask_prob, random_prob, word_start_V, span_p,
                span_max_words)(key, ids_BxL, example_ids_B, rate)


def mean_span_words(p: float, max_words: int) -> float:
  """Mean span length in words under `span_length_probs`."""
  probs = span_length_probs(p, max_words)
  return float(np.sum(probs * np.arange(1, max_words + 1)))
