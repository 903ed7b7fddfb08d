"""Masking strategies: which tokens of a row are predicted. One registry.

Each strategy chooses, under a budget of k tokens for the row (K of the
package docstring), never a special token:
  token       k single tokens, uniformly at random (BERT): exactly k.
  whole_word  whole words in random order, each taken if it still fits the
              budget (BERT's whole-word masking); never splits a word.
  span        SpanBERT: spans of whole words with lengths from a geometric
              law (span_p, truncated at span_max_words), at random starts,
              until the budget is met; the last span keeps only the words
              that fit.
`token` is the fast path of every train step: it works on the whole batch
at once from random words (bits.py). The others are row functions in
ROW_STRATEGIES, called under vmap with a key per row:

  fn(key, ids_L, maskable_L, word_start_L, k, masker) -> (chosen_L, units)

chosen_L [L] bool the tokens to predict, units the words or spans chosen
(for telemetry), `masker` the Masker for its settings (span_p, ...). A new
strategy is such a function and its entry in ROW_STRATEGIES; `mask.strategy`
then accepts its name. An experiment can instead name a plug-in
'package.module:function' without editing the package (`plugin`; its
interface is in the package docstring).

Must not: replace tokens, lay out predictions, or read a config (that is the
Masker's job, in __init__.py).
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax.masking import bits


def choose_tokens(words_BxK, maskable_BxN, k_B):
  """Exactly k maskable tokens per row, uniformly: their positions, ascending.

  Floyd picks k ordinals among the row's n maskable tokens; the ordinals'
  bitset lists them in order, and the o-th set bit of the maskable bitset
  is the position of ordinal o.
  """
  max_k = words_BxK.shape[1]
  num_words = maskable_BxN.shape[1]
  ordinals_BxK = bits.floyd(words_BxK, jnp.sum(bits.popcount(maskable_BxN), 1), k_B)
  valid_BxK = jnp.arange(max_k) < k_B[:, None]
  in_word_BxKxN = (ordinals_BxK[:, :, None] >> 5) == jnp.arange(num_words)
  one_bit_BxK = bits.U32(1) << (ordinals_BxK & 31).astype(bits.U32)
  chosen_BxN = jnp.sum(jnp.where(in_word_BxKxN & valid_BxK[:, :, None],
                                 one_bit_BxK[:, :, None], bits.U32(0)), 1,
                       dtype=bits.U32)  # distinct bits, so the sum is an OR
  slot_BxK = jnp.broadcast_to(jnp.arange(max_k, dtype=jnp.int32),
                              valid_BxK.shape)
  return bits.nth_set_bit(maskable_BxN, bits.nth_set_bit(chosen_BxN, slot_BxK))


def span_length_probs(p: float, max_words: int) -> np.ndarray:
  """P(span = l words), l = 1..max_words: geometric(p) truncated, renormalized."""
  probs = p * (1 - p) ** np.arange(max_words)
  return probs / probs.sum()


def sample_span_lengths(key, shape, p: float, max_words: int) -> jax.Array:
  """Span lengths in words, drawn from `span_length_probs(p, max_words)`."""
  logits = jnp.log(jnp.asarray(span_length_probs(p, max_words), jnp.float32))
  return 1 + jax.random.categorical(key, logits, shape=shape)


def word_starts(ids_L, maskable_L, word_start_V):
  """Where a word starts: a word-start piece, or right after a special token."""
  after_special_L = jnp.concatenate([jnp.ones((1,), bool), ~maskable_L[:-1]])
  return maskable_L & (word_start_V[ids_L] | after_special_L)


def words(start_L, maskable_L):
  """Word number of each token (L where none), word lengths, run of each word.

  A run is a stretch between special tokens (spans never cross one).
  """
  seq_len = start_L.shape[0]
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


def choose_spans(key, word_L, len_W, run_W, num_words, k, *, p, max_words,
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


def whole_word(key, ids_L, maskable_L, word_start_L, k, masker):
  """BERT's whole-word masking of one row: (chosen_L, words chosen)."""
  del ids_L, masker
  word_L, len_W, _, num_words = words(word_start_L, maskable_L)
  # The row's key is split as in the first release, so masks stay the same.
  return _choose_whole_words(jax.random.split(key, 3)[0], word_L, len_W,
                             num_words, k)


def span(key, ids_L, maskable_L, word_start_L, k, masker):
  """SpanBERT's span masking of one row: (chosen_L, spans chosen)."""
  del ids_L
  word_L, len_W, run_W, num_words = words(word_start_L, maskable_L)
  return choose_spans(jax.random.split(key, 3)[0], word_L, len_W, run_W,
                      num_words, k, p=masker.span_p,
                      max_words=masker.span_max_words,
                      attempts=masker.max_predictions + 8)


# name -> row function; the word strategies need the tokenizer's word starts.
ROW_STRATEGIES = {'whole_word': whole_word, 'span': span}
STRATEGIES = ('token', *ROW_STRATEGIES)


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


def check(name: str) -> None:
  """Raises a ValueError naming the choices when `name` is not a strategy.

  A plug-in ('package.module:function') is imported here, so a missing
  module or function fails before any data preparation or compilation.
  """
  names = ('token', *ROW_STRATEGIES)
  if ':' in name:
    plugin(name)
  elif name not in names:
    raise ValueError(f"mask.strategy={name!r}; choose one of {names} or a "
                     "plug-in 'package.module:function'.")
