"""Masked-language-model masking: pure, jittable functions of an explicit key.

BERT's recipe: choose exactly K = round(rate * n) of a row's n maskable tokens
(special tokens are never chosen), then replace each chosen token with [MASK]
(p_mask), a random non-special token (p_random), or keep it (the rest).

Shapes: B batch, L sequence length, K = `max_predictions`, a static bound on
the predictions per row. Rows with fewer predictions are padded with
position 0 and weight 0, so every shape stays static under jit.
"""
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Values of `Masked.kinds_BxK`: what happened to the input at that position.
REPLACED_MASK, REPLACED_RANDOM, KEPT = 0, 1, 2


class Masked(NamedTuple):
  inputs_BxL: jax.Array     # token ids the encoder sees
  positions_BxK: jax.Array  # where predictions are made (0 where weight is 0)
  targets_BxK: jax.Array    # the original ids at those positions
  weights_BxK: jax.Array    # 1.0 for a real prediction, 0.0 for padding
  kinds_BxK: jax.Array      # REPLACED_MASK, REPLACED_RANDOM or KEPT


def num_predictions(num_real: jax.Array, rate: float) -> jax.Array:
  """K for a row with `num_real` maskable tokens: round half up of rate * n."""
  return jnp.floor(rate * num_real.astype(jnp.float32) + 0.5).astype(jnp.int32)


def static_max_predictions(seq_len: int, rate: float) -> int:
  """The smallest `max_predictions` that never truncates a row of seq_len."""
  return int(np.floor(rate * seq_len + 0.5))


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


def mask_tokens(
    key: jax.Array,
    ids_BxL: jax.Array,
    *,
    special_ids: Sequence[int],
    mask_id: int,
    vocab_size: int,
    rate: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    max_predictions: int,
) -> Masked:
  """BERT masking with exactly K = round(rate * maskable tokens) per row."""
  if not 0.0 <= mask_prob + random_prob <= 1.0:
    raise ValueError(f'mask_prob + random_prob must be in [0, 1], got '
                     f'{mask_prob} + {random_prob}.')
  batch, seq_len = ids_BxL.shape
  if not 0 < max_predictions <= seq_len:
    raise ValueError(f'max_predictions={max_predictions} must be in '
                     f'[1, seq_len={seq_len}].')
  select_key, kind_key, random_key = jax.random.split(key, 3)

  maskable_BxL = ~jnp.isin(ids_BxL, jnp.asarray(list(special_ids), jnp.int32))
  k_B = jnp.minimum(num_predictions(maskable_BxL.sum(axis=1), rate),
                    max_predictions)

  # A uniformly random order of the maskable tokens (specials sort last);
  # the first k_B of that order are the chosen positions.
  scores_BxL = jnp.where(maskable_BxL,
                         jax.random.uniform(select_key, (batch, seq_len)), -1.0)
  _, order_BxK = jax.lax.top_k(scores_BxL, max_predictions)
  chosen_BxK = jnp.arange(max_predictions)[None, :] < k_B[:, None]
  positions_BxK = jnp.where(chosen_BxK, order_BxK, 0).astype(jnp.int32)
  targets_BxK = jnp.take_along_axis(ids_BxL, positions_BxK, axis=1)

  u_BxK = jax.random.uniform(kind_key, (batch, max_predictions))
  kinds_BxK = jnp.where(u_BxK < mask_prob, REPLACED_MASK,
                        jnp.where(u_BxK < mask_prob + random_prob,
                                  REPLACED_RANDOM, KEPT)).astype(jnp.int32)
  random_BxK = _random_nonspecial(random_key, (batch, max_predictions),
                                  vocab_size, special_ids)
  new_BxK = jnp.where(kinds_BxK == REPLACED_MASK, mask_id,
                      jnp.where(kinds_BxK == REPLACED_RANDOM, random_BxK,
                                targets_BxK))
  rows_BxK = jnp.broadcast_to(jnp.arange(batch)[:, None], positions_BxK.shape)
  # Unchosen slots point past the row and are dropped; chosen ones are distinct.
  write_at_BxK = jnp.where(chosen_BxK, positions_BxK, seq_len)
  inputs_BxL = ids_BxL.at[rows_BxK, write_at_BxK].set(new_BxK, mode='drop')
  return Masked(inputs_BxL, positions_BxK, targets_BxK,
                chosen_BxK.astype(jnp.float32), kinds_BxK)
