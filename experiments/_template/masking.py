"""A masking plug-in: mask.strategy='experiments.<this folder>.masking:choose'.

The contract is in mlm_jax/masking/__init__.py's docstring: one row in, the tokens to
predict out; the Masker does the 80/10/10 replacement and the rest. This one
is BERT's token strategy written as a plug-in (k maskable tokens uniformly at
random), a starting point to edit and a sanity arm that should match 'token'.
"""
import jax
import jax.numpy as jnp


def choose(key, ids_L, maskable_L, word_start_L, k):
  del word_start_L  # a word-level idea would use it
  score_L = jnp.where(maskable_L, jax.random.uniform(key, ids_L.shape), 2.0)
  return jnp.argsort(jnp.argsort(score_L)) < k  # the k lowest scores
