"""Masked-language-model masking: pure, jittable functions of explicit keys.

Three strategies choose which tokens of a row are predicted, under a budget
of K tokens per row, where K = floor(rate * n + 0.5) (rate * n rounded half
up) and n is the row's maskable tokens: its tokens that are not special
([CLS], [SEP], [PAD], [UNK], [MASK]); special tokens are never chosen:
  token       K single tokens, uniformly at random (BERT): exactly K.
  whole_word  whole words in random order, each taken if it still fits the
              budget (BERT's whole-word masking); never splits a word.
  span        SpanBERT: spans of whole words with lengths from a geometric
              law (p, truncated at span_max_words), at random starts, until
              the budget is met; the last span keeps only the words that fit.
Then each chosen token becomes [MASK] (mask_prob), a random non-special
token (random_prob), or stays (the rest).

A plug-in strategy, 'package.module:function' (say
'experiments.2026-12-01_idea.masking:choose'), lets an experiment choose the
tokens without editing this package. The function is called on one row,

  choose(key, ids_L, maskable_L, word_start_L, k) -> chosen_L

with a key of its own for that row, the row's token ids [L], whether each
token may be chosen [L] bool (not special), whether a word begins there
[L] bool (every maskable token when the Masker has no word_start_V), and the
budget k (a scalar int32: K of the row, as above); it returns [L]
bool, the tokens to predict. It is traced once under vmap and jit, so it
uses jax.numpy and jax.random only. The Masker ignores chosen special
tokens, keeps the first max_predictions of a row, and does the rest (the
80/10/10 replacement, the static layout, the telemetry) as for the others.

The mask of a row depends only on the key and the row's example id (its
index in the global data stream), never on the batch layout or on how many
devices or hosts there are.

Speed (the token strategy runs inside every train step): the whole batch is
drawn at once, as uint32 words of Threefry-2x32 (JAX's PRNG function) keyed
from `key` and counted by (example id, draw number), written out unrolled so
that XLA fuses it (on CPU, `jax.random` runs it as a loop of small kernels).
The token strategy needs about 2.5 words per prediction slot rather than one
per token: Floyd's algorithm draws the K-subset, and rows are handled as
bitsets of 32 tokens per uint32, so sorting the chosen positions and mapping
them back to the row are bit counts. BENCHMARKS.md has the figures.

Shapes: B batch, L sequence length, K = `max_predictions`, a static bound on
the predictions per row; rows with fewer are padded with weight 0. Word
arrays are indexed by word number and have L slots (W = L). N = ceil(L / 32),
the uint32 words of a row's bitset (bit i of word w is token 32 * w + i).
"""
import dataclasses
import functools
import importlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ('token', 'whole_word', 'span')
# Values of `Masked.kinds_BxK`: what happened to the input at that position.
REPLACED_MASK, REPLACED_RANDOM, KEPT = 0, 1, 2
_U32 = jnp.uint32
# Threefry-2x32 rotation constants (Salmon et al., SC'11, "Parallel random
# numbers: as easy as 1, 2, 3"), used by alternate groups of four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


class Masked(NamedTuple):
  inputs_BxL: jax.Array     # token ids the encoder sees
  positions_BxK: jax.Array  # where predictions are made, ascending (0 if unused)
  targets_BxK: jax.Array    # the original ids at those positions
  weights_BxK: jax.Array    # 1.0 for a real prediction, 0.0 for padding
  kinds_BxK: jax.Array      # REPLACED_MASK, REPLACED_RANDOM or KEPT
  maskable_B: jax.Array     # maskable (non-special) tokens per row
  units_B: jax.Array        # tokens, words or spans chosen per row


def num_predictions(num_real: jax.Array, rate) -> jax.Array:
  """K = floor(rate * n + 0.5) for rows of n = `num_real` maskable tokens."""
  return jnp.floor(rate * num_real.astype(jnp.float32) + 0.5).astype(jnp.int32)


