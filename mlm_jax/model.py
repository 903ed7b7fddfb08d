"""A BERT encoder for masked language modeling, in Flax NNX.

The parameter layout follows Hugging Face's `BertForMaskedLM` (word, position
and token-type embeddings; post-LN blocks; GELU MLP; an MLM head with a dense
transform, GELU, LayerNorm and a decoder tied to the word embeddings plus a
bias), so weights can be exchanged with it. `pre_ln=True` moves each
LayerNorm in front of its sublayer and adds a final one, which trains stably
at higher learning rates.

Shape letters used in names:
  B batch, L sequence length, K predictions per row, D hidden size,
  H attention heads, Dh head size (D / H), F MLP size, V vocabulary size,
  P maximum positions.
Every parameter carries logical axis names (`vocab, embed, heads, kv, mlp`);
`sharding.py` maps them to mesh axes.
"""
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

# name -> (num_layers, hidden_dim, num_heads, mlp_dim): Google's BERT sizes.
PRESETS = {
    'tiny': (2, 128, 2, 512),
    'mini': (4, 256, 4, 1024),
    'small': (4, 512, 8, 2048),
    'medium': (8, 512, 8, 2048),
    'base': (12, 768, 12, 3072),
    'large': (24, 1024, 16, 4096),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_layers: int = 2
  hidden_dim: int = 128
  num_heads: int = 2
  mlp_dim: int = 512
  max_len: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pre_ln: bool = False
  position: str = 'learned'     # 'learned' (BERT) or 'rope' (rotary, in attention)
  rope_base: float = 10_000.0
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # storage dtype


def model_config(config, vocab_size: int) -> ModelConfig:
  """The ModelConfig of a run config's `model` section (size preset + overrides)."""
  c = config.model
  if c.size not in PRESETS:
    raise ValueError(f'Unknown model.size={c.size!r}; choose one of '
                     f'{sorted(PRESETS)}.')
  layers, hidden, heads, mlp = PRESETS[c.size]
  cfg = ModelConfig(
      vocab_size=vocab_size,
      num_layers=c.num_layers or layers,
      hidden_dim=c.hidden_dim or hidden,
      num_heads=c.num_heads or heads,
      mlp_dim=c.mlp_dim or mlp,
      max_len=c.max_len,
      type_vocab_size=c.type_vocab_size,
      dropout_rate=c.dropout_rate,
      attention_dropout_rate=c.attention_dropout_rate,
      layer_norm_eps=c.layer_norm_eps,
      initializer_range=c.initializer_range,
      pre_ln=c.pre_ln,
      position=c.position,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
  )
  if cfg.position not in ('learned', 'rope'):
    raise ValueError(f"model.position={cfg.position!r} must be 'learned' or "
                     "'rope'.")
  if cfg.hidden_dim % cfg.num_heads:
    raise ValueError(f'model hidden_dim={cfg.hidden_dim} is not divisible by '
                     f'num_heads={cfg.num_heads}.')
  return cfg


def _init(cfg: ModelConfig, names):
  return nnx.with_partitioning(
      nnx.initializers.normal(cfg.initializer_range), names)


def _dense(cfg, d_in, d_out, names, rngs):
  return nnx.Linear(
      d_in, d_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      kernel_init=_init(cfg, names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, names[-1:]),
      rngs=rngs)


def _layer_norm(cfg, rngs):
  return nnx.LayerNorm(
      cfg.hidden_dim, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ('embed',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('embed',)),
      rngs=rngs)


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
  """Position ids that restart at 0 where each packed segment starts."""
  seq_len = segment_ids_BxL.shape[1]
  idx_BxL = jnp.broadcast_to(jnp.arange(seq_len), segment_ids_BxL.shape)
  is_start_BxL = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxL[:, :1], bool),
       segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  start_BxL = jax.lax.cummax(jnp.where(is_start_BxL, idx_BxL, 0), axis=1)
  return idx_BxL - start_BxL


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


class Embeddings(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    def embed(n, names):
      return nnx.Embed(n, cfg.hidden_dim, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype,
                       embedding_init=_init(cfg, names), rngs=rngs)
    self.word = embed(cfg.vocab_size, ('vocab', 'embed'))
    self.position = (embed(cfg.max_len, (None, 'embed'))
                     if cfg.position == 'learned' else None)
    self.token_type = embed(cfg.type_vocab_size, (None, 'embed'))
    self.norm = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, ids_BxL, positions_BxL, token_types_BxL, *, deterministic,
               rngs):
    x_BxLxD = self.word(ids_BxL) + self.token_type(token_types_BxL)
    if self.position is not None:
      x_BxLxD = x_BxLxD + self.position(positions_BxL)
    return self.dropout(self.norm(x_BxLxD), deterministic=deterministic,
                        rngs=rngs)


class SelfAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d = cfg.hidden_dim
    self.num_heads = cfg.num_heads
    self.rope_base = cfg.rope_base if cfg.position == 'rope' else None
    self.query = _dense(cfg, d, d, ('embed', 'heads'), rngs)
    self.key = _dense(cfg, d, d, ('embed', 'heads'), rngs)
    self.value = _dense(cfg, d, d, ('embed', 'heads'), rngs)
    self.out = _dense(cfg, d, d, ('heads', 'embed'), rngs)
    self.dropout = nnx.Dropout(cfg.attention_dropout_rate)

  def __call__(self, x_BxLxD, allowed_BxLxL, positions_BxL, *, deterministic,
               rngs):
    b, l, d = x_BxLxD.shape
    h = self.num_heads
    split = lambda t: t.reshape(b, l, h, d // h)
    q_BxLxHxDh = split(self.query(x_BxLxD))
    k_BxLxHxDh = split(self.key(x_BxLxD))
    if self.rope_base is not None:
      q_BxLxHxDh = rope(q_BxLxHxDh, positions_BxL, self.rope_base)
      k_BxLxHxDh = rope(k_BxLxHxDh, positions_BxL, self.rope_base)
    v_BxLxHxDh = split(self.value(x_BxLxD))
    scores_BxHxLxL = jnp.einsum('bqhd,bkhd->bhqk', q_BxLxHxDh, k_BxLxHxDh)
    scores_BxHxLxL = scores_BxHxLxL.astype(jnp.float32) / jnp.sqrt(d // h)
    scores_BxHxLxL = jnp.where(allowed_BxLxL[:, None], scores_BxHxLxL,
                               jnp.finfo(jnp.float32).min)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
    probs_BxHxLxL = self.dropout(probs_BxHxLxL, deterministic=deterministic,
                                 rngs=rngs).astype(v_BxLxHxDh.dtype)
    out_BxLxHxDh = jnp.einsum('bhqk,bkhd->bqhd', probs_BxHxLxL, v_BxLxHxDh)
    return self.out(out_BxLxHxDh.reshape(b, l, d))


class Block(nnx.Module):
  """One transformer layer: attention then MLP, each with a residual."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.pre_ln = cfg.pre_ln
    self.attention = SelfAttention(cfg, rngs)
    self.attention_norm = _layer_norm(cfg, rngs)
    self.mlp_in = _dense(cfg, cfg.hidden_dim, cfg.mlp_dim, ('embed', 'mlp'),
                         rngs)
    self.mlp_out = _dense(cfg, cfg.mlp_dim, cfg.hidden_dim, ('mlp', 'embed'),
                          rngs)
    self.mlp_norm = _layer_norm(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def _mlp(self, x_BxLxD):
    return self.mlp_out(jax.nn.gelu(self.mlp_in(x_BxLxD), approximate=False))

  def __call__(self, x_BxLxD, allowed_BxLxL, positions_BxL, *, deterministic,
               rngs):
    drop = lambda t: self.dropout(t, deterministic=deterministic, rngs=rngs)
    attend = lambda t: self.attention(t, allowed_BxLxL, positions_BxL,
                                      deterministic=deterministic, rngs=rngs)
    if self.pre_ln:
      x_BxLxD = x_BxLxD + drop(attend(self.attention_norm(x_BxLxD)))
      return x_BxLxD + drop(self._mlp(self.mlp_norm(x_BxLxD)))
    x_BxLxD = self.attention_norm(x_BxLxD + drop(attend(x_BxLxD)))
    return self.mlp_norm(x_BxLxD + drop(self._mlp(x_BxLxD)))


class Encoder(nnx.Module):
  """Token ids -> contextual vectors; packed segments never attend across."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.embeddings = Embeddings(cfg, rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = _layer_norm(cfg, rngs) if cfg.pre_ln else None

  def __call__(self, ids_BxL, segment_ids_BxL, token_types_BxL=None, *,
               deterministic=True, rngs=None):
    if token_types_BxL is None:
      token_types_BxL = jnp.zeros_like(ids_BxL)
    positions_BxL = positions_from_segments(segment_ids_BxL)
    # Padding has segment 0, so real tokens never attend to it.
    allowed_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    x_BxLxD = self.embeddings(ids_BxL, positions_BxL, token_types_BxL,
                              deterministic=deterministic, rngs=rngs)
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, allowed_BxLxL, positions_BxL,
                      deterministic=deterministic, rngs=rngs)
    if self.final_norm is not None:
      x_BxLxD = self.final_norm(x_BxLxD)
    return x_BxLxD


class MLMHead(nnx.Module):
  """Dense + GELU + LayerNorm, then the tied decoder; logits in float32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.transform = _dense(cfg, cfg.hidden_dim, cfg.hidden_dim,
                            ('embed', 'mlp'), rngs)
    self.norm = _layer_norm(cfg, rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.param_dtype),
                          out_sharding=('vocab',))

  def __call__(self, h_BxKxD, word_embedding_VxD):
    h_BxKxD = self.norm(jax.nn.gelu(self.transform(h_BxKxD), approximate=False))
    logits_BxKxV = jnp.einsum('bkd,vd->bkv', h_BxKxD,
                              word_embedding_VxD.astype(h_BxKxD.dtype))
    return logits_BxKxV.astype(jnp.float32) + self.bias.astype(jnp.float32)


class BertForMLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs)
    self.mlm_head = MLMHead(cfg, rngs)

  def __call__(self, ids_BxL, segment_ids_BxL, positions_BxK, *,
               deterministic=True, rngs=None):
    """Logits only at `positions_BxK`: the vocabulary projection is sparse."""
    h_BxLxD = self.encoder(ids_BxL, segment_ids_BxL,
                           deterministic=deterministic, rngs=rngs)
    h_BxKxD = jnp.take_along_axis(h_BxLxD, positions_BxK[..., None], axis=1)
    return self.mlm_head(h_BxKxD, self.encoder.embeddings.word.embedding[...])


def create(cfg: ModelConfig, seed_key: jax.Array) -> BertForMLM:
  """Builds the model; under jax.eval_shape this allocates nothing."""
  with nnx.use_eager_sharding(False):
    return BertForMLM(cfg, nnx.Rngs(params=seed_key))
