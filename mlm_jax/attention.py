"""Self-attention: masks (packed segments, sliding windows), RoPE, kernels.

The attention kernel is chosen by `ModelConfig.attention` (model_config.py):
  'xla'    jax.nn.dot_product_attention(implementation='xla'); while attention
           dropout is active (training with attention_dropout_rate > 0) the
           same math runs as an explicit softmax, because the fused function
           has no dropout. The choice is logged when the model is built.
  'cudnn'  jax.nn.dot_product_attention(implementation='cudnn'), GPU only,
           16-bit compute, no attention dropout. Any other combination is
           refused with a ValueError when the model config is made: a kernel
           never changes silently.

Shape letters as in model.py; W is the sliding-window width.
"""
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp

from mlm_jax import model_config
from mlm_jax import sharding


def describe(cfg: model_config.ModelConfig) -> str:
  """One line saying which kernel runs, for the log."""
  if cfg.attention == 'cudnn':
    return 'attention kernel: cuDNN fused attention'
  text = 'attention kernel: XLA (jax.nn.dot_product_attention)'
  if cfg.attention_dropout_rate > 0:
    text += ('; during training with attention dropout '
             f'{cfg.attention_dropout_rate}, an explicit XLA softmax (the '
             'fused function has no dropout)')
  return text


def is_global_layer(layer, local_window: int, global_every: int):
  """Whether `layer` attends globally (ModernBERT: every `global_every`th).

  `layer` may be a Python int or a traced int (inside a scan over layers).
  """
  if not local_window:
    return True
  return layer % global_every == 0


def segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """[B, L, L] bool: query and key are in the same packed segment.

  Padding has segment 0, so real tokens never attend to it.
  """
  return segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]


def window_mask(seq_len: int, width: int) -> jax.Array:
  """[L, L] bool: |query - key| <= width // 2 (a symmetric sliding window)."""
  idx = jnp.arange(seq_len)
  return jnp.abs(idx[:, None] - idx[None, :]) <= width // 2


def rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, base: float):
  """Rotary position embedding: rotates pairs of features by position."""
  half = x_BxLxHxDh.shape[-1] // 2
  freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xF = (positions_BxL.astype(jnp.float32)[..., None] *
                   freq_F)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxLx1xF), jnp.cos(angle_BxLx1xF)
  x1, x2 = jnp.split(x_BxLxHxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxDh.dtype)


def reference_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, allowed_BxLxL,
                        dropout=None):
  """Softmax attention written out; `dropout` (probs -> probs) if given."""
  dh = q_BxLxHxDh.shape[-1]
  scores_BxHxLxL = jnp.einsum('bqhd,bkhd->bhqk', q_BxLxHxDh, k_BxLxHxDh)
  scores_BxHxLxL = scores_BxHxLxL.astype(jnp.float32) / jnp.sqrt(dh)
  scores_BxHxLxL = jnp.where(allowed_BxLxL[:, None], scores_BxHxLxL,
                             jnp.finfo(jnp.float32).min)
  probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
  if dropout is not None:
    probs_BxHxLxL = dropout(probs_BxHxLxL)
  probs_BxHxLxL = probs_BxHxLxL.astype(v_BxLxHxDh.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs_BxHxLxL, v_BxLxHxDh)


class SelfAttention(nnx.Module):

  def __init__(self, cfg: model_config.ModelConfig, dense, rngs: nnx.Rngs,
               dropout=nnx.Dropout):
    d = cfg.hidden_dim
    self.num_heads = cfg.num_heads
    self.implementation = cfg.attention
    self.rope_base = cfg.rope_base if cfg.position == 'rope' else None
    self.query = dense(d, d, ('embed', 'heads'), rngs)
    self.key = dense(d, d, ('embed', 'heads'), rngs)
    self.value = dense(d, d, ('embed', 'heads'), rngs)
    self.out = dense(d, d, ('heads', 'embed'), rngs)
    self.dropout = dropout(cfg.attention_dropout_rate)

  def __call__(self, x_BxLxD, allowed_BxLxL, positions_BxL, *, deterministic,
               rngs, queries_BxK=None):
    """Attention of every position, or only of the positions `queries_BxK`.

    With `queries_BxK` (indices into L), only those rows ask: keys and
    values still come from every position, and the result is [B, K, D]
    (the final layer of a sparse MLM step). Otherwise the result is
    [B, L, D] (Q = L below).
    """
    b, l, d = x_BxLxD.shape
    h = self.num_heads
    split = lambda t: sharding.constrain(
        t.reshape(b, t.shape[1], h, d // h), 'batch', 'length', 'heads', None)
    xq_BxQxD, allowed_BxQxL, q_positions_BxQ = (x_BxLxD, allowed_BxLxL,
                                                positions_BxL)
    if queries_BxK is not None:
      rows = lambda t: jnp.take_along_axis(
          t, queries_BxK.reshape(*queries_BxK.shape, *[1] * (t.ndim - 2)),
          axis=1)
      xq_BxQxD, allowed_BxQxL, q_positions_BxQ = (
          rows(x_BxLxD), rows(allowed_BxLxL), rows(positions_BxL))
    q_BxQxHxDh = split(self.query(xq_BxQxD))
    k_BxLxHxDh = split(self.key(x_BxLxD))
    if self.rope_base is not None:
      q_BxQxHxDh = rope(q_BxQxHxDh, q_positions_BxQ, self.rope_base)
      k_BxLxHxDh = rope(k_BxLxHxDh, positions_BxL, self.rope_base)
    v_BxLxHxDh = split(self.value(x_BxLxD))
    if not deterministic and self.dropout.rate > 0:
      # Only reachable with 'xla': ModelConfig refuses cudnn here.
      out_BxQxHxDh = reference_attention(
          q_BxQxHxDh, k_BxLxHxDh, v_BxLxHxDh, allowed_BxQxL,
          lambda p: self.dropout(p, deterministic=False, rngs=rngs))
    else:
      out_BxQxHxDh = jax.nn.dot_product_attention(
          q_BxQxHxDh, k_BxLxHxDh, v_BxLxHxDh, mask=allowed_BxQxL[:, None],
          implementation=self.implementation)
    return self.out(out_BxQxHxDh.reshape(b, -1, d))


def log_choice(cfg: model_config.ModelConfig) -> None:
  logging.info('Model: %s.', describe(cfg))