def plugin(name: str):
  """The function of a plug-in strategy 'package.module:function'."""
  module_name, _, function_name = name.partition(':')
  form = ("'package.module:function', importable from the working directory "
          "(run from the repository root) or sys.path")
  if not module_name or not function_name or ':' in function_name:
    raise ValueError(f'mask.strategy={name!r} is not of the form {form}.')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'mask.strategy={name!r}: cannot import module '
                     f'{module_name!r} ({type(e).__name__}: {e}); expected '
                     f'{form}.') from e
  fn = getattr(module, function_name, None)
  if not callable(fn):
    raise ValueError(f'mask.strategy={name!r}: module {module_name!r} '
                     f'({module.__file__}) has no function {function_name!r}.')
  return fn


def check_strategy(name: str) -> None:
  """Raises a ValueError naming the choices when `name` is not a strategy.

  A plug-in ('package.module:function') is imported here, so a missing
  module or function fails before any data preparation or compilation.
  """
  if ':' in name:
    plugin(name)
  elif name not in STRATEGIES:
    raise ValueError(f"mask.strategy={name!r}; choose one of {STRATEGIES} or "
                     "a plug-in 'package.module:function'.")


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


# ---------------------------------------------------------------------------
# Random words.

def _threefry2x32(key0, key1, x0, x1):
  """Threefry-2x32, 20 rounds, of the counter (x0, x1) under (key0, key1).

  The function `jax.random` uses for threefry keys (the tests check it bit
  for bit), unrolled: XLA:CPU lowers JAX's primitive as a rolled loop.
  """
  keys = (key0, key1, key0 ^ key1 ^ _U32(0x1BD11BDA))
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = ((x1 << _U32(r)) | (x1 >> _U32(32 - r))) ^ x0
    x0 = x0 + keys[(block + 1) % 3]
    x1 = x1 + keys[(block + 2) % 3] + _U32(block + 1)
  return x0, x1


def _seed(key):
  """Two uint32 words derived from `key` that key this module's Threefry.

  For a threefry key, its hash at a counter no `jax.random` call reaches
  (flat index 2**64 - 1), unrolled; for other kinds of key, their bits.
  """
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if typed and str(jax.random.key_impl(key)) != 'threefry2x32':
    return tuple(jax.random.bits(key, (2,), jnp.uint32))
  data = jax.random.key_data(key) if typed else key
  return _threefry2x32(data[0], data[1], _U32(0xFFFFFFFF), _U32(0xFFFFFFFF))


def _random_words(key, example_ids_B, num: int) -> jax.Array:
  """[B, num] independent uniform uint32 words; row b's depend only on
  (key, example_ids_B[b]): Threefry of the counter (example id, j)."""
  seed = _seed(key)
  shape = (example_ids_B.shape[0], num)
  words, _ = _threefry2x32(
      seed[0], seed[1],
      jnp.broadcast_to(example_ids_B.astype(_U32)[:, None], shape),
      jax.lax.broadcasted_iota(_U32, shape, 1))
  # Materialized once: otherwise XLA recomputes the hash in every consumer.
  return jax.lax.optimization_barrier(words)


def _mul_high(a, b):
  """floor(a * b / 2**32) for uint32 a, b, exactly, in 32-bit arithmetic."""
  a, b = a.astype(_U32), jnp.asarray(b).astype(_U32)
  low = _U32(0xFFFF)
  a0, a1, b0, b1 = a & low, a >> 16, b & low, b >> 16
  cross = ((a0 * b0) >> 16) + ((a1 * b0) & low) + a0 * b1  # < 2**32
  return a1 * b1 + ((a1 * b0) >> 16) + (cross >> 16)


def _below(words, n):
  """Integers in [0, n) from uniform uint32 words: floor(word * n / 2**32).

  Each value has probability floor(2**32 / n) / 2**32 or one 2**-32 more:
  uniform to within n / 2**32 relative (1e-5 for BERT's vocabulary).
  """
  return _mul_high(words, n).astype(jnp.int32)


def _random_nonspecial(words, vocab_size: int, special_ids: Sequence[int]):
  """Uniform over [0, vocab_size) minus `special_ids`, without a lookup table.

  Take r in [0, V - S) and shift it past each special id in increasing order;
  this is a bijection onto the non-special ids, so the result stays uniform.
  """
  specials = sorted({int(s) for s in special_ids if 0 <= s < vocab_size})
  ids = _below(words, vocab_size - len(specials))
  for s in specials:
    ids = ids + (ids >= s).astype(jnp.int32)
  return ids


