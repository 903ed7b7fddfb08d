"""Masked-language-model masking: pure, jittable functions of explicit keys.

A Masker masks a batch of rows. A strategy (strategies.py: token,
whole_word, span, or a plug-in) chooses which tokens of a row are predicted,
under a budget of K tokens per row, where K = floor(rate * n + 0.5) (rate *
n rounded half up) and n is the row's maskable tokens: its tokens that are
not special ([CLS], [SEP], [PAD], [UNK], [MASK]); special tokens are never
chosen. Then each chosen token becomes [MASK] (mask_prob), a random
non-special token (random_prob), or stays (the rest), and the predictions are
laid out in K static slots.

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
devices or hosts there are. The random words and bitsets are in bits.py.

Shapes: B batch, L sequence length, K = `max_predictions`, a static bound on
the predictions per row; rows with fewer are padded with weight 0. N =
ceil(L / 32), the uint32 words of a row's bitset.

Must not: know the model, the data pipeline or a tokenizer's internals
(`from_config` reads only its special ids, vocabulary size and word starts).
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax.masking import bits
from mlm_jax.masking import strategies

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
  """K = floor(rate * n + 0.5) for rows of n = `num_real` maskable tokens."""
  return jnp.floor(rate * num_real.astype(jnp.float32) + 0.5).astype(jnp.int32)


def static_max_predictions(seq_len: int, rate: float) -> int:
  """The smallest `max_predictions` that never truncates a row of seq_len."""
  return int(np.floor(rate * seq_len + 0.5))


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


def _kinds(words, num: int, mask_prob: float, random_prob: float):
  """[B, num] kinds from 16-bit halves of [B, ceil(num / 2)] words.

  The probabilities are rounded to multiples of 2**-16.
  """
  halves = jnp.concatenate([words >> 16, words & bits.U32(0xFFFF)],
                           1)[:, :num]
  to_mask = bits.U32(round(mask_prob * 65536))
  to_random = bits.U32(round((mask_prob + random_prob) * 65536))
  return jnp.where(halves < to_mask, REPLACED_MASK,
                   jnp.where(halves < to_random, REPLACED_RANDOM,
                             KEPT)).astype(jnp.int32)


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
    strategies.check(self.strategy)
    if not 0.0 <= self.mask_prob + self.random_prob <= 1.0:
      raise ValueError(f'mask_prob + random_prob must be in [0, 1], got '
                       f'{self.mask_prob} + {self.random_prob}.')
    if self.strategy in strategies.ROW_STRATEGIES and (
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
    maskable_BxN = bits.bitset(maskable_BxL)
    maskable_B = jnp.sum(bits.popcount(maskable_BxN), 1)
    k_B = jnp.minimum(num_predictions(maskable_B, rate), max_k)
    # Words [0, K): random ids; [K, K + K/2): kinds; then the token choice.
    num_kind_words = -(-max_k // 2)
    words_BxT = bits.random_words(
        key, example_ids_B,
        max_k + num_kind_words + (max_k if self.strategy == 'token' else 0))
    slot_BxK = jnp.broadcast_to(jnp.arange(max_k, dtype=jnp.int32),
                                (batch, max_k))
    if self.strategy == 'token':
      positions_BxK = strategies.choose_tokens(
          words_BxT[:, max_k + num_kind_words:], maskable_BxN, k_B)
      units_B = k_B
    else:
      # Row strategies choose a [L] bool per row, from per-row keys.
      keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
      word_start_BxL = maskable_BxL if self.word_start_V is None else (
          jax.vmap(strategies.word_starts, (0, 0, None))(
              ids_BxL, maskable_BxL, jnp.asarray(self.word_start_V, bool)))
      if self.strategy in strategies.ROW_STRATEGIES:
        row = functools.partial(strategies.ROW_STRATEGIES[self.strategy],
                                masker=self)
        chosen_BxL, units_B = jax.vmap(row)(keys_B, ids_BxL, maskable_BxL,
                                            word_start_BxL, k_B)
      else:
        chosen_BxL = jax.vmap(strategies.plugin(self.strategy))(
            keys_B, ids_BxL, maskable_BxL, word_start_BxL, k_B)
        chosen_BxL = jnp.asarray(chosen_BxL, bool) & maskable_BxL
      chosen_BxN = bits.bitset(chosen_BxL)
      k_B = jnp.minimum(jnp.sum(bits.popcount(chosen_BxN), 1), max_k)
      if self.strategy not in strategies.ROW_STRATEGIES:
        units_B = k_B  # tokens
      positions_BxK = bits.nth_set_bit(chosen_BxN, slot_BxK)
    valid_BxK = slot_BxK < k_B[:, None]
    positions_BxK = jnp.where(valid_BxK, positions_BxK, 0)
    targets_BxK = jnp.take_along_axis(ids_BxL, positions_BxK, 1)
    kinds_BxK = _kinds(words_BxT[:, max_k:max_k + num_kind_words], max_k,
                       self.mask_prob, self.random_prob)
    random_BxK = bits.random_nonspecial(words_BxT[:, :max_k], self.vocab_size,
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
  strategies.check(config.mask.strategy)  # raises, naming the choices
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
