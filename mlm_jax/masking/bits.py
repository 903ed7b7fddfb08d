"""Random uint32 words, rows as bitsets, and Floyd's k-of-n: masking's machinery.

Speed (the token strategy runs inside every train step): the whole batch is
drawn at once, as uint32 words of Threefry-2x32 (JAX's PRNG function) keyed
from a JAX key and counted by (example id, draw number), written out
unrolled so that XLA fuses it (on CPU, `jax.random` runs it as a loop of
small kernels). Rows are handled as bitsets of 32 tokens per uint32, so
sorting chosen positions and mapping them back to the row are bit counts;
Floyd's algorithm draws a K-subset from about 2.5 words per slot.
BENCHMARKS.md has the figures.

Pure jax.numpy functions; no strategy, no masking policy (those are in
strategies.py and the package's Masker). Shapes: B batch, L sequence length,
K slots per row, N = ceil(L / 32) words of a row's bitset (bit i of word w is
token 32 * w + i).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

U32 = jnp.uint32
# Threefry-2x32 rotation constants (Salmon et al., SC'11, "Parallel random
# numbers: as easy as 1, 2, 3"), used by alternate groups of four rounds.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key0, key1, x0, x1):
  """Threefry-2x32, 20 rounds, of the counter (x0, x1) under (key0, key1).

  The function `jax.random` uses for threefry keys (the tests check it bit
  for bit), unrolled: XLA:CPU lowers JAX's primitive as a rolled loop.
  """
  keys = (key0, key1, key0 ^ key1 ^ U32(0x1BD11BDA))
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = ((x1 << U32(r)) | (x1 >> U32(32 - r))) ^ x0
    x0 = x0 + keys[(block + 1) % 3]
    x1 = x1 + keys[(block + 2) % 3] + U32(block + 1)
  return x0, x1


def key_words(key):
  """Two uint32 words derived from `key` that key this module's Threefry.

  For a threefry key, its hash at a counter no `jax.random` call reaches
  (flat index 2**64 - 1), unrolled; for other kinds of key, their bits.
  """
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if typed and str(jax.random.key_impl(key)) != 'threefry2x32':
    return tuple(jax.random.bits(key, (2,), jnp.uint32))
  data = jax.random.key_data(key) if typed else key
  return threefry2x32(data[0], data[1], U32(0xFFFFFFFF), U32(0xFFFFFFFF))


def random_words(key, example_ids_B, num: int) -> jax.Array:
  """[B, num] independent uniform uint32 words; row b's depend only on
  (key, example_ids_B[b]): Threefry of the counter (example id, j)."""
  seed = key_words(key)
  shape = (example_ids_B.shape[0], num)
  words, _ = threefry2x32(
      seed[0], seed[1],
      jnp.broadcast_to(example_ids_B.astype(U32)[:, None], shape),
      jax.lax.broadcasted_iota(U32, shape, 1))
  # Materialized once: otherwise XLA recomputes the hash in every consumer.
  return jax.lax.optimization_barrier(words)


def mul_high(a, b):
  """floor(a * b / 2**32) for uint32 a, b, exactly, in 32-bit arithmetic."""
  a, b = a.astype(U32), jnp.asarray(b).astype(U32)
  low = U32(0xFFFF)
  a0, a1, b0, b1 = a & low, a >> 16, b & low, b >> 16
  cross = ((a0 * b0) >> 16) + ((a1 * b0) & low) + a0 * b1  # < 2**32
  return a1 * b1 + ((a1 * b0) >> 16) + (cross >> 16)


def below(words, n):
  """Integers in [0, n) from uniform uint32 words: floor(word * n / 2**32).

  Each value has probability floor(2**32 / n) / 2**32 or one 2**-32 more:
  uniform to within n / 2**32 relative (1e-5 for BERT's vocabulary).
  """
  return mul_high(words, n).astype(jnp.int32)


def random_nonspecial(words, vocab_size: int, special_ids: Sequence[int]):
  """Uniform over [0, vocab_size) minus `special_ids`, without a lookup table.

  Take r in [0, V - S) and shift it past each special id in increasing order;
  this is a bijection onto the non-special ids, so the result stays uniform.
  """
  specials = sorted({int(s) for s in special_ids if 0 <= s < vocab_size})
  ids = below(words, vocab_size - len(specials))
  for s in specials:
    ids = ids + (ids >= s).astype(jnp.int32)
  return ids


# Rows as bitsets: 32 tokens per uint32 word.

def bitset(flags_BxL) -> jax.Array:
  """[B, N] uint32: bit i of word w is flags_BxL[:, 32 * w + i]."""
  batch, seq_len = flags_BxL.shape
  num_words = -(-seq_len // 32)
  padded = jnp.pad(flags_BxL, ((0, 0), (0, 32 * num_words - seq_len)))
  bits = padded.reshape(batch, num_words, 32).astype(U32)
  return jnp.sum(bits << jnp.arange(32, dtype=U32), 2, dtype=U32)


def popcount(words):
  return jax.lax.population_count(words).astype(jnp.int32)


def nth_set_bit(words_BxN, n_BxK):
  """Index of the n-th (from 0) set bit of each row's bitset, [B, K].

  Garbage where n >= the row's bit count; callers mask those slots.
  """
  counts = popcount(words_BxN)
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
    low = popcount(x & U32((1 << width) - 1))
    high = n >= low
    n = jnp.where(high, n - low, n)
    x = jnp.where(high, x >> U32(width), x)
    bit = bit + jnp.where(high, width, 0)
  return 32 * word_BxK + bit


# Exactly k of n, uniformly.

def floyd(words_BxK, n_B, k_B):
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
  t_BxK = (words_BxK % (j_BxK[:, :max_k] + 1).astype(U32)).astype(jnp.int32)
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
    bits_B = jnp.zeros(batch, U32)
    for s in range(per_turn):
      p_B = p_BxS[:, s]
      word_B = bits_B
      for w in range(turns - 1):  # p in an earlier turn's word
        word_B = jnp.where(((p_B >> 5) == w) & (w < c), took_j_BxT[:, w],
                           word_B)
      took = repeat_BxS[:, s] | (
          (p_B >= 0) & (((word_B >> (p_B & 31).astype(U32)) & 1) == 1))
      bits_B = bits_B | (took.astype(U32) << s)
    return jax.lax.dynamic_update_index_in_dim(took_j_BxT, bits_B, c, 1)

  took_j_BxT = jax.lax.fori_loop(0, turns, turn,
                                 jnp.zeros((batch, turns), U32))
  took_j_BxK = ((jnp.repeat(took_j_BxT, per_turn, 1) >>
                 (step_K % per_turn).astype(U32)) & 1) == 1
  return jnp.where(took_j_BxK, j_BxK, t_BxK)[:, :max_k]