def _kinds(words, num: int, mask_prob: float, random_prob: float):
  """[B, num] kinds from 16-bit halves of [B, ceil(num / 2)] words.

  The probabilities are rounded to multiples of 2**-16.
  """
  halves = jnp.concatenate([words >> 16, words & _U32(0xFFFF)], 1)[:, :num]
  to_mask = _U32(round(mask_prob * 65536))
  to_random = _U32(round((mask_prob + random_prob) * 65536))
  return jnp.where(halves < to_mask, REPLACED_MASK,
                   jnp.where(halves < to_random, REPLACED_RANDOM,
                             KEPT)).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Rows as bitsets: 32 tokens per uint32 word.

def _bitset(flags_BxL) -> jax.Array:
  """[B, N] uint32: bit i of word w is flags_BxL[:, 32 * w + i]."""
  batch, seq_len = flags_BxL.shape
  num_words = -(-seq_len // 32)
  padded = jnp.pad(flags_BxL, ((0, 0), (0, 32 * num_words - seq_len)))
  bits = padded.reshape(batch, num_words, 32).astype(_U32)
  return jnp.sum(bits << jnp.arange(32, dtype=_U32), 2, dtype=_U32)


def _popcount(words):
  return jax.lax.population_count(words).astype(jnp.int32)


def _nth_set_bit(words_BxN, n_BxK):
  """Index of the n-th (from 0) set bit of each row's bitset, [B, K].

  Garbage where n >= the row's bit count; callers mask those slots.
  """
  counts = _popcount(words_BxN)
  word_BxK = jnp.zeros_like(n_BxK)
  before_BxK = jnp.zeros_like(n_BxK)  # set bits in the words before
  total_B = counts[:, 0]
  for w in range(1, words_BxN.shape[1]):
    later = total_B[:, None] <= n_BxK
    word_BxK = jnp.where(later, w, word_BxK)
    before_BxK = jnp.where(later, total_B[:, None], before_BxK)
    total_B = total_B + counts[:, w]
  x = jnp.broadcast_to(words_BxN[:, :1], n_BxK.shape)
  for w in range(1, words_BxN.shape[1]):
    x = jnp.where(word_BxK == w, words_BxN[:, w:w + 1], x)
  n = n_BxK - before_BxK
  bit = jnp.zeros_like(n_BxK)
  for width in (16, 8, 4, 2, 1):  # binary search within the word
    low = _popcount(x & _U32((1 << width) - 1))
    high = n >= low
    n = jnp.where(high, n - low, n)
    x = jnp.where(high, x >> _U32(width), x)
    bit = bit + jnp.where(high, width, 0)
  return 32 * word_BxK + bit


# ---------------------------------------------------------------------------
# Strategies.

def _floyd(words_BxK, n_B, k_B):
  """k distinct ordinals in [0, n) per row, uniformly (Floyd's algorithm).

  Floyd: for j = n - k, ..., n - 1, draw t uniform in [0, j]; take t, or j
  if t was taken. Returns [B, K] ordinals, unordered; slots >= k are junk.
  Step i takes j_i exactly when t_i equals an earlier t, or equals j_p for
  an earlier step p that took j_p, so only that yes/no is sequential. It is
  carried as bits of uint32 words, up to 32 steps unrolled per loop turn.
  """
  batch, max_k = words_BxK.shape
  per_turn = min(max_k, 32)
  turns = -(-max_k // per_turn)
  step_K = jnp.arange(per_turn * turns, dtype=jnp.int32)
  first_B1 = (n_B - k_B)[:, None]
  j_BxK = first_B1 + step_K
  t_BxK = (words_BxK % (j_BxK[:, :max_k] + 1).astype(_U32)).astype(jnp.int32)
  earlier_KxK = np.tril(np.ones((max_k, max_k), bool), -1)
  repeat_BxK = jnp.any((t_BxK[:, :, None] == t_BxK[:, None, :]) &
                       earlier_KxK, 2)
  t_BxK, repeat_BxK = (jnp.pad(x, ((0, 0), (0, per_turn * turns - max_k)))
                       for x in (t_BxK, repeat_BxK))
  p_BxK = t_BxK - first_B1  # t_i == j_p
  p_BxK = jnp.where((p_BxK >= 0) & (p_BxK < step_K), p_BxK, -1)
  repeat_BxTxS = repeat_BxK.reshape(batch, turns, per_turn)
  p_BxTxS = p_BxK.reshape(batch, turns, per_turn)

  def turn(c, took_j_BxT):
    repeat_BxS = jax.lax.dynamic_index_in_dim(repeat_BxTxS, c, 1, False)
    p_BxS = jax.lax.dynamic_index_in_dim(p_BxTxS, c, 1, False)
    bits_B = jnp.zeros(batch, _U32)
    for s in range(per_turn):
      p_B = p_BxS[:, s]
      word_B = bits_B
      for w in range(turns - 1):  # p in an earlier turn's word
        word_B = jnp.where(((p_B >> 5) == w) & (w < c), took_j_BxT[:, w],
                           word_B)
      took = repeat_BxS[:, s] | (
          (p_B >= 0) & (((word_B >> (p_B & 31).astype(_U32)) & 1) == 1))
      bits_B = bits_B | (took.astype(_U32) << s)
    return jax.lax.dynamic_update_index_in_dim(took_j_BxT, bits_B, c, 1)

  took_j_BxT = jax.lax.fori_loop(0, turns, turn,
                                 jnp.zeros((batch, turns), _U32))
  took_j_BxK = ((jnp.repeat(took_j_BxT, per_turn, 1) >>
                 (step_K % per_turn).astype(_U32)) & 1) == 1
  return jnp.where(took_j_BxK, j_BxK, t_BxK)[:, :max_k]


def _choose_tokens(words_BxK, maskable_BxN, k_B):
  """Exactly k maskable tokens per row, uniformly: their positions, ascending.

  Floyd picks k ordinals among the row's n maskable tokens; the ordinals'
  bitset lists them in order, and the o-th set bit of the maskable bitset
  is the position of ordinal o.
  """
  max_k = words_BxK.shape[1]
  num_words = maskable_BxN.shape[1]
  ordinals_BxK = _floyd(words_BxK, jnp.sum(_popcount(maskable_BxN), 1), k_B)
  valid_BxK = jnp.arange(max_k) < k_B[:, None]
  in_word_BxKxN = (ordinals_BxK[:, :, None] >> 5) == jnp.arange(num_words)
  one_bit_BxK = _U32(1) << (ordinals_BxK & 31).astype(_U32)
  chosen_BxN = jnp.sum(jnp.where(in_word_BxKxN & valid_BxK[:, :, None],
                                 one_bit_BxK[:, :, None], _U32(0)), 1,
                       dtype=_U32)  # distinct bits, so the sum is an OR
  slot_BxK = jnp.broadcast_to(jnp.arange(max_k, dtype=jnp.int32),
                              valid_BxK.shape)
  return _nth_set_bit(maskable_BxN, _nth_set_bit(chosen_BxN, slot_BxK))


def _word_starts(ids_L, maskable_L, word_start_V):
  """Where a word starts: a word-start piece, or right after a special token."""
  after_special_L = jnp.concatenate([jnp.ones((1,), bool), ~maskable_L[:-1]])
  return maskable_L & (word_start_V[ids_L] | after_special_L)


def _words(ids_L, maskable_L, word_start_V):
  """Word number of each token (L where none), word lengths, run of each word.

  A run is a stretch between special tokens (spans never cross one).
  """
  seq_len = ids_L.shape[0]
  start_L = _word_starts(ids_L, maskable_L, word_start_V)
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


def _choose_words_row(key, ids_L, maskable_L, k, *, strategy, word_start_V,
                      max_predictions, span_p, span_max_words):
  """One row's chosen tokens [L] bool and units, for the word strategies."""
  word_L, len_W, run_W, num_words = _words(ids_L, maskable_L, word_start_V)
  if strategy == 'whole_word':
    return _choose_whole_words(key, word_L, len_W, num_words, k)
  return _choose_spans(key, word_L, len_W, run_W, num_words, k, p=span_p,
                       max_words=span_max_words, attempts=max_predictions + 8)


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
  word_start_V: np.ndarray | None = None  # [V] bool, for word strategies
  span_p: float = 0.2
  span_max_words: int = 10

  def __post_init__(self):
    check_strategy(self.strategy)
    if not 0.0 <= self.mask_prob + self.random_prob <= 1.0:
      raise ValueError(f'mask_prob + random_prob must be in [0, 1], got '
                       f'{self.mask_prob} + {self.random_prob}.')
    if self.strategy in ('whole_word', 'span') and (
        self.word_start_V is None or len(self.word_start_V) != self.vocab_size):
      raise ValueError(f'The {self.strategy} strategy needs word_start_V, a '
                       f'[vocab_size={self.vocab_size}] bool array from the '
                       'tokenizer.')
    if not 0 < self.span_p <= 1 or self.span_max_words < 1:
      raise ValueError('span_p must be in (0, 1] and span_max_words >= 1, got '
                       f'{self.span_p} and {self.span_max_words}.')

  def __call__(self, key, ids_BxL, example_ids_B=None, rate=0.15) -> Masked:
    """Masks each row by `key` and its example id; ids default to 0..B-1."""
    batch, seq_len = ids_BxL.shape
    max_k = self.max_predictions
    if not 0 < max_k <= seq_len:
      raise ValueError(f'max_predictions={max_k} must be in '
                       f'[1, seq_len={seq_len}].')
    if example_ids_B is None:
      example_ids_B = jnp.arange(batch)
    return self._mask(key, ids_BxL, example_ids_B, rate)

  # Jitted (with the Masker as a static argument, hashed by identity), so an
  # eager call runs one program; inside a jitted train step it is inlined.
  @functools.partial(jax.jit, static_argnums=0)
  def _mask(self, key, ids_BxL, example_ids_B, rate) -> Masked:
    batch, seq_len = ids_BxL.shape
    max_k = self.max_predictions
    maskable_BxL = jnp.ones((batch, seq_len), bool)
    for s in set(self.special_ids):
      maskable_BxL = maskable_BxL & (ids_BxL != s)
    maskable_BxN = _bitset(maskable_BxL)
    maskable_B = jnp.sum(_popcount(maskable_BxN), 1)
    k_B = jnp.minimum(num_predictions(maskable_B, rate), max_k)
    # Words [0, K): random ids; [K, K + K/2): kinds; then the token choice.
    num_kind_words = -(-max_k // 2)
    words_BxT = _random_words(
        key, example_ids_B,
        max_k + num_kind_words + (max_k if self.strategy == 'token' else 0))
    slot_BxK = jnp.broadcast_to(jnp.arange(max_k, dtype=jnp.int32),
                                (batch, max_k))
    if self.strategy == 'token':
      positions_BxK = _choose_tokens(words_BxT[:, max_k + num_kind_words:],
                                     maskable_BxN, k_B)
      units_B = k_B
    else:
      # Other strategies choose a [L] bool per row, from per-row keys.
      keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
      if self.strategy in STRATEGIES:
        word_start_V = jnp.asarray(self.word_start_V, bool)
        row = lambda key, ids_L, maskable_L, k: _choose_words_row(
            jax.random.split(key, 3)[0], ids_L, maskable_L, k,
            strategy=self.strategy, word_start_V=word_start_V,
            max_predictions=max_k, span_p=self.span_p,
            span_max_words=self.span_max_words)
        chosen_BxL, units_B = jax.vmap(row)(keys_B, ids_BxL, maskable_BxL,
                                            k_B)
      else:
        word_start_BxL = maskable_BxL if self.word_start_V is None else (
            jax.vmap(_word_starts, (0, 0, None))(
                ids_BxL, maskable_BxL, jnp.asarray(self.word_start_V, bool)))
        chosen_BxL = jax.vmap(plugin(self.strategy))(
            keys_B, ids_BxL, maskable_BxL, word_start_BxL, k_B)
        chosen_BxL = jnp.asarray(chosen_BxL, bool) & maskable_BxL
      chosen_BxN = _bitset(chosen_BxL)
      k_B = jnp.minimum(jnp.sum(_popcount(chosen_BxN), 1), max_k)
      if self.strategy not in STRATEGIES:
        units_B = k_B  # tokens
      positions_BxK = _nth_set_bit(chosen_BxN, slot_BxK)
    valid_BxK = slot_BxK < k_B[:, None]
    positions_BxK = jnp.where(valid_BxK, positions_BxK, 0)
    targets_BxK = jnp.take_along_axis(ids_BxL, positions_BxK, 1)
    kinds_BxK = _kinds(words_BxT[:, max_k:max_k + num_kind_words], max_k,
                       self.mask_prob, self.random_prob)
    random_BxK = _random_nonspecial(words_BxT[:, :max_k], self.vocab_size,
                                    self.special_ids)
    new_BxK = jnp.where(kinds_BxK == REPLACED_MASK, self.mask_id,
                        jnp.where(kinds_BxK == REPLACED_RANDOM, random_BxK,
                                  targets_BxK))
    # Unused slots point past the row and are dropped.
    inputs_BxL = ids_BxL.at[
        jnp.arange(batch)[:, None], jnp.where(valid_BxK, positions_BxK,
                                              seq_len)].set(new_BxK,
                                                            mode='drop')
    return Masked(inputs_BxL, positions_BxK, targets_BxK,
                  valid_BxK.astype(jnp.float32), kinds_BxK, maskable_B,
                  units_B)


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


def from_config(config, tokenizer):
  """(train masker, train rate schedule, eval masker) of a run config."""
  m = config.mask
  top_rate = max(m.rate, m.final_rate if m.schedule != 'constant' else 0.0)
  common = dict(
      special_ids=tuple(tokenizer.special_ids), mask_id=tokenizer.mask_id,
      vocab_size=tokenizer.vocab_size, strategy=m.strategy,
      mask_prob=m.mask_prob, random_prob=m.random_prob,
      word_start_V=(tokenizer.word_start_mask() if m.strategy != 'token'
                    else None),
      span_p=m.span_p, span_max_words=m.span_max_words)
  train_masker = Masker(
      max_predictions=m.max_predictions or
      static_max_predictions(config.seq_len, top_rate), **common)
  eval_masker = Masker(
      max_predictions=static_max_predictions(config.seq_len,
                                                     m.eval_rate), **common)
  rate_fn = functools.partial(rate_at, schedule=m.schedule,
                              rate=m.rate, final_rate=m.final_rate,
                              num_steps=config.num_steps)
  return train_masker, rate_fn, eval_masker


def check_config(config):
  """The mask.* checks of a run config: clear errors before any work."""
  for key in ('rate', 'final_rate', 'eval_rate'):
    if not 0.0 < config.mask[key] < 1.0:
      raise ValueError(f'mask.{key}={config.mask[key]} must be in (0, 1).')
  check_strategy(config.mask.strategy)  # raises, naming the choices
  rate_at(0, schedule=config.mask.schedule, rate=0.1, final_rate=0.1,
          num_steps=1)  # raises on an unknown schedule
  if config.mask.mask_prob + config.mask.random_prob > 1.0:
    raise ValueError('mask.mask_prob + mask.random_prob must be <= 1, got '
                     f'{config.mask.mask_prob} + {config.mask.random_prob}.')
  top_rate = max(config.mask.rate, config.mask.final_rate
                 if config.mask.schedule != 'constant' else 0.0)
  needed = static_max_predictions(config.seq_len, top_rate)
  if config.mask.max_predictions and config.mask.max_predictions < needed:
    raise ValueError(
        f'mask.max_predictions={config.mask.max_predictions} is below '
        f'floor(max rate * seq_len + 0.5)={needed}, so rows would be truncated; set it '
        f'to 0 (automatic) or >= {needed}.')
